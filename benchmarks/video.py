"""Benchmark #2 (../shared/specs/benchmarks.md): multi-domain video offline — fashion / mnist / digits
images moving along 8 motion patterns (the pattern is the class, the source the domain), 8-frame clips,
the zoo ViT frame-wise with order-keeping pooling; one head per domain, trained jointly.

Rows: the floors (logistic regression on the raw clip pixels; resnet10t frame-wise from scratch), linear
probe, full fine-tuning, and seed 000's comparison (shared only, domain only, shared + domain
unconstrained or in separate subspaces of W, uniform or upper-heavy; r = 8 on the fused qkv), then
``loraplex analyze`` of seed 0's shared + domain runs into ``docs/figures/video/``.  Finished runs are
read back, so an interrupted benchmark resumes.

    python benchmarks/video.py                 # 3 seeds
    python benchmarks/video.py --quick         # smoke run: 1 seed, 10 steps, tiny splits
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import analyze_runs, cnn_floor, machine, method_rows, pixel_floor, run_table, subspace_rows, write_tables

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "video.yaml"
FIGURES = ROOT / "docs" / "figures" / "video"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/video"))
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 steps, 48 training clips per domain")
    args = parser.parse_args()

    def tweak(base: dict) -> None:
        base["output"]["tensorboard"] = False
        if args.quick:
            base["train"].update(steps=10, warmup_steps=1, eval_every=5, checkpoint_every=5)
            base["data"].update(train_per_domain=48, val_per_domain=16, test_per_domain=24)

    seeds = args.seeds[:1] if args.quick else args.seeds
    rows = [cnn_floor(temporal_pooling="concat"), *method_rows(), *subspace_rows()]
    table = {"logistic regression on raw clip pixels": pixel_floor(CONFIG, seeds, tweak)}
    table |= run_table(CONFIG, rows, seeds, args.out, tweak)
    header = f"Machine: {machine()}. Seeds: {seeds}. Config: configs/video.yaml"
    write_tables(args.out, header, table, ["motion:fashion", "motion:mnist", "motion:digits"])
    pair = [row.name for row in subspace_rows() if row.name.endswith("· uniform")]
    for path in analyze_runs(args.out, pair, seeds[0], args.out / "figures" if args.quick else FIGURES):
        print(f"analysis: {path}")


if __name__ == "__main__":
    main()
