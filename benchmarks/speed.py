"""Interleaved speed benchmark: loraplex vs PEFT LoRA on a small timm ViT-S (CPU), eager and compiled.

Every configuration is timed in the same process, round-robin: each of ``--rounds`` rounds visits
every configuration once (in a seeded random order, so no configuration always follows the same
neighbour) and times ``--iters`` batches.  Two summaries per row: the median of per-round ratios —
inference rows against the plain frozen backbone, training rows against one shared LoRA — and the
ratio of the row's fastest round to the reference's fastest round (the minimum over rounds is what
an outside load cannot raise, so it is the steadier figure on a shared machine; the targets use it).

Compiled rows (``…_compiled``) run ``torch.compile`` (inductor, CPU) on their own model instances
with the same weights; their reference is the compiled backbone (inference) or the compiled one-LoRA
training step, so the overhead of the adapters is read within each mode.

Before timing, the script checks that the configurations compute what they claim: PEFT's adapters
hold copies of loraplex's (random, non-zero) factors, so PEFT's mixed batch, each loraplex strategy,
the compiled models and the merged model must all agree with a per-sample reference.

    python benchmarks/speed.py                  # full run (about 35 minutes on 2 idle cores)
    python benchmarks/speed.py --quick          # smoke run: depth-2 ViT, 2 rounds, 1 iteration
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import peft
import timm
import torch
from torch import nn
from tqdm import tqdm

import loraplex as lp

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
RANK = 8
STRATEGIES = ("slices", "bmm", "masked")
SIZES = (8, 32)
NUM_CLASSES = 10
TRAIN_RATIO_LIMIT = 1.15
MERGED_NOISE_FLOOR = 0.02  # |ratio - 1| below this always counts as "within noise"
COMPILED = "_compiled"  # rows run through torch.compile (inductor); their references are compiled too

Kind = Literal["inference", "training"]


@dataclass
class Settings:
    """What is measured and how often."""

    depth: int = 12
    batch: int = 64
    threads: int = 2
    rounds: int = 15
    iters: int = 5
    train_iters: int = 2
    warmup: int = 2
    seed: int = 0


@dataclass
class Case:
    """One timed configuration: ``step`` runs one batch; ``session`` wraps a round's timed loop
    (entered before the clock starts, e.g. to merge adapters)."""

    name: str
    kind: Kind
    step: Callable[[], object]
    session: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class Row:
    """Summary of one configuration over all rounds."""

    name: str
    kind: Kind
    reference: str
    ms: list[float]
    ratios: list[float]
    reference_ms: list[float]
    ms_mean: float = field(init=False)
    ms_std: float = field(init=False)
    ms_min: float = field(init=False)
    ratio_mean: float = field(init=False)
    ratio_std: float = field(init=False)
    ratio_median: float = field(init=False)
    overhead: float = field(init=False)
    ratio_min: float = field(init=False)
    overhead_min: float = field(init=False)

    def __post_init__(self) -> None:
        self.ms_mean, self.ms_std = _mean_std(self.ms)
        self.ms_min = min(self.ms)
        self.ratio_mean, self.ratio_std = _mean_std(self.ratios)
        # the median of the per-round ratios: one round hit by an outside load cannot move it
        self.ratio_median = statistics.median(self.ratios)
        self.overhead = self.ratio_median - 1.0
        # fastest round against the reference's fastest round: what an outside load cannot raise
        self.ratio_min = self.ms_min / min(self.reference_ms)
        self.overhead_min = self.ratio_min - 1.0


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ---- models -------------------------------------------------------------------------------------
def make_backbone(settings: Settings) -> nn.Module:
    """A fresh ViT-S (dim 384, 6 heads) on 32×32 inputs; the same weights on every call."""
    torch.manual_seed(settings.seed)
    return timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4, depth=settings.depth
    )


def make_loraplex(method: str, n_tasks: int, settings: Settings) -> lp.AdaptedModel:
    """A loraplex model on a fresh backbone with every adapter factor random and non-zero."""
    cfg = lp.make_config(method, tasks=[f"t{i}" for i in range(n_tasks)], rank=RANK, target_modules=TARGETS)
    model = lp.wrap(make_backbone(settings), cfg, heads={t: NUM_CLASSES for t in cfg.tasks})
    generator = torch.Generator().manual_seed(settings.seed + n_tasks)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".groups." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


def make_peft(source: lp.AdaptedModel, n_adapters: int, settings: Settings) -> peft.PeftModel:
    """A PEFT LoRA model on a fresh backbone whose adapter ``a<k>`` copies ``source``'s task ``k``."""

    def config() -> peft.LoraConfig:
        return peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS)

    model = peft.get_peft_model(make_backbone(settings), config(), adapter_name="a0")
    for k in range(1, n_adapters):
        model.add_adapter(f"a{k}", config())
    base = model.get_base_model()
    with torch.no_grad():
        for name, layer in source.adapted_layers().items():
            a, b = layer.groups["task"].factors()
            target = base.get_submodule(name)
            for k in range(n_adapters):
                target.lora_A[f"a{k}"].weight.copy_(a[k])
                target.lora_B[f"a{k}"].weight.copy_(b[k])
    return model.eval()


