"""Benchmark #1 (../shared/specs/benchmarks.md): fashion + mnist + digits, one head each, trained jointly.

Rows: the two floors (logistic regression on raw pixels; a small CNN, timm ``resnet10t``, trained from
scratch with the same step budget), linear probe, full fine-tuning, one shared LoRA, one LoRA per
domain, shared + per-domain LoRA.  Every run goes through ``loraplex.train`` with
``configs/three_domain.yaml``; finished runs are read back, so an interrupted benchmark resumes.

    python benchmarks/three_domain.py                       # 3 seeds, the zoo ViT
    python benchmarks/three_domain.py --backbone swin_clipart_tiny
    python benchmarks/three_domain.py --quick               # smoke run: 1 seed, 20 steps, tiny splits
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import CNN_FLOOR, Row, machine, markdown, pixel_floor, run_table

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "three_domain.yaml"
LORA_LR = {"train": {"lr": 2e-3}}
TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]  # every LoRA row adapts the same layers
ROWS = [
    CNN_FLOOR,
    Row("linear probe", {"method": {"name": "linear_probe"}}, {"train": {"lr": 5e-3}}),
    Row("full fine-tuning", {"method": {"name": "full_finetune"}}, {"train": {"lr": 5e-4}}),
    Row("one shared LoRA (r=8)", {"method": {"name": "lora", "rank": 8, "target_modules": TARGETS}}, LORA_LR),
    Row("per-domain LoRA (r=8)", {"method": {"name": "lora_per_task", "rank": 8, "target_modules": TARGETS}}, LORA_LR),
    Row("shared + per-domain LoRA (r=8+8)",
        {"method": {"name": "shared_specific", "rank": 8, "domain_rank": 8, "target_modules": TARGETS}}, LORA_LR),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbone", default=None, help="backbone.name for every ViT row (e.g. a zoo entry)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/three_domain"))
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
    table = {"logistic regression on raw pixels": pixel_floor(CONFIG, seeds, tweak)}
    table |= run_table(CONFIG, ROWS, seeds, args.out, tweak)
    domains = ["fashion", "mnist", "digits"]
    text = "\n\n".join(
        [
            f"Machine: {machine()}. Seeds: {seeds}. Config: configs/three_domain.yaml"
            + (f", backbone {args.backbone}" if args.backbone else ""),
            "Test accuracy (%) at the best validation step:\n\n" + markdown(table, domains, "best"),
            "Test accuracy (%) at the last step:\n\n" + markdown(table, domains, "last"),
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "table.json").write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
