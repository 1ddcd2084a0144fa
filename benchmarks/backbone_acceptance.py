"""Acceptance of a zoo backbone: does offline pre-training beat random init and the floors where this library is used?

For each downstream set separately (``common.DOWNSTREAM``: fashion-1k and mnist-1k — 1,000 training, 200
validation, 2,000 test images — and the held-out parts of the pre-training sources, emoji-held and
clipart-held): linear probe, LoRA (r=8 on qkv/proj/fc1/fc2) and full fine-tuning, each from the zoo backbone
and from the same architecture at random init, beside the two floors (logistic regression on raw pixels, a
small CNN from scratch with the same step budget); mean ± std over seeds.

    python benchmarks/backbone_acceptance.py --backbone vit_debian_tiny               # 3 seeds, every set
    python benchmarks/backbone_acceptance.py --datasets emoji-held --rows "LoRA r=8 · random init"
    python benchmarks/backbone_acceptance.py --quick                                  # smoke run

Finished runs are read back, not re-run: two processes can share a table (``--datasets``, ``--rows``), and a
last call with everything writes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import DOWNSTREAM, Row, cnn_floor, machine, markdown, pixel_floor, run_table

from loraplex.models import zoo_entries

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "backbone_acceptance.yaml"
REGIMES = {
    "linear probe": ({"name": "linear_probe"}, 5e-3),
    "LoRA r=8": ({"name": "lora", "rank": 8, "target_modules": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]}, 2e-3),
    "full fine-tuning": ({"name": "full_finetune"}, 5e-4),
}
PIXELS = "logistic regression on raw pixels"


def rows(backbone: str) -> list[Row]:
    """The CNN floor, then each regime from the zoo weights and from the zoo architecture at random init."""
    entry = zoo_entries()[backbone]
    random_init = {"name": entry["architecture"], "img_size": entry["img_size"], "kwargs": entry["kwargs"]}
    out = [cnn_floor()]
    for regime, (method, lr) in REGIMES.items():
        for init, section in (("pre-trained", {"name": backbone}), ("random init", random_init)):
            out.append(Row(f"{regime} · {init}", {"method": method, "backbone": section}, {"train": {"lr": lr}}))
    return out


def _empty(run: dict) -> dict:
    return {"best": {"test": {}}, "last": {"test": {}}, "train_seconds": 0.0, "params": run["params"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_debian_tiny", help="zoo entry to test")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="default runs/bench/backbone_acceptance/<backbone>")
    parser.add_argument("--datasets", nargs="+", default=list(DOWNSTREAM), choices=list(DOWNSTREAM))
    parser.add_argument("--rows", nargs="+", default=None, help="train only these rows (names as in the table)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, 100 training images")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    out = args.out or ROOT / "runs" / "bench" / "backbone_acceptance" / args.backbone
    chosen = [row for row in rows(args.backbone) if args.rows is None or row.name in args.rows]
    unknown = set(args.rows or ()) - {row.name for row in rows(args.backbone)} - {PIXELS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; rows are {[r.name for r in rows(args.backbone)] + [PIXELS]}")
    merged: dict[str, list[dict]] = {}
    for dataset in args.datasets:
        train, val, test = DOWNSTREAM[dataset]

        def tweak(base: dict, dataset: str = dataset, train: int = train, val: int = val, test: int = test) -> None:
            base["data"].update(domains=[dataset], train_per_domain=train, val_per_domain=val, test_per_domain=test)
            base["backbone"]["name"] = args.backbone
            if args.quick:
                base["train"].update(steps=20, warmup_steps=2, eval_every=10, checkpoint_every=10)
                base["data"].update(train_per_domain=100, val_per_domain=20, test_per_domain=100)

        table = {PIXELS: pixel_floor(CONFIG, seeds, tweak)} if args.rows is None or PIXELS in args.rows else {}
        table |= run_table(CONFIG, chosen, seeds, out / dataset, tweak)
        for name, runs in table.items():  # one row for every dataset: per-dataset columns, their mean
            slots = merged.setdefault(name, [_empty(run) for run in runs])
            for slot, run in zip(slots, runs, strict=True):
                slot["train_seconds"] += run["train_seconds"]
                for which in ("best", "last"):
                    slot[which]["test"][f"acc/{dataset}"] = run[which]["test"][f"acc/{dataset}"]
    for slots in merged.values():
        for slot in slots:
            for which in ("best", "last"):
                test = slot[which]["test"]
                test["acc/mean"] = sum(test[f"acc/{d}"] for d in args.datasets) / len(args.datasets)
    text = "\n\n".join(
        [
            f"Machine: {machine()}. Seeds: {seeds}. Backbone: {args.backbone}. "
            "Config: configs/backbone_acceptance.yaml",
            "Test accuracy (%) at the best validation step:\n\n" + markdown(merged, args.datasets, "best"),
        ]
    )
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"table-{'-'.join(args.datasets)}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
