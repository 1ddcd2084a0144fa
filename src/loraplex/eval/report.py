"""HTML and Markdown reports over run directories (the "Run directory" layout written by ``loraplex train``).

A report is a list of :class:`Section` (paragraphs, notes, tables, figures) rendered twice: one HTML file
that stands alone (figures as data URIs, inline CSS, no script: it can be mailed or attached to an issue)
and Markdown with the figures as PNG files beside it (for BENCHMARKS.md and pull requests). Metrics are
read from results.json by key, so a regime with other metrics (``miou/semseg``, an accuracy matrix) adds
a section-building function to :func:`build_sections`; the loaders and renderers stay as they are.

Continual runs (``train.regime: continual``; results.json ``"regime": "continual"``) are the one regime whose
results differ in kind: an accuracy matrix and the metrics drawn from it instead of best/last test scores, and no
top-level metrics.jsonl (each task logs in its own ``task<i>/``). They are listed with the other runs but kept out
of the best/last tables and the curves; their own section has a table per setup and each setup's accuracy matrix,
averaged over seeds, as a heat-map.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import plots

CONFIG, METRICS, RESULTS = "config.yaml", "metrics.jsonl", "results.json"
ANALYSIS = Path("analysis") / "analysis.json"  # written by `loraplex analyze RUN_DIR`
PREDICTIONS = "predictions.png"  # written at the end of a dense multi-task run
SEED_KEYS = (("train", "seed"), ("data", "seed"))
IGNORED_CONFIG = ("output",)  # where a run was written does not change what it measured
PERCENT_PREFIXES = ("acc/", "miou/")  # fractions in [0, 1], shown as percentages
PERCENT_SUFFIXES = ("/miou", "/maxf")  # dense metrics that are fractions too (semseg/miou, saliency/maxf)
REQUIRED_RESULTS = ("method", "params", "train_seconds", "steps", "best_step", "last", "best")
SEQUENCE_STATE = "continual.json"  # rewritten by a continual run after every task: how far an unfinished one got
# a continual run's metrics (fractions, shown as percentages); a joint run (every task at once) has A_T alone
CONTINUAL_KEYS = ("A_T", "avg_incremental", "forgetting_max", "forgetting_first", "backward_transfer")
REQUIRED_CONTINUAL = ("method", "setting", "joint", "tasks", "matrix", "task_seconds", "train_seconds", "params")
CURVES = (("train", "loss"), ("val", "acc/mean"))
SMOOTH_POINTS = 60  # a per-step train loss is averaged over len/SMOOTH_POINTS steps
LABEL_KEYS = 3  # config differences named in a group's label; the rest are counted
MISSING = "—"
TITLE = "loraplex report"


class NotARunDirError(ValueError):
    """A path given as a run directory that is not one (no config.yaml): a wrong argument, not a bad run."""


@dataclass
class Run:
    """One run directory as read from disk; ``notes`` say what is missing or damaged in it."""

    path: Path
    name: str
    config: dict[str, Any]
    history: list[dict[str, Any]]
    results: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        if self.results is not None and isinstance(self.results.get("method"), str):
            return self.results["method"]
        name = _dig(self.config, "method", "name")
        return str(name) if name is not None else "?"

    @property
    def seed(self) -> str:
        train, data = _dig(self.config, "train", "seed"), _dig(self.config, "data", "seed")
        return str(train) if data in (None, train) else f"{train} (data {data})"

    @property
    def setup(self) -> dict[str, Any]:
        """The config minus seeds and output: runs with equal setups are repetitions of one experiment."""
        cfg = copy.deepcopy(self.config)
        for section in IGNORED_CONFIG:
            cfg.pop(section, None)
        for section, key in SEED_KEYS:
            if isinstance(cfg.get(section), dict):
                cfg[section].pop(key, None)
        return cfg

    @property
    def continual(self) -> bool:
        """A task sequence, scored as an accuracy matrix rather than best/last; told by its results, or by its
        config while it has none (interrupted)."""
        regime = _dig(self.results, "regime") if self.results is not None else _dig(self.config, "train", "regime")
        return regime == "continual"

    def metrics(self, which: str, split: str = "test") -> dict[str, float]:
        """Numeric metrics of ``results[which][split]`` (``which``: "best" or "last"); empty when absent."""
        found = _dig(self.results or {}, which, split)
        if not isinstance(found, dict):
            return {}
        return {k: float(v) for k, v in found.items() if _is_number(v)}

    def number(self, *keys: str) -> float | None:
        value = _dig(self.results or {}, *keys)
        return float(value) if _is_number(value) else None


@dataclass
class Group:
    """Runs sharing one setup: their spread over seeds is what ± reports."""

    label: str
    runs: list[Run]


@dataclass
class Column:
    name: str
    over: str = ""  # a spanning header above consecutive columns with the same ``over``
    kind: str = "num"  # "num" (right-aligned), "text", or "path" (may break anywhere)


@dataclass
class Table:
    columns: list[Column]
    rows: list[list[str]]


@dataclass
class Notes:
    items: list[str]


@dataclass
class Figure:
    name: str  # file stem in figures/
    png: bytes
    caption: str


Block = str | Notes | Table | Figure


@dataclass
class Section:
    title: str
    blocks: list[Block]


def _dig(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_percent(key: str) -> bool:
    return key in CONTINUAL_KEYS or key.startswith(PERCENT_PREFIXES) or key.endswith(PERCENT_SUFFIXES)


def _fmt(key: str, value: float) -> str:
    return f"{100 * value:.1f}" if _is_percent(key) else f"{value:.4g}"


def _mean_std(key: str, values: list[float]) -> str:
    """``mean ± std`` with the sample (n−1) std; one value is shown alone, none as a dash."""
    if not values:
        return MISSING
    if len(values) == 1:
        return _fmt(key, values[0])
    return f"{_fmt(key, statistics.mean(values))} ± {_fmt(key, statistics.stdev(values))}"


def _int(value: float | None) -> str:
    return MISSING if value is None else f"{round(value):,}"


def _seconds(values: list[float]) -> str:
    if not values:
        return MISSING
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _run_names(paths: list[Path]) -> list[str]:
    """Directory names, lengthened by parent folders only where two runs would otherwise share a name."""
    parts = [p.parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(pt[-d:]) for pt, d in zip(parts, depth, strict=True)]
        counts = Counter(names)
        clashing = [i for i, n in enumerate(names) if counts[n] > 1 and depth[i] < len(parts[i])]
        if not clashing:
            return names
        for i in clashing:
            depth[i] += 1


def _read_history(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """metrics.jsonl records; a line cut short by an interruption is skipped with a note, not fatal."""
    if not path.is_file():
        notes.append(f"no {METRICS}: no training curves")
        return []
    records, bad = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and _is_number(record.get("step")) and isinstance(record.get("split"), str):
            records.append(record)
        else:
            bad.append(i)
    if bad:
        notes.append(f"{METRICS}: skipped {len(bad)} malformed line(s) (line {', '.join(map(str, bad[:5]))})")
    return records


def _read_results(path: Path, notes: list[str]) -> dict[str, Any] | None:
    """results.json as a mapping, or None: damaged (noted here) or absent (noted by :func:`load_run`, which knows
    from the regime how far the run got)."""
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        notes.append(f"{RESULTS} is not valid JSON ({e}); left out of the tables")
        return None
    if not isinstance(results, dict):
        notes.append(f"{RESULTS} is not a JSON object; left out of the tables")
        return None
    return results


def _logged_until(history: list[dict[str, Any]]) -> str:
    last = max((r["step"] for r in history), default=None)
    return f"last logged step {last}" if last is not None else "nothing logged"


def _tasks_done(path: Path) -> str:
    """How far an unfinished task sequence got: its per-task logs are in task<i>/, its progress in continual.json."""
    state_path = path / SEQUENCE_STATE
    if not state_path.is_file():
        return "no task finished"
    try:
        state = json.loads(state_path.read_text())
        return f"{int(state['done'])} of {len(state['sequence'])} tasks done"
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return f"{SEQUENCE_STATE} unreadable"


def load_run(path: Path, name: str | None = None) -> Run:
    """Read a run directory; only a missing or unreadable config.yaml is an error (it is not a run then)."""
    path = Path(path)
    config_path = path / CONFIG
    if not config_path.is_file():
        why = f"no {CONFIG} in it" if path.is_dir() else "no such directory"
        raise NotARunDirError(f"{path} is not a run directory ({why})")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as e:
        raise NotARunDirError(f"{path} is not a readable run directory: {CONFIG} is not valid YAML ({e})") from e
    if not isinstance(config, dict):
        raise NotARunDirError(f"{path} is not a readable run directory: {CONFIG} is not a mapping")
    results_notes: list[str] = []
    results = _read_results(path / RESULTS, results_notes)  # first: it tells which files a run should have
    run = Run(path, name or path.name, config, [], results)
    if run.continual:
        required = REQUIRED_CONTINUAL + (CONTINUAL_KEYS[:1] if _dig(results, "joint") is True else CONTINUAL_KEYS)
    else:
        run.history, required = _read_history(path / METRICS, run.notes), REQUIRED_RESULTS
    if not (path / RESULTS).is_file():
        where = _tasks_done(path) if run.continual else _logged_until(run.history)
        run.notes.append(f"no {RESULTS}: interrupted or still running ({where}); left out of the tables")
    run.notes += results_notes
    if results is not None and (missing := [k for k in required if k not in results]):
        run.notes.append(f"{RESULTS} lacks {', '.join(missing)}: those cells are blank")
    return run


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    if not isinstance(d, dict):
        return {prefix: d if isinstance(d, str) else json.dumps(d, default=str)}
    out: dict[str, str] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def group_runs(runs: list[Run]) -> list[Group]:
    """Group runs by setup, in order of first appearance. A group is labelled by its method, plus the
    config entries that tell it apart from other groups of the same method (e.g. ``method.rank=4``)."""
    setups: dict[str, list[Run]] = {}
    for run in runs:
        setups.setdefault(json.dumps(run.setup, sort_keys=True, default=str), []).append(run)
    members = list(setups.values())
    flat = [_flatten(group[0].setup) for group in members]
    labels = []
    for i, group in enumerate(members):
        rivals = [flat[j] for j, other in enumerate(members) if j != i and other[0].method == group[0].method]
        keys = {k for r in rivals for k in set(r) | set(flat[i]) if r.get(k) != flat[i].get(k)}
        # values set in every setup tell groups apart better than keys one older config lacks
        keys = sorted(keys, key=lambda k: (not all(k in f for f in flat), k))
        shown = ", ".join(f"{k}={flat[i].get(k, MISSING)}" for k in keys[:LABEL_KEYS])
        shown += f", +{len(keys) - LABEL_KEYS} more" if len(keys) > LABEL_KEYS else ""
        labels.append(f"{group[0].method} ({shown})" if shown else group[0].method)
    return [Group(label, group) for label, group in zip(labels, members, strict=True)]


def _metric_keys(runs: list[Run], which: str) -> list[str]:
    """Test metric keys in first-seen order, with aggregate ``*/mean`` keys after the per-domain ones."""
    keys = list(dict.fromkeys(k for run in runs for k in run.metrics(which)))
    # a dense task's score/<task> only restates its primary metric for checkpoint selection; keep score/mean
    keys = [k for k in keys if not k.startswith("score/") or k == "score/mean"]
    return sorted(keys, key=lambda k: k.endswith("/mean"))


def _column_name(key: str) -> str:
    return f"{key} (%)" if _is_percent(key) else key


# ---- sections -------------------------------------------------------------------------------------------------


def _runs_section(runs: list[Run]) -> Section:
    rows = [
        [
            run.name,
            run.method,
            run.seed,
            "complete" if run.results is not None else "incomplete",
            str(run.path),
        ]
        for run in runs
    ]
    columns = [Column("run", kind="text"), Column("method", kind="text"), Column("seed", kind="text")]
    columns += [Column("status", kind="text"), Column("path", kind="path")]
    blocks: list[Block] = [
        "Accuracies, mIoU and maxF are percentages. “best” is the test score at the step with the best validation "
        "score (results.json best_step; the final step for a run without validation, data.val_per_domain: 0); "
        "“last” is the test score at the final step. Runs whose config.yaml differs "
        "only in train.seed, data.seed and output are repetitions of one setup: their rows give mean ± sample "
        "standard deviation (n−1).",
        Table(columns, rows),
    ]
    notes = [f"{run.name}: {note}" for run in runs for note in run.notes]
    if notes:
        blocks.append(Notes(notes))
    return Section("Runs", blocks)


def _metric_columns(best: list[str], last: list[str]) -> list[Column]:
    """Metric columns under a spanning header; a prefix every key shares (``acc/``) moves up into it."""
    columns = []
    for keys, where in ((best, "best val"), (last, "last step")):
        prefixes = {k.split("/", 1)[0] for k in keys if "/" in k}
        shared = prefixes.pop() if len(prefixes) == 1 and all("/" in k for k in keys) else ""
        over = f"test {shared} @ {where}" if shared else f"test @ {where}"
        columns += [Column(k.removeprefix(f"{shared}/") if shared else k, over) for k in keys]
    return columns


def _summary_section(groups: list[Group], best: list[str], last: list[str]) -> Section:
    columns = [Column("method (setup)", kind="text"), Column("n"), Column("seeds", kind="text")]
    columns += [*_metric_columns(best, last), Column("trainable params"), Column("train s")]
    rows = []
    for g in groups:
        row = [g.label, str(len(g.runs)), ", ".join(r.seed for r in g.runs)]
        row += [_mean_std(k, [r.metrics("best")[k] for r in g.runs if k in r.metrics("best")]) for k in best]
        row += [_mean_std(k, [r.metrics("last")[k] for r in g.runs if k in r.metrics("last")]) for k in last]
        row.append(_distinct_ints([r.number("params", "trainable") for r in g.runs]))
        row.append(_seconds([s for r in g.runs if (s := r.number("train_seconds")) is not None]))
        rows.append(row)
    return Section("Results: mean ± std over seeds", [Table(columns, rows)])


def _per_run_section(groups: list[Group], best: list[str], last: list[str]) -> Section:
    columns = [Column("run", kind="text"), Column("method", kind="text"), Column("seed", kind="text")]
    columns += _metric_columns(best, last)
    columns += [Column("best step"), Column("steps"), Column("trainable"), Column("adapter"), Column("train s")]
    rows = []
    for g in groups:
        for r in g.runs:
            b, la = r.metrics("best"), r.metrics("last")
            row = [r.name, r.method, r.seed]
            row += [_fmt(k, b[k]) if k in b else MISSING for k in best]
            row += [_fmt(k, la[k]) if k in la else MISSING for k in last]
            row += [_int(r.number("best_step")), _int(r.number("steps"))]
            row += [_int(r.number("params", "trainable")), _int(r.number("params", "adapter"))]
            s = r.number("train_seconds")
            row.append(MISSING if s is None else f"{s:.1f}")
            rows.append(row)
    return Section("Results per run", [Table(columns, rows)])


def _distinct_ints(values: list[float | None]) -> str:
    """Seeds of one setup should have equal counts; if they do not, show every count rather than hide it."""
    return " / ".join(dict.fromkeys(_int(v) for v in values)) or MISSING


def _params_section(groups: list[Group]) -> Section:
    keys = ("adapter", "head", "trainable", "frozen", "total")
    columns = [Column("method (setup)", kind="text")] + [Column(k) for k in keys] + [Column("trainable / total")]
    rows = []
    for g in groups:
        row = [g.label] + [_distinct_ints([r.number("params", k) for r in g.runs]) for k in keys]
        trainable, total = g.runs[0].number("params", "trainable"), g.runs[0].number("params", "total")
        row.append(f"{100 * trainable / total:.2f}%" if trainable is not None and total else MISSING)
        rows.append(row)
    return Section("Parameters", [Table(columns, rows)])


CONTINUAL_INTRO = (
    "Continual runs learn a sequence of tasks one after the other. R[i][j] is the test accuracy on task j after "
    "learning task i, scored in the run's setting (class: task unknown, one classifier over every class seen; domain: "
    "task unknown, one label space; task: the task id given). A_T is the accuracy over every test sample of all tasks "
    "after the last one, Ā the mean of A_1 … A_T. Forgetting is the mean over all tasks but the last of how far a "
    "task's accuracy fell by the end: from its best before the last task (max-based, Chaudhry et al. 2018) or from "
    "just after it was learned (first-based); backward transfer is minus the first-based forgetting (positive when "
    "later tasks helped earlier ones). Percentages, mean ± sample std over seeds. A joint run (train.joint) learns "
    "every task at once, the upper bound: A_T alone. Trainable parameters per task are what one task trains (its share "
    "of the adapters and one head); in all, every task's. Train s per task is the mean over the sequence's tasks."
)
CONTINUAL_COLUMNS = [
    Column("method (setup)", kind="text"),
    Column("n"),
    Column("seeds", kind="text"),
    Column("setting", kind="text"),
    Column("A_T", "accuracy (%)"),
    Column("Ā", "accuracy (%)"),
    Column("max-based", "forgetting (%)"),
    Column("first-based", "forgetting (%)"),
    Column("backward transfer (%)"),
    Column("per task", "trainable params"),
    Column("in all", "trainable params"),
    Column("per task", "train s"),
    Column("in all", "train s"),
]


def _joint(group: Group) -> bool:
    return any(_dig(r.results, "joint") is True for r in group.runs)


def _seconds_per_task(run: Run) -> float | None:
    seconds = _dig(run.results, "task_seconds")
    if not isinstance(seconds, list) or not seconds or not all(_is_number(s) for s in seconds):
        return None
    return statistics.mean(seconds)


def _continual_row(group: Group) -> list[str]:
    """A setup's metrics over its seeds; a joint run has no sequence, so no per-task or sequence metric either."""
    runs, joint = group.runs, _joint(group)
    settings = dict.fromkeys(str(_dig(r.results, "setting")) for r in runs)
    row = [group.label, str(len(runs)), ", ".join(r.seed for r in runs)]
    row.append(" / ".join(settings) + (" (joint)" if joint else ""))
    row += [_mean_std(k, [v for r in runs if (v := r.number(k)) is not None]) for k in CONTINUAL_KEYS]
    row.append(MISSING if joint else _distinct_ints([r.number("params", "per_task") for r in runs]))
    row.append(_distinct_ints([r.number("params", "trainable") for r in runs]))
    row.append(MISSING if joint else _seconds([s for r in runs if (s := _seconds_per_task(r)) is not None]))
    row.append(_seconds([s for r in runs if (s := r.number("train_seconds")) is not None]))
    return row


