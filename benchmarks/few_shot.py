"""Few-shot transfer (benchmarks.md #5, CLoRA; VTAB-1K's protocol at small scale): accuracy against trainable
parameters for LoRA at several ranks and CLoRA at several p, with and without SADE, beside CLoRA#, ARC, the linear
probe and full fine-tuning.

Each set is one task of 1,000 training images — 800 to train and 200 to choose on (the best validation step), as
VTAB's train800 / val200 — and its test split: fashion-1k, mnist-1k, digits-1k and the held-out parts of the zoo's
pre-training sources (emoji sub-groups and clip-art categories no ``-seen`` backbone saw).  Every row on the zoo ViT
``vit_debian3_tiny`` (the strongest measured: docs/pretraining.md "Recipe 3"), the same steps; adapter rows on the
paper's d×d sites (the q and v rows of every block's fused qkv), r = 8 for CLoRA.  No per-task hyper-parameter
search at this scale (the paper searches lr, weight decay and p): one lr per kind of row, said in the table.  Not
done yet: VTAB's last stage, re-training on all 1,000 images with the chosen settings (the held-out sets have no
spare images to validate on, and the loop needs a validation split): the table reports the 800-image runs.

    python benchmarks/few_shot.py                       # 3 seeds, every set and row
    python benchmarks/few_shot.py --sets fashion --rows CLoRA
    python benchmarks/few_shot.py --sade-cost           # SADE per step: weight-only vs sample-dependent
    python benchmarks/few_shot.py --quick

Finished runs are read back, not re-run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
import yaml
from common import Row, interleaved_seconds, machine, pixel_floor, run_table
from matplotlib.figure import Figure

import loraplex as lp
from loraplex.config import BackboneSection
from loraplex.eval.plots import PALETTE
from loraplex.methods.clora import QV_TARGETS, bank_modules, sade_samples, sade_weights
from loraplex.models import create_backbone

ROOT = Path(__file__).resolve().parents[1]
SETS = {"fashion": 2000, "mnist": 2000, "digits": 597, "emoji-held": 371, "clipart-held": 257}  # test images
SITES = list(QV_TARGETS)
ADAPTER_LR, FULL_LR, PROBE_LR = 2e-3, 5e-4, 5e-3
BACKBONE = "vit_debian3_tiny"
TRAIN = {"steps": 300, "batch_size": 64, "warmup_steps": 30, "eval_every": 50, "checkpoint_every": 100}


def rows() -> list[Row]:
    def method(name: str, **kw: object) -> dict:
        return {"method": {"name": name, "target_modules": SITES, **kw}}

    adapter = {"train": {"lr": ADAPTER_LR}}
    table = [
        Row("linear probe", {"method": {"name": "linear_probe"}}, {"train": {"lr": PROBE_LR}}),
        Row("full fine-tuning", {"method": {"name": "full_finetune"}}, {"train": {"lr": FULL_LR}}),
    ]
    table += [Row(f"LoRA r={r}", method("lora", rank=r), adapter) for r in (1, 2, 4, 8, 16)]
    for p in (1, 2, 4):
        table.append(Row(f"CLoRA p={p}", method("clora", rank=8, bases=p), adapter))
        if p > 1:  # SADE needs two bases to compare
            table.append(Row(f"CLoRA p={p} + SADE", method("clora", rank=8, bases=p, sade=0.1), adapter))
    table.append(Row("CLoRA# p=2", method("clora", rank=8, bases=2, coefficients="shared"), adapter))
    table.append(Row("ARC", method("clora", rank=8, tied=True, coefficients="diagonal"), adapter))
    return table


def base_config(name: str, test: int, quick: bool) -> dict:
    train = dict(TRAIN, steps=20, warmup_steps=2, eval_every=10, checkpoint_every=10) if quick else dict(TRAIN)
    return {
        "backbone": {"name": BACKBONE, "img_size": 32},
        "method": {"name": "lora"},
        "data": {
            "domains": [name],
            "train_per_domain": 100 if quick else 800,
            "val_per_domain": 20 if quick else 200,
            "test_per_domain": min(test, 100) if quick else test,
        },
        "train": train,
        "output": {"tensorboard": False},
    }


def plot(summary: dict[str, dict[str, tuple[float, int]]], path: Path) -> None:
    """Mean test accuracy over the sets against trainable parameters (log scale), one curve per method family."""
    families = {"LoRA": "LoRA r=", "CLoRA": "CLoRA p=", "CLoRA + SADE": "+ SADE"}
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.subplots()
    points = {row: (np.mean([a for a, _ in by_set.values()]), next(iter(by_set.values()))[1])
              for row, by_set in summary.items()}  # fmt: skip
    for i, (label, key) in enumerate(families.items()):
        chosen = [
            (p, a) for row, (a, p) in points.items() if key in row and (label == "CLoRA + SADE") == ("SADE" in row)
        ]
        if chosen:
            xs, ys = zip(*sorted(chosen), strict=True)
            ax.plot(xs, ys, marker="o", color=PALETTE[i], label=label)
    for j, row in enumerate(r for r in points if not any(k in r for k in ("LoRA r=", "CLoRA p="))):
        a, p = points[row]
        ax.scatter([max(p, 1)], [a], color=PALETTE[3 + j], label=row, marker="s")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + head)")
    ax.set_ylabel("mean test accuracy over the sets (%)")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def sade_cost(steps: int = 30, batch: int = 64, bases: int = 4) -> dict[str, float]:
    """Seconds per evaluation of SADE with its gradient, interleaved: weight-only vs sample-dependent (the latter on
    the q / v inputs of one batch of 32-px images, every token), on the zoo ViT with CLoRA p = ``bases``."""
    cfg = lp.make_config("clora", tasks=["a"], rank=8, bases=bases, target_modules=SITES)
    model = lp.wrap(create_backbone(BackboneSection(name=BACKBONE)), cfg, heads={"a": 10})
    for group in (g for layer in model.adapted_layers().values() for g in layer.groups.values()):
        group.Q.data.normal_(std=0.1)
    (bank, groups), = bank_modules(model).values()  # fmt: skip

    class Keep:
        def observe(self, x: torch.Tensor) -> None:
            self.x = x.reshape(-1, x.shape[-1])

    keep = {name: Keep() for name in model.adapted_layers()}
    with torch.no_grad(), model.recording(keep):
        model.forward_features(torch.randn(batch, 3, 32, 32))
    inputs = torch.stack([keep[name].x for name in model.adapted_layers() for _ in range(2)])  # q and v: one input

    def weights() -> None:
        q = torch.cat([g.coefficients().flatten(0, 1) for g in groups])
        sade_weights(bank, q).backward()

    def samples() -> None:
        q = torch.cat([g.coefficients().flatten(0, 1) for g in groups])
        sade_samples(bank, q, inputs).backward()

    mean = interleaved_seconds({"weight-only": weights, "sample-dependent": samples}, steps)
    return mean | {"saving": 1 - mean["weight-only"] / mean["sample-dependent"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", default=None, help="train only rows whose name contains this")
    parser.add_argument("--sade-cost", action="store_true", help="time SADE's two forms instead")
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, 100 training images")
    args = parser.parse_args()
    if args.sade_cost:
        print(f"{machine()}:", sade_cost())
        return
    seeds = args.seeds[:1] if args.quick else args.seeds
    out = ROOT / "runs" / "bench" / ("few_shot_quick" if args.quick else "few_shot")
    table_rows = [r for r in rows() if args.rows is None or args.rows in r.name]
    summary: dict[str, dict[str, tuple[float, int]]] = {}
    spread: dict[str, dict[str, str]] = {}
    lines = [
        "| row | trainable | " + " | ".join(args.sets) + " | mean |",
        "|---|---:|" + "---:|" * (len(args.sets) + 1),
    ]
    pixels = []
    for name in args.sets:
        config = out / name / "base.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(base_config(name, SETS[name], args.quick)))
        for row, runs in run_table(config, table_rows, seeds, out / name).items():
            accs = [100 * r["best"]["test"]["acc/mean"] for r in runs]
            summary.setdefault(row, {})[name] = (statistics.fmean(accs), runs[0]["params"]["trainable"])
            std = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
            spread.setdefault(row, {})[name] = f"{statistics.fmean(accs):.1f}{std}"
        if not args.rows:
            pixels.append(100 * statistics.fmean(r["best"]["test"]["acc/mean"] for r in pixel_floor(config, seeds)))
    if args.rows:
        return
    lines.append("| logistic regression on raw pixels | 0 | " + " | ".join(f"{a:.1f}" for a in pixels)
                 + f" | {statistics.fmean(pixels):.1f} |")  # fmt: skip
    for row, by_set in summary.items():
        accs = [by_set[s][0] for s in args.sets]
        params = next(iter(by_set.values()))[1]
        lines.append(f"| {row} | {params:,} | " + " | ".join(spread[row][s] for s in args.sets)
                     + f" | {statistics.fmean(accs):.1f} |")  # fmt: skip
    text = (f"Machine: {machine()}. Seeds: {seeds}. Train {TRAIN}; lr adapters {ADAPTER_LR}, full {FULL_LR}, probe "
            f"{PROBE_LR}. Test accuracy (%) at the best validation step; trainable = adapter + head on "
            f"{args.sets[0]}\n\n") + "\n".join(lines)  # fmt: skip
    (out / "table.md").write_text(text + "\n")
    plot(summary, ROOT / "docs" / "figures" / f"few_shot{'_quick' if args.quick else ''}.png")
    print(text)


if __name__ == "__main__":
    main()