def assignment(n_tasks: int, settings: Settings) -> torch.Tensor:
    """Task id per sample: balanced (round-robin), then shuffled with a fixed seed."""
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.arange(settings.batch) % n_tasks
    return ids[torch.randperm(settings.batch, generator=generator)]


# ---- correctness --------------------------------------------------------------------------------
@torch.inference_mode()
def verify(
    x: torch.Tensor,
    lp_models: dict[int, lp.AdaptedModel],
    peft_models: dict[int, peft.PeftModel],
    peft_one: peft.PeftModel,
    ids: dict[int, torch.Tensor],
    compiled: dict[int, lp.AdaptedModel],
) -> dict[str, float]:
    """Max abs difference of every timed path from a per-sample reference; raises if any is off.

    The reference runs each sample alone through loraplex's homogeneous path (compiled models are held
    to the eager mixed batch, itself checked against that reference).  PEFT's mixed output must also
    differ from its single-adapter output, which proves the mixed path actually ran."""
    errors: dict[str, float] = {}
    sample = slice(0, min(16, x.shape[0]))
    xs = x[sample]
    for n, model in lp_models.items():
        sample_ids = ids[n][sample]
        reference = torch.cat([model.forward_features(xs[i : i + 1], task=int(t)) for i, t in enumerate(sample_ids)])
        names = [f"a{int(t)}" for t in sample_ids]
        mixed = peft_models[n](xs, adapter_names=names)
        errors[f"peft_mixed_{n}"] = (mixed - reference).abs().max().item()
        single = peft_models[n](xs)  # adapter a0 for every sample
        if torch.allclose(single, mixed, atol=1e-5):
            raise RuntimeError(f"PEFT with {n} adapters ignored adapter_names: the mixed path did not run")
        for strategy in STRATEGIES:
            model.mixed_strategy = strategy
            out = model.forward_features(xs, task=sample_ids)
            errors[f"lp_mixed_{n}_{strategy}"] = (out - reference).abs().max().item()
    for n, model in compiled.items():  # the whole batch, as timed (a smaller one would compile another graph)
        lp_models[n].mixed_strategy = "bmm"
        eager = lp_models[n].forward_features(x, task=ids[n])
        errors[f"lp_mixed_{n}_bmm_compiled"] = (model.forward_features(x, task=ids[n]) - eager).abs().max().item()
    model = lp_models[SIZES[0]]
    homog = model.forward_features(xs, task="t0")
    errors["peft_one"] = (peft_one(xs) - homog).abs().max().item()
    with model.merged(task="t0"):
        errors["lp_merged"] = (model.forward_features(xs, task="t0") - homog).abs().max().item()
    scale = homog.abs().max().item()
    bad = {k: v for k, v in errors.items() if not v <= 1e-4 * max(scale, 1.0)}
    if bad:
        raise RuntimeError(f"paths disagree with the per-sample reference (max |out| = {scale:.3g}): {bad}")
    return errors