def _matrix(run: Run) -> tuple[list[str], list[list[float | None]]] | None:
    """The run's tasks and accuracy matrix if they are well-formed: rows of one number or null per task."""
    tasks, matrix = _dig(run.results, "tasks"), _dig(run.results, "matrix")
    if not isinstance(tasks, list) or not isinstance(matrix, list) or not matrix:
        return None
    for row in matrix:
        if not isinstance(row, list) or len(row) != len(tasks) or not all(v is None or _is_number(v) for v in row):
            return None
    return [str(t) for t in tasks], matrix


def _cell_mean(cells: list[float | None]) -> float | None:
    scored = [c for c in cells if c is not None]
    return statistics.mean(scored) if scored else None


def _matrix_blocks(index: int, group: Group) -> list[Block]:
    """The group's accuracy matrix averaged over its seeds, cell by cell (a cell no seed scored stays blank). Only
    seeds with the first well-formed matrix's tasks and rows are averaged; the others are named in a note."""
    scored = [(r, found) for r in group.runs if (found := _matrix(r)) is not None]
    if not scored:
        return [Notes([f"{group.label}: no run has a well-formed accuracy matrix in {RESULTS}"])]
    first, (tasks, first_matrix) = scored[0]
    same = [(r, m) for r, (t, m) in scored if t == tasks and len(m) == len(first_matrix)]
    mean = [[_cell_mean([m[i][j] for _, m in same]) for j in range(len(tasks))] for i in range(len(first_matrix))]
    seeds = ", ".join(r.seed for r, _ in same)
    title = f"{first.method} ({_dig(first.results, 'setting')}-incremental)"  # short: the figure is as wide as R
    caption = (
        f"{group.label}: test accuracy on each task (columns) after learning each task (rows), mean over seeds "
        f"{seeds}; blank: not learned yet."
    )
    png = plots.accuracy_matrix(mean, tasks, title)
    blocks: list[Block] = [Figure(f"accuracy_matrix_{index}_{_file_stem(first.method)}", png, caption)]
    if left_out := [r.name for r in group.runs if all(r is not s for s, _ in same)]:
        why = "no well-formed matrix, or other tasks than the first seed's"
        blocks.append(Notes([f"{group.label}: {', '.join(left_out)} left out of the mean accuracy matrix ({why})"]))
    return blocks


