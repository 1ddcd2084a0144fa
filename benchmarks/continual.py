"""Continual learning (benchmarks.md #4, issue 16): InfLoRA and DualLoRA beside their baselines and both floors.

Two sequences, each task trained for the same number of steps (80 of 64 images, lr 2e-3 — the LoRA rate of the other
tables: InfLoRA's 5e-4 goes with 50 epochs of ViT-B), every method on the same sites (rank 10 on the k and v rows of
every block's fused qkv of the zoo ViT ``vit_debian_tiny``):

* ``split_fashion`` (``configs/split_fashion.yaml``): class-incremental Split-Fashion, 5 tasks of 2 classes, the
  class order drawn from the seed (seed ``s`` = class order ``s``);
* ``domains`` (``configs/domain_sequence.yaml``): mnist → digits → fontdigits, one label space, domain-incremental.

Rows: logistic regression on raw pixels and a small CNN from scratch, both trained on all tasks at once (floors:
no sequence); the linear probe and LoRA fine-tuned task after task (lower bound); one LoRA per task with the task id
given (task-incremental: its numbers are not comparable to the others' and say so); LoRA on all tasks at once (the
upper bound); InfLoRA; DualLoRA, and DualLoRA without its dynamic memory (every learned task's residual weighs the
same) and without calibration (β = 0).

    python benchmarks/continual.py --dataset split_fashion          # 3 seeds (class orders)
    python benchmarks/continual.py --dataset domains --rows DualLoRA
    python benchmarks/continual.py --speed                          # inference time per image vs the backbone
    python benchmarks/continual.py --quick                          # smoke run

Finished runs are read back, not re-run; ``--rows`` lets two processes share a table.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
import yaml
from common import Row, interleaved_seconds, machine, pixel_floor, run_table

import loraplex as lp
from loraplex.config import BackboneSection
from loraplex.eval.plots import Matrix, matrices
from loraplex.methods.duallora import DualLoRAContinual
from loraplex.models import create_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"split_fashion": "split_fashion.yaml", "domains": "domain_sequence.yaml"}
SITES = {"rank": 10, "target_modules": ["attn.qkv.k", "attn.qkv.v"]}
STEPS = {"steps": 80, "warmup_steps": 8, "eval_every": 40, "checkpoint_every": 40, "lr": 2e-3}  # per task
FIGURES = ROOT / "docs" / "figures" / "continual"


def rows() -> list[Row]:
    lora = {"method": {"name": "lora", **SITES}}
    return [
        Row(
            "small CNN from scratch (resnet10t), joint",
            {"backbone": {"name": "resnet10t", "img_size": 32}, "method": {"name": "full_finetune"}},
            {"train": {"lr": 1e-3, "joint": True}},
        ),
        Row("linear probe, sequential", {"method": {"name": "linear_probe"}}, {"train": {"lr": 5e-3}}),
        Row("LoRA, sequential (lower bound)", lora),
        Row(
            "LoRA per task, task id given (task-IL)",
            {"method": {"name": "lora_per_task", **SITES}},
            {"train": {"incremental": "task"}},
        ),
        Row("LoRA, joint (upper bound)", lora, {"train": {"joint": True}}),
        Row("InfLoRA", {"method": {"name": "inflora", **SITES}}),
        Row("DualLoRA", {"method": {"name": "duallora", **SITES}}),
        Row("DualLoRA, no dynamic memory", {"method": {"name": "duallora", **SITES, "dynamic_memory": False}}),
        Row("DualLoRA, no calibration", {"method": {"name": "duallora", **SITES, "calibration": 0.0}}),
    ]


def _pct(values: list[float | None]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "—"
    return (
        f"{values[0]:.1f}" if len(values) == 1 else f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"
    )


def table(results: dict[str, list[dict]], pixels: list[float]) -> str:
    lines = [
        "| row | A_T | Ā | forgetting (max) | forgetting (first) | BWT | trainable / task | trainable, all "
        "| s / task |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| logistic regression on raw pixels, joint | {_pct(pixels)} | — | — | — | — | 0 | 0 | — |",
    ]
    for name, runs in results.items():
        cells = [_pct([r.get(k) for r in runs]) for k in
                 ("A_T", "avg_incremental", "forgetting_max", "forgetting_first", "backward_transfer")]  # fmt: skip
        p = runs[0]["params"]
        seconds = statistics.fmean(statistics.fmean(r["task_seconds"]) for r in runs)
        joint = " (all tasks at once)" if runs[0]["joint"] else ""
        lines.append(
            f"| {name} | {' | '.join(cells)} | {p['per_task']:,} | {p['trainable']:,} | {seconds:.0f}{joint} |"
        )
    return "\n".join(lines)


def matrix_figure(results: dict[str, list[dict]], path: Path) -> None:
    """The mean accuracy matrix of every sequential row, side by side."""
    panels = []
    for name, runs in results.items():
        if runs[0]["joint"]:
            continue
        stacked = np.array([[[np.nan if v is None else v for v in row] for row in r["matrix"]] for r in runs], float)
        tasks = [f"task {j + 1}" for j in range(stacked.shape[2])]
        panels.append(Matrix(name, stacked.mean(0), [f"after {t}" for t in tasks], tasks))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(matrices(panels))


def inference_speed(tasks: int = 5, batch: int = 64, reps: int = 30) -> dict[str, float]:
    """Seconds per image of class-incremental inference (task unknown), interleaved: the backbone alone, InfLoRA
    merged into W (its branches are input-independent), DualLoRA (orthogonal LoRA + relevance-gated residuals and the
    task prior, one forward pass), all tasks learned."""
    names = [f"t{i}" for i in range(tasks)]
    heads = dict.fromkeys(names, 2)
    backbone = create_backbone(BackboneSection(name="vit_debian_tiny")).eval()
    inflora = lp.wrap(create_backbone(BackboneSection(name="vit_debian_tiny")), lp.make_config("inflora", tasks=names,
                      **SITES), heads=heads).eval()  # fmt: skip
    dual_cfg = lp.make_config("duallora", tasks=names, **SITES)
    dual = lp.wrap(create_backbone(BackboneSection(name="vit_debian_tiny")), dual_cfg, heads=heads).eval()
    hooks = DualLoRAContinual(dual_cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    for t in range(tasks):  # every task learned: bases from inputs, random factors
        inputs = lambda s=t: iter([torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(s))])  # noqa: E731
        hooks.before_task(dual, t, inputs)
        hooks.after_task(dual, t, inputs)
    for model in (inflora, dual):
        for layer in model.adapted_layers().values():
            for group in layer.groups.values():
                group.B.data.normal_(std=0.02, generator=g)
    steps = {
        "backbone": lambda: backbone(x),
        "InfLoRA (merged)": lambda: inflora_forward(inflora, x, tasks),
        "DualLoRA": lambda: hooks.class_logits(dual, x, tasks - 1),
    }
    with torch.inference_mode(), inflora.merged():
        per_image = {name: t / batch for name, t in interleaved_seconds(steps, reps).items()}
    return per_image | {f"{name} / backbone": v / per_image["backbone"] for name, v in per_image.items()}


def inflora_forward(model: lp.AdaptedModel, x: torch.Tensor, tasks: int) -> torch.Tensor:
    features = model.forward_features(x)
    return torch.cat([model._head(t, features) for t in range(tasks)], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), default="split_fashion")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", default=None, help="train only rows whose name contains this (to share work)")
    parser.add_argument("--speed", action="store_true", help="inference time per image instead")
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 steps per task, 100 training images per task")
    args = parser.parse_args()
    if args.speed:
        print(f"{machine()}:", inference_speed())
        return
    config_file = CONFIGS / DATASETS[args.dataset]
    seeds = args.seeds[:1] if args.quick else args.seeds

    def tweak(base: dict) -> None:
        base["train"].update(STEPS)
        base["output"]["tensorboard"] = False
        if args.quick:
            base["train"].update(steps=6, warmup_steps=1, eval_every=3, checkpoint_every=3)
            base["data"].update(train_per_domain=500, val_per_domain=50, test_per_domain=200)

    out = ROOT / "runs" / "bench" / "continual" / (args.dataset + ("_quick" if args.quick else ""))
    table_rows = [r for r in rows() if args.rows is None or args.rows in r.name]
    results = run_table(config_file, table_rows, seeds, out, tweak)
    if args.rows:
        return
    base = yaml.safe_load(config_file.read_text())
    tweak(base)
    varies = "class orders" if base["train"]["incremental"] == "class" else "data draws and initialisation, one order"
    base["train"].update(regime="multidomain", incremental=None)  # the floor: every class (domain) at once
    base["data"]["sequence"] = None
    floor_base = out / "floor.yaml"
    floor_base.write_text(yaml.safe_dump(base))
    pixels = [r["best"]["test"]["acc/mean"] for r in pixel_floor(floor_base, seeds)]
    text = f"Machine: {machine()}. Seeds ({varies}): {seeds}. Config: configs/{config_file.name}, {STEPS}\n\n"
    text += table(results, pixels)
    (out / "table.md").write_text(text + "\n")
    matrix_figure(results, FIGURES / f"{args.dataset}{'_quick' if args.quick else ''}.png")
    print(text)


if __name__ == "__main__":
    main()
