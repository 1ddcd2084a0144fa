"""Benchmark #1 (../shared/specs/benchmarks.md): fashion + mnist + digits, one head each, trained jointly.

Two tables over the same runs (a row shared by both is trained once and read back):

* ``--table baselines``: the two floors (logistic regression on raw pixels; a small CNN, timm
  ``resnet10t``, from scratch with the same step budget), linear probe, full fine-tuning, one shared
  LoRA, one LoRA per domain, shared + per-domain LoRA — LoRA rows on qkv/proj/fc1/fc2;
* ``--table subspace``: seed 000's rows (shared only, domain only, shared + domain unconstrained or in
  separate subspaces of W, uniform or upper-heavy) with r = 8 on the fused qkv as in the paper, plus
  ``loraplex analyze`` of seed 0's shared + domain runs into ``docs/figures/three_domain/``.

Every run goes through ``loraplex.train`` with ``configs/three_domain.yaml``; finished runs are read
back, so an interrupted benchmark resumes.

    python benchmarks/three_domain.py                        # baselines, 3 seeds, the zoo ViT
    python benchmarks/three_domain.py --table subspace
    python benchmarks/three_domain.py --backbone swin_clipart_tiny
    python benchmarks/three_domain.py --quick                # smoke run: 1 seed, 20 steps, tiny splits
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import (
    LORA_LR,
    Row,
    analyze_runs,
    cnn_floor,
    machine,
    method_rows,
    pixel_floor,
    run_table,
    subspace_rows,
    write_tables,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "three_domain.yaml"
FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures" / "three_domain"
TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]  # every LoRA row of the baselines adapts these


def baseline_rows() -> list[Row]:
    def lora(name: str, **kw: object) -> dict:
        return {"method": {"name": name, "rank": 8, "target_modules": TARGETS, **kw}}

    return [
        cnn_floor(),
        *method_rows(),
        Row("one shared LoRA (r=8)", lora("lora"), LORA_LR),
        Row("per-domain LoRA (r=8)", lora("lora_per_task"), LORA_LR),
        Row("shared + per-domain LoRA (r=8+8)", lora("shared_specific", domain_rank=8), LORA_LR),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", choices=["baselines", "subspace"], default="baselines")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbone", default=None, help="backbone.name for every transformer row (a zoo entry)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/three_domain"))
    parser.add_argument("--rows", default=None, help="train only rows whose name contains this (to share work)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, 100 training images per domain")
    args = parser.parse_args()

    def tweak(base: dict) -> None:
        if args.backbone:
            base["backbone"]["name"] = args.backbone
        base["output"]["tensorboard"] = False
        if args.quick:
            base["train"].update(steps=20, warmup_steps=2, eval_every=10, checkpoint_every=10)
            base["data"].update(train_per_domain=100, val_per_domain=20, test_per_domain=50)

    seeds = args.seeds[:1] if args.quick else args.seeds
    rows = baseline_rows() if args.table == "baselines" else [cnn_floor(), *method_rows(), *subspace_rows()]
    if args.rows:
        run_table(CONFIG, [row for row in rows if args.rows in row.name], seeds, args.out, tweak)
        return
    table = {"logistic regression on raw pixels": pixel_floor(CONFIG, seeds, tweak)}
    table |= run_table(CONFIG, rows, seeds, args.out, tweak)
    header = f"Machine: {machine()}. Seeds: {seeds}. Config: configs/three_domain.yaml" + (
        f", backbone {args.backbone}" if args.backbone else ""
    )
    write_tables(args.out / args.table, header, table, ["fashion", "mnist", "digits"])
    if args.table == "subspace":
        pair = [row.name for row in subspace_rows() if row.name.endswith("· uniform")]
        figures = FIGURES if not args.quick else args.out / "figures"
        for path in analyze_runs(args.out, pair, seeds[0], figures):
            print(f"analysis: {path}")


if __name__ == "__main__":
    main()