def _continual_section(groups: list[Group]) -> Section:
    blocks: list[Block] = [CONTINUAL_INTRO, Table(CONTINUAL_COLUMNS, [_continual_row(g) for g in groups])]
    for i, group in enumerate((g for g in groups if not _joint(g)), 1):  # a joint run's one row is no sequence
        blocks += _matrix_blocks(i, group)
    return Section("Continual learning", blocks)


def _curves_section(runs: list[Run], colors: dict[str, str], group_of: dict[int, str]) -> Section:
    panels = []
    for split, key in CURVES:
        logged = {
            id(run): [(r["step"], float(r[key])) for r in run.history if r["split"] == split and _is_number(r.get(key))]
            for run in runs
        }
        window = max(map(len, logged.values())) // SMOOTH_POINTS if split == "train" else 1
        lines = []
        for run in runs:
            if points := logged[id(run)]:
                values = plots.running_mean([100 * v if _is_percent(key) else v for _, v in points], window)
                lines.append(plots.Line(run.name, group_of[id(run)], [s for s, _ in points], values))
        if lines:
            smoothed = f" (running mean over {window} logged steps)" if window > 1 else ""
            panels.append(plots.Panel(f"{split} {key}{smoothed}", _column_name(key), lines))
    if not panels:
        return Section("Training curves", [Notes([f"no run logged {' or '.join(k for _, k in CURVES)} in {METRICS}"])])
    caption = "One line per run; runs of one setup share a colour and differ in line style."
    return Section("Training curves", [Figure("training_curves", plots.curves(panels, colors), caption)])


