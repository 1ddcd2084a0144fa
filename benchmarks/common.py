"""Shared pieces of the accuracy benchmarks: run a table of (row × seed) configs through the real
training loop (resumable: a finished run is read back, not re-run), add the pixel floor, and print
mean ± std over seeds as Markdown."""

from __future__ import annotations

import copy
import json
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from loraplex.config import ConfigError, from_dict
from loraplex.data.dense import TASK_OUTPUTS
from loraplex.data.domains import dense_target_fn
from loraplex.eval.floors import dense_pixel_floor, pixel_logistic_regression
from loraplex.train.runner import check_run_dir, domain_splits, train


@dataclass
class Row:
    """One table row: a name and the config sections it replaces or updates in the base config."""

    name: str
    replace: dict[str, Any] = field(default_factory=dict)  # whole sections (e.g. a method)
    update: dict[str, dict[str, Any]] = field(default_factory=dict)  # keys within sections


def cnn_floor(**backbone: Any) -> Row:
    """The second floor of every table (benchmarks.md, "Reference floors"): a small CNN from scratch, same
    data and step budget as the rows it sits beside; ``backbone`` adds keys the benchmark's backbone needs
    (the video table's ``temporal_pooling: concat`` — with mean pooling no model can tell a motion from
    its reverse)."""
    return Row(
        "small CNN from scratch (resnet10t)",
        {"backbone": {"name": "resnet10t", "img_size": 32, **backbone}, "method": {"name": "full_finetune"}},
        {"train": {"lr": 1e-3}},
    )


DOWNSTREAM = {"fashion": (1000, 200, 2000), "mnist": (1000, 200, 2000), "emoji-held": (400, 100, 371),
              "clipart-held": (400, 100, 257)}  # fmt: skip
"""(train, val, test) images of each downstream set of the backbone benchmarks: fashion-1k and mnist-1k, and the
held-out parts of the pre-training sources (emoji sub-groups, clip-art categories no ``-seen`` backbone saw),
which are small (871 and 757 images), so test takes all that training and validation leave."""

LORA_LR = {"train": {"lr": 2e-3}}
PAPER_TARGETS = ["attn.qkv"]  # seed 000 adapts the fused qkv of every block


def method_rows() -> list[Row]:
    """The two full-model baselines every multi-domain table starts with."""
    return [
        Row("linear probe", {"method": {"name": "linear_probe"}}, {"train": {"lr": 5e-3}}),
        Row("full fine-tuning", {"method": {"name": "full_finetune"}}, {"train": {"lr": 5e-4}}),
    ]


def subspace_rows(rank: int = 8, targets: list[str] = PAPER_TARGETS) -> list[Row]:
    """Seed 000's comparison: shared only, domain only, shared + domain unconstrained and in separate
    subspaces of W, each of the last two with uniform and upper-heavy placement of the domain LoRAs."""

    def method(name: str, **kw: object) -> dict:
        return {"method": {"name": name, "rank": rank, "target_modules": targets, **kw}}

    rows = [
        Row(f"shared only (r={rank})", method("lora"), LORA_LR),
        Row(f"domain only (r={rank})", method("lora_per_task"), LORA_LR),
    ]
    for constraint in ("none", "subspace"):
        for placement in ("uniform", "upper_heavy"):
            name = f"shared + domain · {constraint} · {placement.replace('_', '-')}"
            rows.append(Row(name, method("shared_specific", constraint=constraint, placement=placement), LORA_LR))
    return rows


def row_config(base: dict, row: Row, seed: int, out_dir: Path) -> dict:
    raw = copy.deepcopy(base)
    raw.update(copy.deepcopy(row.replace))
    for section, values in row.update.items():
        raw.setdefault(section, {}).update(values)
    raw["train"]["seed"] = seed
    raw["data"]["seed"] = seed
    raw.setdefault("output", {})["dir"] = str(out_dir / row.name / f"seed{seed}")
    return raw


