"""Few-shot transfer (benchmarks.md #5, CLoRA; VTAB-1K's protocol at small scale): accuracy against trainable
parameters for LoRA at several ranks and CLoRA at several p, with and without SADE, beside CLoRA#, ARC, the linear
probe and full fine-tuning.

Each set is one task of 1,000 training images and its test split: fashion-1k, mnist-1k, digits-1k and the held-out
parts of the zoo's pre-training sources (emoji sub-groups and clip-art categories no ``-seen`` backbone saw; these
hold 871 and 757 images, so their "1k" is the 500 their test split leaves, searched as 400 / 100).  Every
row on the zoo ViT ``vit_debian3_tiny`` (the strongest measured: docs/pretraining.md "Recipe 3"); adapter rows on the
paper's d×d sites (the q and v rows of every block's fused qkv), r = 8 for CLoRA.  No per-task hyper-parameter
search at this scale (the paper searches lr, weight decay and p): one lr per kind of row, said in the table.
Every run 300 steps of batch 32 (9,600 images, 12 passes over 800): LoRA r = 8 on fashion, seed 0, tested 74.2 %
there, 74.8 % at batch 64 (twice the compute) and 72.5 % at 150 steps of 32 — half the compute of batch 64 for
0.6 point, so the 420 runs of the table take about 8 core-hours.

VTAB-1K's two stages, per (set, row, seed): the search trains on 800 images and scores 200 (VTAB's train800 /
val200), every run the same steps, and picks the best validation step s*; the final stage then trains on all 1,000
(``data.val_per_domain: 0``, no validation split) for s* steps — warm-up min(``TRAIN`` warm-up, s* − 1), cosine over
s* — with the same row settings and seed, and its last step is the model.  The first table reports the final
stage's test accuracy, the second the search's (at s*, each seed's s* beside it).  The 1,000 are drawn from the
set's training pool with the run's seed, stratified, like every split; where the pool holds more (fashion, mnist,
digits) they are not exactly the search's 800 + 200 (a split draws validation first), the same task sampled again:
what carries over is s*.  A final run lies in ``final/<s*>steps/``, so a search that chooses another step later
trains anew rather than continuing a run of other length.

    python benchmarks/few_shot.py                       # 3 seeds, every set and row
    python benchmarks/few_shot.py --sets fashion --rows CLoRA
    python benchmarks/few_shot.py --sade-cost           # SADE per step: weight-only vs sample-dependent
    python benchmarks/few_shot.py --quick

Finished runs (of both stages) are read back, not re-run.  With ``--rows`` the tables are printed, not written.
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
SETS = {"fashion": (800, 200, 2000), "mnist": (800, 200, 2000), "digits": (800, 200, 597),
        "emoji-held": (400, 100, 371), "clipart-held": (400, 100, 257)}  # fmt: skip
"""(search train, search val, test) images of each set.  The held-out sets are small (871 and 757 images): their
"1k" is the 500 that the test split (common.DOWNSTREAM's) leaves, searched as 400 / 100."""
SITES = list(QV_TARGETS)
ADAPTER_LR, FULL_LR, PROBE_LR = 2e-3, 5e-4, 5e-3
BACKBONE = "vit_debian3_tiny"
TRAIN = {"steps": 300, "batch_size": 32, "warmup_steps": 30, "eval_every": 50, "checkpoint_every": 100}


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


def base_config(name: str, quick: bool) -> dict:
    train = dict(TRAIN, steps=20, warmup_steps=2, eval_every=10, checkpoint_every=10) if quick else dict(TRAIN)
    n_train, n_val, test = SETS[name]
    return {
        "backbone": {"name": BACKBONE, "img_size": 32},
        "method": {"name": "lora"},
        "data": {
            "domains": [name],
            "train_per_domain": 100 if quick else n_train,
            "val_per_domain": 20 if quick else n_val,
            "test_per_domain": min(test, 100) if quick else test,
        },
        "train": train,
        "output": {"tensorboard": False},
    }


def plot(summary: dict[str, dict[str, tuple[float, int]]], path: Path, pixels: float | None) -> None:
    """Mean test accuracy over the sets against trainable parameters (log scale), one curve per method family, under
    the raw-pixel floor (``pixels``) when known: a row below that line has not beaten logistic regression."""
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
    if pixels is not None:
        ax.axhline(pixels, color="grey", linestyle="--", linewidth=1, label="logistic regression on raw pixels")
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


Stage = dict[str, dict[str, list[dict]]]
"""One stage's results: row → set → the results.json of each seed."""


def final_stage(config: Path, row: Row, seed: int, steps: int, out: Path) -> dict:
    """VTAB-1K's last stage for one (row, seed) of a set: all of the set's training images (the search's train + val
    counts, no validation split) for the ``steps`` its search chose, the schedule fitted to them."""

    def all_images(base: dict) -> None:
        data, train = base["data"], base["train"]
        data.update(train_per_domain=data["train_per_domain"] + data["val_per_domain"], val_per_domain=0)
        train.update(steps=steps, warmup_steps=min(train["warmup_steps"], steps - 1))

    # the step count names the directory: a final run is never continued to another length
    (results,) = run_table(config, [row], [seed], out / "final" / f"{steps}steps", all_images)[row.name]
    return results


def accuracies(runs: list[dict]) -> list[float]:
    return [100 * r["best"]["test"]["acc/mean"] for r in runs]


def stage_table(sets: list[str], stage: Stage, floor: str, chosen: bool) -> str:
    """Mean ± std test accuracy (%) over seeds per set and the mean over sets, under a ``floor`` row when given;
    ``chosen``: each cell also gives the step every seed's validation chose."""
    lines = ["| row | trainable | " + " | ".join(sets) + " | mean |", "|---|---:|" + "---:|" * (len(sets) + 1)]
    lines += [floor] if floor else []
    for row, by_set in stage.items():
        cells = []
        for name in sets:
            accs, runs = accuracies(by_set[name]), by_set[name]
            std = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
            steps = f" (s* {'/'.join(str(r['best_step']) for r in runs)})" if chosen else ""
            cells.append(f"{statistics.fmean(accs):.1f}{std}{steps}")
        mean = statistics.fmean(statistics.fmean(accuracies(by_set[name])) for name in sets)
        params = by_set[sets[0]][0]["params"]["trainable"]
        lines.append(f"| {row} | {params:,} | " + " | ".join(cells) + f" | {mean:.1f} |")
    return "\n".join(lines)


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
    search_cfg = base_config(args.sets[0], args.quick)  # the schedule of every set
    counts = "100 / 20" if args.quick else "800 / 200; 400 / 100 for the held-out sets"
    out = ROOT / "runs" / "bench" / ("few_shot_quick" if args.quick else "few_shot")
    table_rows = {r.name: r for r in rows() if args.rows is None or args.rows in r.name}
    search: Stage = {}
    final: Stage = {}
    pixels = []
    for name in args.sets:
        config = out / name / "base.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(base_config(name, args.quick)))
        for row, runs in run_table(config, list(table_rows.values()), seeds, out / name).items():
            search.setdefault(row, {})[name] = runs
            final.setdefault(row, {})[name] = [
                final_stage(config, table_rows[row], seed, r["best_step"], out / name)
                for seed, r in zip(seeds, runs, strict=True)
            ]
        if not args.rows:
            pixels.append(100 * statistics.fmean(r["best"]["test"]["acc/mean"] for r in pixel_floor(config, seeds)))
    floor = ""
    if pixels:
        floor = ("| logistic regression on raw pixels (search train, C chosen on search val) | 0 | "
                 + " | ".join(f"{a:.1f}" for a in pixels) + f" | {statistics.fmean(pixels):.1f} |")  # fmt: skip
    text = (f"Machine: {machine()}. Seeds: {seeds}. Search {search_cfg['train']}; lr adapters {ADAPTER_LR}, full "
            f"{FULL_LR}, probe {PROBE_LR}; trainable = adapter + head on {args.sets[0]}.\n\n"
            f"VTAB-1K's final stage: test accuracy (%) after training on all of a set's search images ({counts}) "
            "with no validation split "
            f"for the s* steps the search chose (warm-up min({search_cfg['train']['warmup_steps']}, s* − 1), cosine "
            f"over s*).\n\n{stage_table(args.sets, final, floor, chosen=False)}\n\n"
            f"Search stage ({counts}): test accuracy (%) at the best validation step s* (each seed's "
            f"s* in brackets).\n\n{stage_table(args.sets, search, '', chosen=True)}")  # fmt: skip
    print(text)
    if args.rows:  # a partial table: the full one and its plot stay as they were
        return
    (out / "table.md").write_text(text + "\n")
    summary = {row: {name: (statistics.fmean(accuracies(runs)), runs[0]["params"]["trainable"])
                     for name, runs in by_set.items()} for row, by_set in final.items()}  # fmt: skip
    plot(summary, ROOT / "docs" / "figures" / f"few_shot{'_quick' if args.quick else ''}.png",
         statistics.fmean(pixels) if pixels else None)  # fmt: skip


if __name__ == "__main__":
    main()