def _bars_section(groups: list[Group], colors: dict[str, str]) -> Section | None:
    domains = [k for k in _metric_keys([r for g in groups for r in g.runs], "best") if k.startswith("acc/")]
    domains = [k for k in domains if k != "acc/mean"]
    if not domains:
        return None
    series = []
    for g in groups:
        heights, errors = [], []
        for key in domains:
            values = [100 * r.metrics("best")[key] for r in g.runs if key in r.metrics("best")]
            heights.append(statistics.mean(values) if values else math.nan)
            errors.append(statistics.stdev(values) if len(values) > 1 else math.nan)
        series.append((g.label, heights, errors))
    png = plots.grouped_bars([k.removeprefix("acc/") for k in domains], series, colors, "test accuracy (%)", (0, 100))
    caption = "Test accuracy at the best validation step, per domain; error bars: std over seeds (n > 1)."
    return Section("Per-domain accuracy", [Figure("per_domain_accuracy", png, caption)])


def _curve_key(run: Run) -> str:
    """The method and the options that make it another variant (CLoRA#, ARC, SADE), never its size knobs (rank,
    bases): one curve joins sizes of one variant."""
    method = _dig(run.config, "method")
    method = method if isinstance(method, dict) else {}
    flags = [f"coefficients={method['coefficients']}"] if "coefficients" in method else []
    flags += ["tied"] if method.get("tied") is True else []
    flags += ["SADE"] if _is_number(method.get("sade")) and method["sade"] > 0 else []
    return f"{run.method} ({', '.join(flags)})" if flags else run.method