def run_table(
    base_path: Path, rows: list[Row], seeds: list[int], out_dir: Path, tweak: Callable[[dict], None] | None = None
) -> dict[str, list[dict]]:
    """Train every (row, seed); returns ``{row: [results.json of each seed]}``.  A finished run is read back only if
    it was trained with this recipe (else the error names what differs): a table never mixes in stale runs."""
    base = yaml.safe_load(base_path.read_text())
    if tweak is not None:
        tweak(base)
    table: dict[str, list[dict]] = {}
    for row in rows:
        for seed in seeds:
            config = from_dict(row_config(base, row, seed, out_dir))
            done = Path(config.output.dir) / "results.json"
            print(f"== {row.name} seed {seed}", flush=True)
            if done.exists():
                try:
                    check_run_dir(config)
                except ConfigError as err:
                    note = "a table reads finished runs back: delete that run to train it anew"
                    raise SystemExit(f"{err}\n({note})") from None
            results = json.loads(done.read_text()) if done.exists() else train(config)
            table.setdefault(row.name, []).append(results)
    return table


def pixel_floor(base_path: Path, seeds: list[int], tweak: Callable[[dict], None] | None = None) -> list[dict]:
    """Logistic regression on raw pixels on exactly the runs' splits, one result per seed (for a dense
    multitask config, the per-pixel linear models of ``dense_pixel_floor``)."""
    base = yaml.safe_load(base_path.read_text())
    if tweak is not None:
        tweak(base)
    out = []
    for seed in seeds:
        config = from_dict(row_config(base, Row("pixels"), seed, Path("/tmp")))
        splits = domain_splits(config)
        if config.train.regime == "multitask":
            target_of, _ = dense_target_fn(config.data.domains[0])
            test = dense_pixel_floor(splits, config.data.tasks, TASK_OUTPUTS, target_of, seed)
        else:
            test = pixel_logistic_regression(splits["train"], splits["val"], splits["test"])
        out.append({"best": {"test": test}, "last": {"test": test}, "params": {"trainable": 0}, "train_seconds": 0.0})
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown(table: dict[str, list[dict]], domains: list[str], which: str = "best") -> str:
    """Test accuracy (%) per domain and mean, mean ± std over seeds; trainable params; train time."""
    keys = [f"acc/{d}" for d in domains] + ["acc/mean"]
    head = ["row", *[k.split("/")[1] for k in keys], "trainable params", "train s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for name, runs in table.items():
        cells = [_mean_std([100 * r[which]["test"][k] for r in runs]) for k in keys]
        params = runs[0]["params"]["trainable"]
        seconds = statistics.fmean(r["train_seconds"] for r in runs)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {params:,} | {seconds:.0f} |")
    return "\n".join(lines)


def analyze_runs(out_dir: Path, rows: list[str], seed: int, figures: Path) -> list[Path]:
    """``loraplex analyze`` on one seed of ``rows`` (best adapters), written into each run directory (where
    ``loraplex report`` finds it) and its plots copied to ``figures/<row>/`` for BENCHMARKS.md."""
    from loraplex.eval.analysis import ANALYSIS_DIR, write_analysis
    from loraplex.train.runner import load_run

    written = []
    for row in rows:
        run = out_dir / row / f"seed{seed}"
        config, model = load_run(run, "best")
        result = write_analysis(
            model, run / ANALYSIS_DIR, config.method.get("k"), run=str(run), method=config.method_name, which="best"
        )
        target = figures / row.replace(" · ", "_").replace(" ", "_").replace("+", "and")
        target.mkdir(parents=True, exist_ok=True)
        for figure in result["figures"]:
            shutil.copyfile(run / ANALYSIS_DIR / figure["file"], target / figure["file"])
        written.append(target)
    return written


def write_tables(out_dir: Path, header: str, table: dict[str, list[dict]], domains: list[str]) -> str:
    """Best-on-validation and last-step tables as Markdown (printed and written with the raw JSON)."""
    text = "\n\n".join(
        [
            header,
            "Test accuracy (%) at the best validation step:\n\n" + markdown(table, domains, "best"),
            "Test accuracy (%) at the last step:\n\n" + markdown(table, domains, "last"),
        ]
    )
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(text + "\n")
    (out_dir / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    return text


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = f"{names[0]} × {len(names)}" if names else cpu
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}"


def interleaved_seconds(steps: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Mean seconds of each callable, timed in turn round after round (after ``warmup`` rounds), so drift of a noisy
    machine hits every contender alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps + warmup):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.fmean(t) for name, t in times.items()}
