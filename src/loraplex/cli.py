"""``loraplex`` command line: ``train``, ``eval``, ``params``, ``analyze``, ``export``, ``report``, ``pretrain``.

Every command that reads a config accepts ``--set section.key=value`` overrides.  Errors a user can
fix (bad config keys, missing or unreadable data, wrong or damaged adapter files and checkpoints, a run
directory in use, a full disk) print one clear line and exit with status 2; a diverged run exits with 1.
Multi-process training: ``torchrun --nproc_per_node=2 -m loraplex train CONFIG``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML config (sections backbone, method, data, train, output)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable); the value is read as YAML",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .train.runner import train

    config = load_config(args.config, args.overrides)
    results = train(config, progress=not args.no_progress)
    if results:
        print(_results_table(results))
        print(f"run directory: {config.output.dir}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train.runner import pretrain

    config = load_config(args.config, args.overrides)
    entry = pretrain(config, progress=not args.no_progress, overwrite=args.overwrite)
    if entry is not None:
        print(f"zoo entry written: {entry} (use it as backbone.name: {config.output.zoo_name})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.runner import evaluate_run

    metrics = evaluate_run(args.run_dir, which=args.which, split_name=args.split, device=args.device)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for key, value in metrics.items():
            print(f"{key:24s} {value:.4f}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from .api import count_parameters
    from .methods import get_method
    from .train.runner import build_model

    config = load_config(args.config, args.overrides)
    model = build_model(config, load_weights=False)
    counts = count_parameters(model)
    if config.train.regime == "continual":  # what one task trains, beside the whole sequence's
        from .train.runner import method_config

        counts["per_task"] = get_method(config.method_name).continual(method_config(config)).per_task_parameters(model)
    if args.json:
        print(json.dumps(counts))
    else:
        for key, value in counts.items():
            print(f"{key:10s} {value:>14,d}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .api import export_peft
    from .train.runner import load_run

    _, model = load_run(args.run_dir, which=args.which, device=args.device)
    try:
        model.task_index(args.task)
    except ValueError as err:
        raise ConfigError(f"--task: {err}") from err
    out = args.out or Path(args.run_dir) / f"peft-{args.task}"
    try:
        export_peft(model, out, task=args.task, include_head=args.include_head)
    except ValueError as err:  # a method whose deltas are not one fixed LoRA per task
        raise ConfigError(f"{args.run_dir} cannot be exported as a PEFT LoRA: {err}") from err
    print(f"PEFT LoRA for task {args.task!r} written to {out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .eval.analysis import ANALYSIS_DIR, write_analysis
    from .eval.gates import analyze_gates, gate_table, has_fixed_deltas, write_without_deltas
    from .train.runner import load_run

    if args.gate_samples < 1:
        raise ConfigError(f"--gate-samples must be ≥ 1, got {args.gate_samples}")
    config, model = load_run(args.run_dir, which=args.which, device=args.device)
    k = args.k if args.k is not None else config.method.get("k")
    out = args.run_dir / ANALYSIS_DIR
    meta = {"run": str(args.run_dir), "method": config.method_name, "which": args.which}
    if model.router is not None:
        meta["gates"] = analyze_gates(config, model, out, samples=args.gate_samples)
    if has_fixed_deltas(model):
        result = write_analysis(model, out, k, **meta)
        print(f"{'branch':24s} {'layers':>6s} {'col. energy':>11s} {'eff. rank':>9s}")
        for row in result["summary"]:
            energy = "—" if row["energy_column"] is None else f"{row['energy_column']:.3f}"
            print(f"{row['branch']:24s} {row['layers']:6d} {energy:>11s} {row['effective_rank']:9.2f}")
    else:
        result = write_without_deltas(model, out, **meta)
        print("\n".join(result["notes"]))
    if "gates" in result:
        print(gate_table(result["gates"]))
    print(f"analysis written to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .eval.report import write_report

    html, markdown = write_report([Path(d) for d in args.run_dirs], args.out)
    print(f"report: {html}\nmarkdown: {markdown}")
    return 0


def _results_table(results: dict) -> str:
    if results.get("regime") == "continual":
        from .eval.continual import results_table

        return results_table(results)
    best, last = results["best"]["test"], results["last"]["test"]
    lines = [f"{'test metric':24s} {'best-val':>9s} {'last':>9s}"]
    lines += [f"{key:24s} {best[key]:9.4f} {last[key]:9.4f}" for key in best]
    p = results["params"]
    router = f", router {p['router']:,}" if p.get("router") else ""  # results written before routers lack it
    lines.append(f"trainable parameters: {p['trainable']:,} (adapter {p['adapter']:,}{router}, head {p['head']:,})")
    lines.append(f"train time: {results['train_seconds']:.1f} s for {results['steps']} steps")
    return "\n".join(lines)


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N; the run's precision is kept"
    )


def _truncation(text: str) -> int | float:
    """``--k 64`` is a fixed size, ``--k 0.9`` an energy fraction (as the config's ``method.k``)."""
    return float(text) if "." in text else int(text)


def _one_line(err: Exception) -> str:
    """An error as one line.  An error raised in a DataLoader worker arrives carrying the worker's traceback:
    its last line is the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="loraplex", description="Structured multi-LoRA fine-tuning of ViTs.")
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain", help="pre-train a backbone offline and write it to the zoo")
    _add_config(pretrain)
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    pretrain.add_argument("--overwrite", action="store_true", help="replace an existing zoo entry of that name")
    pretrain.set_defaults(func=cmd_pretrain)

    train = commands.add_parser("train", help="train (or resume) a run described by a config")
    _add_config(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a finished run")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--which", choices=["best", "final"], default="best", help="which adapters to load")
    evaluate.add_argument("--split", choices=["val", "test"], default="test")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    _add_device(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    params = commands.add_parser("params", help="parameter counts of a config, without data or training")
    _add_config(params)
    params.add_argument("--json", action="store_true", help="print JSON")
    params.set_defaults(func=cmd_params)

    analyze = commands.add_parser("analyze", help="where each ΔW lives: subspace energy, rank, angles (+ plots)")
    analyze.add_argument("run_dir", type=Path)
    analyze.add_argument("--which", choices=["best", "final"], default="best", help="which adapters to load")
    analyze.add_argument(
        "--k", type=_truncation, default=None, help="column-space size: int or energy fraction (default: the run's k)"
    )
    analyze.add_argument(
        "--gate-samples", type=int, default=200, help="runs with a router: test samples per task to analyse gates on"
    )
    _add_device(analyze)
    analyze.set_defaults(func=cmd_analyze)

    export = commands.add_parser("export", help="export a run's adapters for one task")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--task", required=True, help="the task (domain) whose LoRA to export")
    export.add_argument("--format", choices=["peft"], default="peft")
    export.add_argument("--which", choices=["best", "final"], default="best")
    export.add_argument("--include-head", action="store_true", help="also write the task head as the classifier")
    export.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/peft-TASK)")
    _add_device(export)
    export.set_defaults(func=cmd_export)

    report = commands.add_parser("report", help="HTML + Markdown report over one or more runs")
    report.add_argument("run_dirs", nargs="+", type=Path)
    report.add_argument("--out", type=Path, default=Path("report"), help="output directory")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .api import AdapterFileError
    from .core.state import DiskFullError
    from .data import DataError, SourceMissingError
    from .eval.report import NotARunDirError
    from .models import BackboneError
    from .train import TrainingDiverged

    user_errors = (
        ConfigError, AdapterFileError, SourceMissingError, DataError, BackboneError, NotARunDirError, DiskFullError
    )  # fmt: skip
    try:
        return args.func(args)
    except user_errors as err:
        print(f"loraplex {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"loraplex {args.command}: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