@dataclass
class _Point:
    """A setup on the accuracy-against-parameters plot: its size and its seeds' scores."""

    curve: str
    label: str
    params: float
    values: list[float]


def _point(group: Group) -> tuple[tuple[str, str], _Point] | None:
    """The group's point and the figure it belongs on (its data and selection metric: scores on other data do not
    compare); None if its results lack the metric or the count."""
    first = group.runs[0]
    metric, params = _dig(first.results, "selection_metric"), first.number("params", "trainable")
    if not isinstance(metric, str) or params is None:
        return None
    scale = 100 if _is_percent(metric) else 1
    values = [scale * r.metrics("best")[metric] for r in group.runs if metric in r.metrics("best")]
    if not values:
        return None
    domains = _dig(first.config, "data", "domains")
    data = ", ".join(map(str, domains)) if isinstance(domains, list) else str(domains)
    return (data, metric), _Point(_curve_key(first), group.label, params, values)


def _tradeoff_blocks(index: int, data: str, metric: str, points: list[_Point], colors: dict[str, str]) -> list[Block]:
    """One data set's figure, and a note where setups of one curve share a size (they differ in something else)."""
    curves = []
    for curve in dict.fromkeys(p.curve for p in points):  # in the report's order, as the legends of other figures
        mine = sorted((p for p in points if p.curve == curve), key=lambda p: p.params)
        means = [statistics.mean(p.values) for p in mine]
        errors = [statistics.stdev(p.values) if len(p.values) > 1 else math.nan for p in mine]
        curves.append(plots.Curve(curve, [p.params for p in mine], means, errors))
    png = plots.accuracy_vs_parameters(curves, colors, data, f"test {_column_name(metric)}")
    shown = "; ".join(f"{c.label} ({len(c.params)} point{'s' if len(c.params) > 1 else ''})" for c in curves)
    caption = (
        f"{data}: test {metric} at the best validation step against trainable parameters (log scale), mean over "
        f"seeds; error bars: std over seeds (n > 1). One curve per method variant, through its sizes: {shown}."
    )
    blocks: list[Block] = [Figure(f"accuracy_vs_parameters_{index}", png, caption)]
    notes = []
    for (curve, params), n in Counter((p.curve, p.params) for p in points).items():
        if n > 1:
            labels = [p.label for p in points if (p.curve, p.params) == (curve, params)]
            notes.append(f"{data}: {'; '.join(labels)} have {_int(params)} trainable parameters each ({curve})")
    return blocks + ([Notes(notes)] if notes else [])


