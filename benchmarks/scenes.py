"""Benchmark #3 (../shared/specs/benchmarks.md): dense multi-task scenes, MTLoRA's comparison.

Rows: two references (constant maps — what learning nothing scores; the true maps averaged over the cells of
the pyramid's finest map and upsampled as the heads upsample — how much of each task a head at that
resolution can express), the two floors of every table (per-pixel linear models on raw 5×5 pixel patches;
resnet10t from scratch under the same dense heads), single-task full fine-tuning (one model per task: the Δm
reference), multi-task full fine-tuning, decoders only, one shared LoRA at ranks 8 and 16 (trained with the
same non-attention modules as MTLoRA), MTLoRA at three ranks, MTLoRA+ — per-task metrics, Δm against the
single-task models, trainable parameters, train time.
Every run goes through ``loraplex.train`` with ``configs/scenes.yaml``; finished runs are read back.

``--cost`` measures instead MTLoRA's training-step time over a shared-LoRA-only step on the same backbone
and batch (interleaved rounds, median of per-round ratios).

    python benchmarks/scenes.py                 # the table, 3 seeds
    python benchmarks/scenes.py --cost          # the step-time ratio
    python benchmarks/scenes.py --cost --paper-scale   # the same on Swin-T at 224 px (random weights)
    python benchmarks/scenes.py --quick         # smoke run: 1 seed, 6 steps, tiny splits
    python benchmarks/scenes.py --img-size 64 --out runs/bench/scenes_64   # finer pyramid (16×16), ~4.5–6× cost
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from common import Row, cnn_floor, machine, pixel_floor, row_config, run_table
from torch.utils.flop_counter import FlopCounterMode

from loraplex.config import from_dict
from loraplex.data import eval_batches
from loraplex.data.domains import dense_target_fn
from loraplex.eval.dense import PRIMARY, DenseMeter, delta_m
from loraplex.train.dist import Dist
from loraplex.train.runner import build_backbone, build_model, build_regime, domain_splits

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "scenes.yaml"
TASKS = ["semseg", "saliency", "normals", "depth"]
# what MTLoRA trains besides its LoRAs; the shared-LoRA row trains the same, so only the LoRA structure differs
NON_ATTENTION = ["patch_embed", "norm", "norm1", "norm2", "relative_position_bias_table", "downsample.reduction"]
# MTLoRA's TA-LoRA alone: scale 4 (alpha = 4 r at any rank), dropout 0.05 and non-attention trainables
SHARED_LORA = {"name": "lora", "rank": 8, "alpha": 32.0, "dropout": 0.05, "modules_to_save": NON_ATTENTION}
COLUMNS = [("semseg", "miou", "semseg mIoU ↑"), ("saliency", "maxf", "sal maxF ↑"), ("saliency", "miou", "sal mIoU ↑"),
           ("normals", "mean_angle", "normals mean° ↓"), ("normals", "rmse_angle", "normals rms° ↓"),
           ("depth", "rmse", "depth RMSE ↓")]  # fmt: skip


def rows(ranks: tuple[int, ...] = (4, 8, 16), img_size: int | None = None) -> list[Row]:
    full, lr = {"method": {"name": "full_finetune"}}, {"train": {"lr": 5e-4}}
    out = [cnn_floor(**({"img_size": img_size} if img_size else {}))]  # the CNN sees the same scenes
    out += [
        Row(f"single-task full FT · {t}", full, {"train": {"lr": 5e-4, "task_weights": {}}, "data": {"tasks": [t]}})
        for t in TASKS
    ]
    out += [
        Row("multi-task full FT", full, lr),
        Row("decoders only", {"method": {"name": "linear_probe"}}, {"train": {"lr": 2e-3}}),
    ]  # fmt: skip
    out += [Row(f"one shared LoRA (r={r})", {"method": {**SHARED_LORA, "rank": r, "alpha": 4.0 * r}}) for r in (8, 16)]
    out += [Row(f"MTLoRA (R={r}, r_t=4)", {"method": {"name": "mtlora", "rank": r, "task_rank": 4}}) for r in ranks]
    out.append(Row("MTLoRA+ (R=8, r_t=4)", {"method": {"name": "mtlora_plus", "rank": 8, "task_rank": 4}}))
    return out


def _coarse(maps: torch.Tensor, cells: int) -> torch.Tensor:
    """Maps averaged over a ``cells × cells`` grid, upsampled back bilinearly (as the dense heads upsample)."""
    pooled = F.adaptive_avg_pool2d(maps.float(), cells)
    return F.interpolate(pooled, size=maps.shape[-2:], mode="bilinear", align_corners=False)


def references(seeds: list[int], tweak) -> dict[str, list[dict]]:
    """Two reference rows on each seed's test split, no training.

    *Finest pyramid cell*: what a dense head can express when it predicts on the pyramid's finest map and
    upsamples bilinearly — the *true* maps averaged over each cell of that map (class one-hots for
    semseg, the mask for saliency), upsampled the same way (a reference, not a strict bound).
    *Constant maps*: the same prediction everywhere — background, a constant saliency, a flat surface
    facing the camera, the training split's mean depth — what a row scores when it learns nothing."""
    base = yaml.safe_load(CONFIG.read_text())
    tweak(base)
    ceiling, constant = [], []
    for seed in seeds:
        config = from_dict(row_config(base, Row("reference"), seed, Path("/tmp")))
        size = config.backbone.img_size
        with torch.no_grad():
            cells = build_backbone(config, load_weights=False)(torch.zeros(1, 3, size, size))[0].shape[-1]
        splits = domain_splits(config)
        target_of, _ = dense_target_fn(config.data.domains[0])
        packed = torch.cat([targets for _, targets in eval_batches(splits["test"][0], 500)])
        train_depth = torch.cat([target_of(t, "depth") for _, t in eval_batches(splits["train"][0], 500)]).mean()
        fine: dict[str, float] = {}
        flat: dict[str, float] = {}
        for task in TASKS:
            truth = target_of(packed, task)
            if task == "semseg":
                pred = _coarse(F.one_hot(truth, 21).permute(0, 3, 1, 2), cells)
                same = F.one_hot(torch.zeros_like(truth), 21).permute(0, 3, 1, 2)
            elif task == "saliency":
                pred = torch.logit(_coarse(truth[:, None], cells).clamp(1e-4, 1 - 1e-4))
                same = torch.zeros_like(truth[:, None])
            else:
                pred = _coarse(truth, cells)
                same = torch.zeros_like(truth)
                if task == "normals":
                    same[:, 2] = 1.0
                else:
                    same += train_depth
            for metrics, guess in ((fine, pred), (flat, same)):
                meter = DenseMeter(task, guess.shape[1])
                meter.update(guess, truth)
                metrics |= {f"{task}/{k}": v for k, v in meter.result().items()}
        for results, metrics in ((ceiling, fine), (constant, flat)):
            result = {"test": metrics}
            results.append({"best": result, "last": result, "params": {"trainable": 0}, "train_seconds": 0.0})
    return {"reference: true maps at the finest pyramid cell": ceiling, "reference: constant maps": constant}


