"""MoLA's benchmark (issue 15): heterogeneous data with one model — MoLA-Grad and MoLA-Router beside the baselines.

Two data settings, each trained jointly on mixed batches with one head per task:

* ``hetero`` (``configs/digits_hetero.yaml``): domain heterogeneity, one label space — the ten digits
  handwritten (mnist), low-resolution handwritten (sklearn digits) and typeset from fonts (fontdigits);
* ``three_domain`` (``configs/three_domain.yaml``): benchmark #1's fashion / mnist / digits, each its own
  label space (multi-input tasks).

Rows: both floors (logistic regression on raw pixels, a small CNN from scratch), hard parameter sharing
(full fine-tuning, one head per task), one shared LoRA and one LoRA per task on the frozen backbone, MoLA-Grad,
MoLA-Router without and with TwD, the top-1 router; on the ViT also the cheaper patch-embedding router.  Two
backbones: the zoo ViT (``vit_debian_tiny``: experts on qkv / proj / fc1 / fc2) and the zoo CNN
(``resnet_debian_tiny``: experts on every convolution, stem and shortcuts included).  Same step budget for
every row; test accuracy at the best validation step and at the last step.

    python benchmarks/mola.py --dataset hetero --backbone vit          # 3 seeds
    python benchmarks/mola.py --dataset three_domain --backbone cnn --rows MoLA
    python benchmarks/mola.py --cost                                   # step time vs one LoRA, interleaved
    python benchmarks/mola.py --quick                                  # smoke run

Finished runs are read back, not re-run (processes may share a table with ``--rows``); on the ViT, three_domain
shares its run directory with ``benchmarks/three_domain.py --backbone vit_debian_tiny`` (same rows, same configs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import LORA_LR, Row, cnn_floor, machine, pixel_floor, run_table, write_tables

import loraplex as lp
from loraplex.config import BackboneSection
from loraplex.methods.mola import CNN_TARGETS
from loraplex.methods.registry import DEFAULT_TARGETS
from loraplex.models import create_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATASETS = {"hetero": ("digits_hetero.yaml", ["mnist", "digits", "fontdigits"]),
            "three_domain": ("three_domain.yaml", ["fashion", "mnist", "digits"])}  # fmt: skip
BACKBONES = {"vit": ("vit_debian_tiny", list(DEFAULT_TARGETS)), "cnn": ("resnet_debian_tiny", list(CNN_TARGETS))}
STRATEGY = {"vit": "bmm", "cnn": "slices"}  # on convs task routing is fastest per task segment (BENCHMARKS.md §6)
MOLA_LR = {"train": {"lr": 5e-4}}  # full fine-tuning's rate: MoLA trains the backbone too


def rows(backbone: str) -> list[Row]:
    _, targets = BACKBONES[backbone]
    router = "resnet20"

    def method(name: str, **kw: object) -> dict:
        rank = {"stem_rank": 8, "downsample": True} if backbone == "cnn" and name.startswith("mola") else {}
        strategy = {"mixed_strategy": STRATEGY[backbone]}
        return {"method": {"name": name, "rank": 8, "target_modules": targets, **rank, **strategy, **kw}}

    table = [
        cnn_floor(),
        # the names (and configs) of benchmarks/three_domain.py's rows: its runs are read back, not re-run
        Row("full fine-tuning", {"method": {"name": "full_finetune"}}, MOLA_LR),  # hard parameter sharing
        Row("one shared LoRA (r=8)", method("lora"), LORA_LR),
        Row("per-domain LoRA (r=8)", method("lora_per_task"), LORA_LR),  # frozen backbone, one LoRA per task
        Row("MoLA-Grad (r=8)", method("mola_grad"), MOLA_LR),
        Row("MoLA-Router (r=8, no TwD)", method("mola_router", router=router, twd=0.0), MOLA_LR),
        Row("MoLA-Router + TwD (r=8)", method("mola_router", router=router), MOLA_LR),
        Row("MoLA-Router top-1 + TwD (r=8)", method("mola_router", router=router, gate="top1"), MOLA_LR),
    ]
    if backbone == "vit":
        table.append(Row("MoLA-Router + TwD (r=8, patch router)", method("mola_router", router="patch"), MOLA_LR))
    return table


def step_cost(backbone: str, steps: int, batch: int = 64) -> dict[str, float]:
    """Seconds per training step (forward + backward + AdamW) on a mixed batch of three tasks, per method, in
    one process with the methods interleaved step by step, so drift of the machine hits every method alike."""
    name, targets = BACKBONES[backbone]
    tasks = ["a", "b", "c"]
    common = {"tasks": tasks, "rank": 8, "target_modules": targets, "mixed_strategy": STRATEGY[backbone]}
    configs = {
        "one LoRA (r=8)": lp.make_config("lora", **common),
        "MoLA-Grad (r=8)": lp.make_config("mola_grad", **common),
        "MoLA-Router + TwD (r=8)": lp.make_config("mola_router", **common),
    }
    models, optimisers = {}, {}
    for row, cfg in configs.items():
        section = BackboneSection(name=name)
        model = lp.wrap(create_backbone(section), cfg, heads=dict.fromkeys(tasks, 10)).train()
        models[row] = model
        optimisers[row] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    ids, labels = torch.arange(batch) % 3, torch.randint(0, 10, (batch,), generator=g)
    times: dict[str, list[float]] = {row: [] for row in models}
    for step in range(steps + 2):  # two warm-up steps
        for row, model in models.items():
            start = time.perf_counter()
            out = model(x, task=ids)
            loss = out.loss(labels)
            if out.router_embedding is not None:
                loss = loss + 0.1 * lp.methods.mola.twd_loss(out.router_embedding, ids)
            optimisers[row].zero_grad()
            loss.backward()
            optimisers[row].step()
            if step >= 2:
                times[row].append(time.perf_counter() - start)
    return {row: statistics.fmean(t) for row, t in times.items()} | {
        f"{row} / one LoRA": statistics.fmean(t) / statistics.fmean(times["one LoRA (r=8)"]) for row, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), default="hetero")
    parser.add_argument("--backbone", choices=list(BACKBONES), default="vit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rows", default=None, help="train only rows whose name contains this (to share work)")
    parser.add_argument("--cost", action="store_true", help="time a training step per method instead")
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, 100 training images per task")
    args = parser.parse_args()
    if args.cost:
        for backbone in BACKBONES:
            print(f"{backbone} ({machine()}):", step_cost(backbone, steps=5 if args.quick else 30))
        return
    config_file, domains = DATASETS[args.dataset]
    config = CONFIGS / config_file
    default = "runs/bench/three_domain_debian" if (args.dataset, args.backbone) == ("three_domain", "vit") else None
    out = args.out or Path(default or f"runs/bench/mola/{args.dataset}_{args.backbone}")
    zoo_name, _ = BACKBONES[args.backbone]

    def tweak(base: dict) -> None:
        base["backbone"] = {"name": zoo_name, "img_size": 32}
        base["output"]["tensorboard"] = False
        if args.quick:
            base["train"].update(steps=20, warmup_steps=2, eval_every=10, checkpoint_every=10)
            base["data"].update(train_per_domain=100, val_per_domain=20, test_per_domain=50)

    seeds = args.seeds[:1] if args.quick else args.seeds
    table_rows = rows(args.backbone)
    if args.rows:
        run_table(config, [row for row in table_rows if args.rows in row.name], seeds, out, tweak)
        return
    table = {"logistic regression on raw pixels": pixel_floor(config, seeds, tweak)}
    table |= run_table(config, table_rows, seeds, out, tweak)
    header = f"Machine: {machine()}. Seeds: {seeds}. Config: configs/{config_file}, backbone {zoo_name}"
    write_tables(out, header, table, domains)


if __name__ == "__main__":
    main()