def _tradeoff_section(groups: list[Group]) -> Section | None:
    """Score against trainable parameters, one figure per data set whose setups come in at least two sizes."""
    figures: dict[tuple[str, str], list[_Point]] = {}
    for group in groups:
        if (found := _point(group)) is not None:
            figures.setdefault(found[0], []).append(found[1])
    figures = {key: points for key, points in figures.items() if len({p.params for p in points}) > 1}
    if not figures:
        return None
    colors = plots.palette(list(dict.fromkeys(p.curve for points in figures.values() for p in points)))
    blocks = [
        block
        for i, ((data, metric), points) in enumerate(figures.items(), 1)
        for block in _tradeoff_blocks(i, data, metric, points, colors)
    ]
    return Section("Accuracy against trainable parameters", blocks)


def _analysis_row(row: dict[str, Any]) -> list[str]:
    energy = MISSING if row["energy_column"] is None else f"{row['energy_column']:.3f}"
    return [row["branch"], str(row["layers"]), energy, f"{row['effective_rank']:.2f}", f"{row['numerical_rank']:.1f}"]


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _analysis_figures(run: Run, directory: Path, figures: list[dict[str, Any]]) -> list[Block]:
    """The PNGs an analysis lists (``{file, caption}``) that exist, named per run so two runs' never clash."""
    blocks: list[Block] = []
    for figure in figures if isinstance(figures, list) else []:
        if not isinstance(figure, dict) or not isinstance(figure.get("file"), str):
            continue
        png = directory / Path(figure["file"]).name  # only files beside analysis.json
        if png.is_file():
            name = f"analysis_{_file_stem(run.name)}_{png.stem}"
            blocks.append(Figure(name, png.read_bytes(), f"{run.name}: {figure.get('caption', '')}"))
    return blocks


GATE_SETUP_KEYS = ("router", "gate", "experts", "twd", "twd_dim", "temperature")
GATES_INTRO = (
    "Router gates (models with a router, e.g. MoLA-Router): on a seeded sample of each task's test split, each "
    "task's mean gate over the experts, the cosine similarity of those means between tasks, the gate entropy "
    "(divided by log E: 0 = one expert per sample, 1 = uniform), the entropy of a task's mean gate (how many "
    "experts the task uses in all) and the share of samples whose largest gate is each expert. What to look for: "
    "with TwD (method.twd > 0) the tasks' mean gates should separate, i.e. low off-diagonal cosine; with twd = 0 "
    "the router may send every task to the same mixture (cosines near 1). Compare runs that differ in twd only."
)


def _gate_setup(run: Run, gates: dict[str, Any]) -> str:
    """The method keys that shape the gates (twd …), from the analysis or else the run's config."""
    setup = gates.get("setup")
    if not isinstance(setup, dict):
        method = _dig(run.config, "method") or {}
        setup = {k: method[k] for k in GATE_SETUP_KEYS if isinstance(method, dict) and method.get(k) is not None}
    return ", ".join(f"{k}={v}" for k, v in setup.items())