# ---- cases --------------------------------------------------------------------------------------
def build_cases(settings: Settings) -> tuple[list[Case], dict[str, float]]:
    """Build every model and the list of timed configurations; also run :func:`verify`."""
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(settings.batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (settings.batch,), generator=generator)
    ids = {n: assignment(n, settings) for n in SIZES}
    names = {n: [f"a{int(t)}" for t in ids[n]] for n in SIZES}

    backbone = make_backbone(settings).eval()
    lp_infer = {n: make_loraplex("lora_per_task", n, settings).eval() for n in SIZES}
    peft_mixed = {n: make_peft(lp_infer[n], n, settings) for n in SIZES}
    peft_one = make_peft(lp_infer[SIZES[0]], 1, settings)
    compiled_backbone = make_backbone(settings).eval()
    compiled_backbone.compile()
    lp_compiled = {n: make_loraplex("lora_per_task", n, settings).eval() for n in SIZES}
    for model in lp_compiled.values():
        model.compile()
    errors = verify(x, lp_infer, peft_mixed, peft_one, ids, lp_compiled)

    cases = [
        Case("backbone", "inference", lambda: backbone(x)),
        Case("backbone_compiled", "inference", lambda: compiled_backbone(x)),
        Case("peft_one", "inference", lambda: peft_one(x)),
    ]
    for n in SIZES:
        cases.append(Case(f"peft_mixed_{n}", "inference", lambda n=n: peft_mixed[n](x, adapter_names=names[n])))
    homog = lp_infer[SIZES[0]]
    cases.append(Case("lp_homog", "inference", lambda: homog.forward_features(x, task="t0")))
    for n in SIZES:
        for s in STRATEGIES:
            cases.append(Case(f"lp_mixed_{n}_{s}", "inference", _lp_mixed_step(lp_infer[n], x, ids[n], s)))
    for n in SIZES:
        cases.append(Case(f"lp_mixed_{n}_bmm_compiled", "inference", _lp_mixed_step(lp_compiled[n], x, ids[n], "bmm")))
    cases.append(
        Case("lp_merged", "inference", lambda: homog.forward_features(x, task="t0"), lambda: homog.merged(task="t0"))
    )

    for suffix in ("", COMPILED):
        one_lora = make_loraplex("lora", SIZES[0], settings).train()
        if suffix:
            one_lora.compile()
        cases.append(Case(f"train_one_lora{suffix}", "training", _train_one_step(one_lora, x, y)))
    for n in SIZES:
        model = make_loraplex("lora_per_task", n, settings).train()
        for s in STRATEGIES:
            cases.append(Case(f"train_mixed_{n}_{s}", "training", _train_mixed_step(model, x, y, ids[n], s)))
        compiled = make_loraplex("lora_per_task", n, settings).train()
        compiled.compile()
        cases.append(
            Case(f"train_mixed_{n}_bmm{COMPILED}", "training", _train_mixed_step(compiled, x, y, ids[n], "bmm"))
        )
    return cases, errors


def _lp_mixed_step(model: lp.AdaptedModel, x: torch.Tensor, ids: torch.Tensor, strategy: str) -> Callable[[], object]:
    def step() -> torch.Tensor:
        model.mixed_strategy = strategy
        return model.forward_features(x, task=ids)

    return step


def _train_one_step(model: lp.AdaptedModel, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x, task="t0"), y).backward()

    return step


def _train_mixed_step(
    model: lp.AdaptedModel, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, strategy: str
) -> Callable[[], object]:
    def step() -> None:
        model.mixed_strategy = strategy
        model.zero_grad(set_to_none=True)
        model(x, task=ids).loss(y).backward()

    return step


# ---- timing -------------------------------------------------------------------------------------
def time_case(case: Case, iters: int) -> float:
    """Mean seconds per batch over ``iters`` batches (the session is entered before timing)."""
    grad_mode = torch.inference_mode() if case.kind == "inference" else contextlib.nullcontext()
    with case.session(), grad_mode:
        start = time.perf_counter()
        for _ in range(iters):
            case.step()
        return (time.perf_counter() - start) / iters


def measure(cases: list[Case], settings: Settings) -> dict[str, list[float]]:
    """Warm every case up, then time them all round-robin for ``settings.rounds`` rounds."""
    for case in tqdm(cases, desc="warm-up", leave=False):
        time_case(case, settings.warmup)
    order = random.Random(settings.seed)
    times: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in tqdm(range(settings.rounds), desc="rounds"):
        for case in order.sample(cases, len(cases)):
            iters = settings.iters if case.kind == "inference" else settings.train_iters
            times[case.name].append(time_case(case, iters))
    return times