def _cell(values: list[float], scale: float, digits: int = 2) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def _metric_cell(values: list[float], metric: str) -> str:
    """mIoU / maxF in %, angles in degrees (2 decimals), depth RMSE in scene depth units (3 decimals)."""
    return _cell(values, 100 if metric in ("miou", "maxf") else 1, 3 if metric == "rmse" else 2)


def markdown(table: dict[str, list[dict]], which: str = "best") -> str:
    """Per-task metrics (mean ± std over seeds), Δm against the mean single-task models, params, time."""
    single = {t: statistics.fmean(r[which]["test"][f"{t}/{PRIMARY[t][0]}"] for r in table[f"single-task full FT · {t}"])
              for t in TASKS}  # fmt: skip
    head = ["row", *[c[2] for c in COLUMNS], "Δm % ↑", "trainable params", "train s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    singles = [name for name in table if name.startswith("single-task")]
    for name, runs in table.items():
        if name in singles:
            if name == singles[0]:  # the four single-task models, as one row: each task's own model
                cells = [_metric_cell([r[which]["test"][f"{t}/{m}"] for r in table[f"single-task full FT · {t}"]], m)
                         for t, m, _ in COLUMNS]  # fmt: skip
                params = sum(table[s][0]["params"]["trainable"] for s in singles)
                seconds = sum(statistics.fmean(r["train_seconds"] for r in table[s]) for s in singles)
                lines.append(f"| single-task full FT ({len(singles)} models) | " + " | ".join(cells)
                             + f" | 0 | {params:,} | {seconds:.0f} |")  # fmt: skip
            continue
        cells = [_metric_cell([r[which]["test"][f"{t}/{m}"] for r in runs], m) for t, m, _ in COLUMNS]
        deltas = [delta_m({t: r[which]["test"][f"{t}/{PRIMARY[t][0]}"] for t in TASKS}, single) for r in runs]
        params = runs[0]["params"]["trainable"]
        seconds = statistics.fmean(r["train_seconds"] for r in runs)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(deltas, 1)} | {params:,} | {seconds:.0f} |")
    return "\n".join(lines)


# (first, second): the per-seed Δm differences that decide whether MTLoRA's structure beats a shared LoRA
PAIRS = [("MTLoRA (R=8, r_t=4)", "one shared LoRA (r=8)"), ("MTLoRA (R=16, r_t=4)", "one shared LoRA (r=16)"),
         ("MTLoRA (R=16, r_t=4)", "one shared LoRA (r=8)"), ("one shared LoRA (r=16)", "one shared LoRA (r=8)"),
         ("MTLoRA+ (R=8, r_t=4)", "MTLoRA (R=8, r_t=4)"), ("multi-task full FT", "one shared LoRA (r=8)")]  # fmt: skip