def _cell(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else MISSING


GATE_OVERVIEW = [
    Column("run", kind="text"),
    Column("method (gate setup)", kind="text"),
    Column("experts"),
    Column("samples / task"),
    Column("mean off-diagonal cosine"),
    Column("H / log E", "overall (tasks weighted equally)"),
    Column("H(mean gate) / log E", "overall (tasks weighted equally)"),
]


def _gate_overview_row(run: Run, gates: dict[str, Any]) -> list[str]:
    """One run's row of the table that puts runs with and without TwD side by side."""
    h = gates["entropy"]
    return [
        run.name,
        f"{run.method} ({_gate_setup(run, gates)})",
        str(gates["experts"]),
        " / ".join(map(str, sorted(set(gates["samples"].values())))),
        _cell(gates["cosine_offdiag_mean"]),
        _cell(h["overall_sample_normalised"]),
        _cell(h["overall_of_mean_normalised"]),
    ]


def _gate_tables(gates: dict[str, Any]) -> list[Table]:
    """Per task: mean gate, arg-max share and entropies; then the task × task cosine table of the mean gates."""
    tasks, experts = gates["tasks"], int(gates["experts"])
    h = gates["entropy"]
    columns = [Column("task", kind="text"), Column("n")]
    columns += [Column(f"e{e}", "mean gate") for e in range(experts)]
    columns += [Column(f"e{e}", "arg-max share") for e in range(experts)]
    columns += [Column("H / log E"), Column("H(mean gate) / log E")]
    rows = []
    for t, task in enumerate(tasks):
        mean, share = gates["mean"][t] or [None] * experts, gates["argmax_share"][t] or [None] * experts
        row = [task, str(gates["samples"][task])]
        row += [_cell(v) for v in mean] + [_cell(v, 2) for v in share]
        row += [_cell(h["sample_normalised"][t]), _cell(h["of_mean_normalised"][t])]
        rows.append(row)
    cosine = Table(
        [Column("cosine", kind="text"), *[Column(task, "cosine between tasks' mean gates") for task in tasks]],
        [[task, *[_cell(v) for v in gates["cosine"][t]]] for t, task in enumerate(tasks)],
    )
    return [Table(columns, rows), cosine]


def _read_analysis(run: Run, blocks: list[Block]) -> dict[str, Any] | None:
    """A run's analysis.json, or None (absent; or damaged, with a note saying so)."""
    path = run.path / ANALYSIS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return data
    except (json.JSONDecodeError, TypeError) as e:
        blocks.append(Notes([f"{run.name}: {ANALYSIS} is damaged ({type(e).__name__}: {e}); re-run loraplex analyze"]))
        return None


def _analysis_section(runs: list[Run]) -> Section | None:
    """Per-branch means and the depth figures of every run that ``loraplex analyze`` has been run on; then, for
    runs with a router, the gate analysis of every such run, one after the other, led by a table comparing them."""
    columns = [Column("branch", kind="text"), Column("layers"), Column("column-space energy")]
    columns += [Column("effective rank"), Column("numerical rank")]
    blocks: list[Block] = []
    gated: list[tuple[Run, dict[str, Any]]] = []
    for run in runs:
        data = _read_analysis(run, blocks)
        if data is None:
            continue
        try:
            rows = [_analysis_row(row) for row in data["summary"]]
        except (KeyError, TypeError) as e:
            blocks.append(
                Notes([f"{run.name}: {ANALYSIS} is damaged ({type(e).__name__}: {e}); re-run loraplex analyze"])
            )
            continue
        if rows:
            blocks += [
                f"{run.name} ({run.method}, {data.get('which', 'best')} adapters; means over layers):",
                Table(columns, rows),
            ]
        if isinstance(data.get("notes"), list):  # e.g. why the ΔW part was skipped (a model without fixed ΔW)
            blocks.append(Notes([f"{run.name}: {note}" for note in data["notes"]]))
        blocks += _analysis_figures(run, (run.path / ANALYSIS).parent, data.get("figures", []))
        if isinstance(data.get("gates"), dict):
            gated.append((run, data["gates"]))
    if any(not isinstance(block, Notes) for block in blocks):  # some run has ΔW numbers: say what they are
        intro = (
            "Where each ΔW lives: the fraction of its energy in the column space of the frozen W (the rest is in the "
            "left null space), its effective rank (Roy & Vetterli 2007) and numerical rank, and the principal angles "
            "between branches' output subspaces, over depth."
        )
        blocks.insert(0, intro)
    if gated:
        blocks += _gate_blocks(gated)
    return Section("Analysis", blocks) if blocks else None


def _gate_blocks(gated: list[tuple[Run, dict[str, Any]]]) -> list[Block]:
    """The gate part of the analysis: a table comparing the runs, then per run its tables and figures."""
    overview: list[list[str]] = []
    per_run: list[Block] = []
    for run, gates in gated:
        try:
            row, tables = _gate_overview_row(run, gates), _gate_tables(gates)
        except (KeyError, TypeError, IndexError, ValueError) as e:
            per_run.append(Notes([f"{run.name}: the gates entry of {ANALYSIS} is damaged ({type(e).__name__}: {e})"]))
            continue
        overview.append(row)
        samples = ", ".join(f"{task} {n}" for task, n in gates["samples"].items())
        per_run.append(
            f"{run.name}: {run.method} ({_gate_setup(run, gates)}), {gates['experts']} experts; "
            f"{gates.get('split', 'test')} samples per task: {samples}."
        )
        per_run += tables
        per_run += _analysis_figures(run, (run.path / ANALYSIS).parent, gates.get("figures", []))
    return [GATES_INTRO, *([Table(GATE_OVERVIEW, overview)] if overview else []), *per_run]


def _predictions_section(groups: list[Group]) -> Section | None:
    """True and predicted maps of a few test images, for the first seed of every dense multi-task setup (the
    other seeds' maps look alike and would bury the comparison)."""
    blocks: list[Block] = []
    for group in groups:
        run = next((r for r in group.runs if (r.path / PREDICTIONS).is_file()), None)
        if run is not None:
            png = run.path / PREDICTIONS
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", run.name)
            caption = f"{group.label} (run {run.name}, best checkpoint): input, then every task's true & predicted map."
            blocks.append(Figure(f"predictions_{stem}", png.read_bytes(), caption))
    return Section("Dense predictions", blocks) if blocks else None


def build_sections(runs: list[Run]) -> list[Section]:
    """Every section of a report over ``runs``; incomplete runs appear in the run list and the curves only, continual
    runs in the run list, their own section and the parameters."""
    all_groups = group_runs(runs)
    colors = plots.palette([g.label for g in all_groups])
    group_of = {id(r): g.label for g in all_groups for r in g.runs}
    groups = [Group(g.label, done) for g in all_groups if (done := [r for r in g.runs if r.results is not None])]
    ordinary, continual = [g for g in groups if not g.runs[0].continual], [g for g in groups if g.runs[0].continual]
    sections = [_runs_section(runs)]
    if ordinary:
        complete = [r for g in ordinary for r in g.runs]
        best, last = _metric_keys(complete, "best"), _metric_keys(complete, "last")
        sections += [_summary_section(ordinary, best, last), _per_run_section(ordinary, best, last)]
        if bars := _bars_section(ordinary, colors):
            sections.append(bars)
        if tradeoff := _tradeoff_section(ordinary):
            sections.append(tradeoff)
    if continual:
        sections.append(_continual_section(continual))
    if logged := [r for r in runs if not r.continual]:  # a task sequence logs per task: no curve of its own
        sections.append(_curves_section(logged, colors, group_of))
    if groups:
        sections.append(_params_section(groups))
    if analysis := _analysis_section(runs):
        sections.append(analysis)
    if predictions := _predictions_section(groups):
        sections.append(predictions)
    return sections


# ---- rendering --------------------------------------------------------------------------------------------------

CSS = """
body { font-family: "DejaVu Sans", "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328; margin: 0; }
main { max-width: 1140px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 26px; border-bottom: 1px solid #d0d7de; padding-bottom: 6px; }
h2 { font-size: 19px; margin-top: 30px; border-bottom: 1px solid #eaeef2; padding-bottom: 4px; }
p { font-size: 14px; line-height: 1.5; }
.scroll { overflow-x: auto; margin: 8px 0 16px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 6px; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; text-align: center; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.path { word-break: break-all; font-family: "DejaVu Sans Mono", monospace; font-size: 12px; }
tbody tr:nth-child(even) { background: #f9fafb; }
figure { margin: 12px 0 20px; }
img { max-width: 100%; height: auto; }
figcaption { font-size: 13px; color: #57606a; margin-top: 4px; }
.notes { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 8px 16px 8px 32px;
         font-size: 14px; }
"""


def _html_table(table: Table) -> str:
    e = html.escape
    spanned = any(c.over for c in table.columns)
    top, bottom = [], []
    i = 0
    while i < len(table.columns):
        col = table.columns[i]
        if not col.over:
            rowspan = ' rowspan="2"' if spanned else ""
            top.append(f"<th{rowspan}>{e(col.name)}</th>")
            i += 1
            continue
        j = i
        while j < len(table.columns) and table.columns[j].over == col.over:
            bottom.append(f"<th>{e(table.columns[j].name)}</th>")
            j += 1
        top.append(f'<th colspan="{j - i}">{e(col.over)}</th>')
        i = j
    head = "<tr>" + "".join(top) + "</tr>" + ("<tr>" + "".join(bottom) + "</tr>" if spanned else "")
    body = []
    for row in table.rows:
        cells = []
        for col, cell in zip(table.columns, row, strict=True):
            cells.append(f'<td class="{col.kind}">{e(cell)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>'


def _html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, str):
        return f"<p>{e(block)}</p>"
    if isinstance(block, Notes):
        return '<ul class="notes">' + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        return _html_table(block)
    data = base64.b64encode(block.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{e(block.caption)}">'
        f"<figcaption>{e(block.caption)}</figcaption></figure>"
    )


def render_html(sections: list[Section], title: str = TITLE) -> str:
    """One self-contained page: every user string escaped, figures inline, no script, nothing fetched."""
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<section>\n<h2>{html.escape(section.title)}</h2>")
        parts += [_html_block(block) for block in section.blocks]
        parts.append("</section>")
    parts.append("</main>\n</body>\n</html>\n")
    return "\n".join(parts)


def _md(text: str) -> str:
    """Markdown-safe text: HTML entities for ``&<>`` (no renderer runs them as markup), a backslash before
    other syntax characters (CommonMark allows one before any ASCII punctuation). An underscore inside a
    word cannot start emphasis, so ``lora_r8_seed0`` is left readable in the raw file."""
    text = html.escape(text.replace("\n", " "), quote=False)
    text = re.sub(r"([\\`*\[\]|#~])", r"\\\1", text)
    return re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)