def summarise(cases: list[Case], times: dict[str, list[float]]) -> list[Row]:
    """Ratios against the backbone (inference) or the one-LoRA training step (training), compiled rows
    against the compiled reference."""
    references = {"inference": "backbone", "training": "train_one_lora"}
    rows = []
    for case in cases:
        ref = references[case.kind] + (COMPILED if case.name.endswith(COMPILED) else "")
        ratios = [t / r for t, r in zip(times[case.name], times[ref], strict=True)]
        ms = [1e3 * t for t in times[case.name]]
        rows.append(Row(case.name, case.kind, ref, ms, ratios, [1e3 * t for t in times[ref]]))
    return rows


# ---- report -------------------------------------------------------------------------------------
def target_checks(rows: list[Row]) -> list[dict]:
    """The targets, on fastest-round figures: mixed overhead ≤ ½ PEFT's (and what fraction of PEFT's it is),
    merged ≈ backbone, mixed training ≤ 1.15 × one LoRA."""
    by = {r.name: r for r in rows}
    checks = []

    def add(target: str, value: float, limit: float, passed: bool) -> None:
        checks.append({"target": target, "value": value, "limit": limit, "passed": bool(passed)})

    for n in SIZES:
        peft_overhead = by[f"peft_mixed_{n}"].overhead_min
        for s in STRATEGIES:
            overhead = by[f"lp_mixed_{n}_{s}"].overhead_min
            add(f"lp_mixed_{n}_{s} overhead ≤ ½ peft_mixed_{n} overhead", overhead, 0.5 * peft_overhead,
                overhead <= 0.5 * peft_overhead)  # fmt: skip
        fraction = by[f"lp_mixed_{n}_bmm"].overhead_min / peft_overhead
        add(f"lp_mixed_{n}_bmm overhead / peft_mixed_{n} overhead", fraction, 0.5, fraction <= 0.5)
    merged = by["lp_merged"]
    noise = max(2 * merged.ratio_std, MERGED_NOISE_FLOOR)
    add("|lp_merged ratio − 1| ≤ max(2σ, 2%) (within noise of backbone)", abs(merged.overhead_min), noise,
        abs(merged.overhead_min) <= noise)  # fmt: skip
    for n in SIZES:
        for s in STRATEGIES:
            ratio = by[f"train_mixed_{n}_{s}"].ratio_min
            add(f"train_mixed_{n}_{s} ≤ {TRAIN_RATIO_LIMIT} × train_one_lora", ratio, TRAIN_RATIO_LIMIT,
                ratio <= TRAIN_RATIO_LIMIT)  # fmt: skip
    return checks


def markdown(rows: list[Row], checks: list[dict]) -> str:
    """The results table and the target checks as Markdown."""
    lines = [
        "| row | ms/batch mean ± std | ms/batch min | ratio median (per round) | ratio of minima | vs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.ms_mean:.1f} ± {r.ms_std:.1f} | {r.ms_min:.1f} | {r.ratio_median:.3f} "
            f"| {r.ratio_min:.3f} | {r.reference} |"
        )
    lines += ["", "| target (fastest rounds) | value | limit | pass |", "|---|---:|---:|:---:|"]
    for c in checks:
        lines.append(f"| {c['target']} | {c['value']:.3f} | {c['limit']:.3f} | {'yes' if c['passed'] else 'NO'} |")
    return "\n".join(lines)


def machine_info(settings: Settings) -> dict:
    """Platform, CPU model and library versions of this run."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": peft.__version__,
        "loraplex": lp.__version__,
        "threads": torch.get_num_threads(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="round-robin rounds")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="timed batches per inference case per round")
    parser.add_argument(
        "--train-iters", type=int, default=defaults.train_iters, help="timed batches per training case per round"
    )
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed batches per case before round 1")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: depth-2 ViT, 2 rounds, 1 iteration")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"), help="JSON results file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        rounds=args.rounds, iters=args.iters, train_iters=args.train_iters, warmup=args.warmup, threads=args.threads
    )
    if args.quick:
        settings = Settings(depth=2, rounds=2, iters=1, train_iters=1, warmup=1, threads=args.threads)
    torch.set_num_threads(settings.threads)
    cases, errors = build_cases(settings)
    rows = summarise(cases, measure(cases, settings))
    checks = target_checks(rows)
    print(markdown(rows, checks))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine_info(settings),
        "settings": asdict(settings) | {"quick": args.quick, "rank": RANK, "targets": TARGETS, "sizes": SIZES},
        "max_abs_error": errors,
        "rows": [asdict(r) for r in rows],
        "checks": checks,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