def paired(table: dict[str, list[dict]], which: str = "best") -> str:
    """Paired comparisons: a seed fixes the scenes, so per-seed differences of Δm remove the variance the
    seeds share (mean ± std of the difference, and in how many seeds the first row wins)."""
    single = {t: statistics.fmean(r[which]["test"][f"{t}/{PRIMARY[t][0]}"] for r in table[f"single-task full FT · {t}"])
              for t in TASKS}  # fmt: skip

    def dm(run: dict) -> float:
        return delta_m({t: run[which]["test"][f"{t}/{PRIMARY[t][0]}"] for t in TASKS}, single)

    lines = ["| comparison | Δm difference | wins |", "|---|---:|---:|"]
    for first, second in PAIRS:
        if first in table and second in table:
            diffs = [dm(a) - dm(b) for a, b in zip(table[first], table[second], strict=True)]
            wins = sum(d > 0 for d in diffs)
            lines.append(f"| {first} − {second} | {_cell(diffs, 1)} | {wins} / {len(diffs)} |")
    return "\n".join(lines)


# the paper's backbone (architecture only: random weights, nothing downloaded) at its scale, for the cost
PAPER_SCALE = {"backbone": {"name": "swin_tiny_patch4_window7_224", "img_size": 224, "pretrained": False},
               "batch_size": 4}  # fmt: skip


def step_cost(rounds: int, steps: int, paper_scale: bool = False) -> dict[str, float]:
    """Median over interleaved rounds of (MTLoRA step time) / (shared-LoRA step time), same batch."""
    base = yaml.safe_load(CONFIG.read_text())
    if paper_scale:
        base["backbone"] = PAPER_SCALE["backbone"]
        base["train"]["batch_size"] = PAPER_SCALE["batch_size"]
    models = {}
    for name, method in (("mtlora", {"name": "mtlora", "rank": 8, "task_rank": 4}),
                         ("shared LoRA", SHARED_LORA)):  # fmt: skip
        raw = copy.deepcopy(base) | {"method": method}
        raw["data"].update(train_per_domain=max(64, raw["train"]["batch_size"]), val_per_domain=8, test_per_domain=8)
        config = from_dict(raw)
        torch.manual_seed(0)
        model = build_model(config).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        models[name] = (model, optimizer, build_regime(config, Dist()))
    batch = models["mtlora"][2].next_batch()

    def one(name: str) -> float:
        model, optimizer, regime = models[name]
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss, _ = regime.loss(model, batch)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    def flops(name: str) -> int:  # forward + backward of one step: the work the ratio should follow
        model, _, regime = models[name]
        with FlopCounterMode(display=False) as counter:
            regime.loss(model, batch)[0].backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    work = flops("mtlora") / flops("shared LoRA")
    one("mtlora"), one("shared LoRA")  # warm-up
    ratios, times = [], {"mtlora": [], "shared LoRA": []}
    for _ in range(rounds):
        for name in times:
            times[name].append(one(name))
        ratios.append(times["mtlora"][-1] / times["shared LoRA"][-1])
    return {
        "flop_ratio (the extra work)": work,
        "ratio_median": statistics.median(ratios),
        "ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
        **{f"{name} s/step": statistics.median(values) for name, values in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/scenes"))
    parser.add_argument("--cost", action="store_true", help="measure the step-time ratio instead of the table")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--paper-scale", action="store_true", help="--cost on Swin-T at 224 px, batch 4")
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 steps, 48 training scenes")
    parser.add_argument("--img-size", type=int, default=None, help="scene and input size (default: the config's 32)")
    args = parser.parse_args()
    if args.cost:
        result = step_cost(2 if args.quick else args.rounds, 1 if args.quick else 5, args.paper_scale)
        setup = "Swin-T, 224 px, batch 4" if args.paper_scale else "configs/scenes.yaml's model and batch"
        text = f"Machine: {machine()}. {setup}.\n\n"
        text += "\n".join(f"- {k}: {v:.4f}" for k, v in result.items())
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / ("cost_paper_scale.md" if args.paper_scale else "cost.md")).write_text(text + "\n")
        return

    def tweak(base: dict) -> None:
        base["output"]["tensorboard"] = False
        if args.img_size:
            base["backbone"]["img_size"] = args.img_size
        if args.quick:
            base["train"].update(steps=6, warmup_steps=1, eval_every=3, checkpoint_every=3)
            base["data"].update(train_per_domain=48, val_per_domain=16, test_per_domain=16)

    seeds = args.seeds[:1] if args.quick else args.seeds
    table = references(seeds, tweak) | {"linear on raw 5×5 pixel patches": pixel_floor(CONFIG, seeds, tweak)}
    table |= run_table(CONFIG, rows(img_size=args.img_size), seeds, args.out, tweak)
    text = "\n\n".join(
        [
            f"Machine: {machine()}. Seeds: {seeds}. Config: configs/scenes.yaml",
            "Test metrics at the best validation step (mIoU / maxF in %):\n\n" + markdown(table, "best"),
            "Paired over seeds (per-seed difference of Δm):\n\n" + paired(table, "best"),
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "table.json").write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