def _md_block(block: Block, figure_dir: str) -> str:
    if isinstance(block, str):
        return _md(block)
    if isinstance(block, Notes):
        return "\n".join(f"- **Note:** {_md(item)}" for item in block.items)
    if isinstance(block, Table):
        names = [f"{c.over}: {c.name}" if c.over else c.name for c in block.columns]
        lines = ["| " + " | ".join(_md(n) for n in names) + " |"]
        lines.append("|" + "|".join("---:" if c.kind == "num" else "---" for c in block.columns) + "|")
        lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in block.rows]
        return "\n".join(lines)
    return f"![{_md(block.caption)}]({figure_dir}/{block.name}.png)\n\n*{_md(block.caption)}*"


def render_markdown(sections: list[Section], figure_dir: str = "figures", title: str = TITLE) -> str:
    """Markdown whose figures are ``figure_dir/<name>.png`` relative to the file."""
    parts = [f"# {_md(title)}"]
    for section in sections:
        parts.append(f"## {_md(section.title)}")
        parts += [_md_block(block, figure_dir) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def write_report(run_dirs: list[Path], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (+ ``figures/*.png``) into ``out_dir``; returns both paths.

    Every path is checked before anything is written, so a mistyped run dir fails fast with its name.
    """
    paths = list(dict.fromkeys(Path(p) for p in run_dirs))  # a run listed twice would count twice in ± otherwise
    names = _run_names([p.resolve() for p in paths])
    runs = [load_run(p, name) for p, name in zip(paths, names, strict=True)]
    if not runs:
        raise ValueError("write_report needs at least one run directory")
    sections = build_sections(runs)
    out_dir = Path(out_dir)
    figure_dir = out_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                (figure_dir / f"{block.name}.png").write_bytes(block.png)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(render_html(sections), encoding="utf-8")
    md_path.write_text(render_markdown(sections, figure_dir.name), encoding="utf-8")
    return html_path, md_path
