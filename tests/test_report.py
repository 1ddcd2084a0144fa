"""Reports over hand-written run directories: numbers, figures, escaping, and damaged inputs; over real continual
runs (a tiny trainer run each), alone and beside an ordinary run; and accuracy against trainable parameters over
real LoRA and CLoRA runs of two sizes each."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from loraplex.config import load_config
from loraplex.eval import NotARunDirError, write_report
from loraplex.train.runner import train

from .tiny import tiny_config

DOMAINS = ["fashion", "mnist", "digits"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "ss<script>alert('x')"


def make_run(
    root: Path,
    name: str,
    method: str,
    seed: int,
    best: list[float] | None,
    last: list[float] | None = None,
    rank: int = 8,
    trainable: int = 12_345,
    domains: tuple[str, ...] = tuple(DOMAINS),
) -> Path:
    """A run dir in the spec's format; ``best=None`` leaves it interrupted (no results.json, a cut-off line)."""
    run = root / name
    run.mkdir(parents=True)
    config = {
        "backbone": {"name": "vit_fractal_tiny", "img_size": 32},
        "method": {"name": method, "rank": rank},
        "data": {"domains": list(domains), "seed": seed},
        "train": {"steps": 100, "eval_every": 25, "seed": seed},
        "output": {"dir": str(run)},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": s, "split": "train", "loss": 2.3 / s, "lr": 1e-3} for s in range(1, 101)]
    lines += [{"step": s, "split": "val", "acc/mean": 0.5 + s / 400} for s in (25, 50, 75, 100)]
    if best is None:  # killed mid-write at step 51: the last line is cut short
        text = "".join(json.dumps(line) + "\n" for line in lines[:50]) + '{"step": 51, "spl'
        (run / "metrics.jsonl").write_text(text)
        return run
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    def scores(values: list[float]) -> dict[str, float]:
        return {**{f"acc/{d}": v for d, v in zip(domains, values, strict=True)}, "acc/mean": sum(values) / 3}

    results = {
        "method": method,
        "params": {"adapter": 10_000, "head": 2_345, "trainable": trainable, "frozen": 987_655, "total": 1_000_000},
        "train_seconds": 60.0 + seed,
        "steps": 100,
        "best_step": 75,
        "selection_metric": "acc/mean",
        "last": {"val": scores(last or best), "test": scores(last or best)},
        "best": {"val": scores(best), "test": scores(best)},
    }
    (run / "results.json").write_text(json.dumps(results, indent=2))
    return run


def table_rows(page: str) -> list[list[str]]:
    """Cell texts (unescaped) of every table row of the HTML."""
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    return [[html.unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)] for row in rows]


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        make_run(tmp_path, "lora-s0", "lora", 0, best=[0.80, 0.90, 0.70], last=[0.78, 0.88, 0.70]),
        make_run(tmp_path, "lora-s1", "lora", 1, best=[0.90, 0.92, 0.76], last=[0.84, 0.90, 0.72]),
        make_run(tmp_path, EVIL, "shared_specific", 0, best=[0.93, 0.97, 0.85], trainable=23_456),
        make_run(tmp_path, "lora-s2", "lora", 2, best=None),
    ]


def test_report_tables_figures_and_escaping(runs: list[Path], tmp_path: Path):
    html_path, md_path = write_report(runs, tmp_path / "out")
    assert html_path == tmp_path / "out" / "report.html" and html_path.is_file() and md_path.is_file()
    page = html_path.read_text()
    rows = table_rows(page)

    # two seeds of lora: mean ± sample std (n−1), in percent; the interrupted third seed is not counted
    (lora,) = [r for r in rows if r[:2] == ["lora", "2"]]
    assert lora[2] == "0, 1"
    assert lora[3:7] == ["85.0 ± 7.1", "91.0 ± 1.4", "73.0 ± 4.2", "83.0 ± 4.2"]  # best: fashion, mnist, digits, mean
    assert lora[7:11] == ["81.0 ± 4.2", "89.0 ± 1.4", "71.0 ± 1.4", "80.3 ± 2.4"]  # last step
    assert lora[11:] == ["12,345", "60.5 ± 0.7"]
    (single,) = [r for r in rows if r[:2] == ["shared_specific", "1"]]
    assert single[3:7] == ["93.0", "97.0", "85.0", "91.7"]
    per_run = [r for r in rows if r[0] == "lora-s1" and len(r) > 5]
    assert per_run[0][3:7] == ["90.0", "92.0", "76.0", "86.0"] and per_run[0][-3:] == ["12,345", "10,000", "61.0"]

    # figures embedded (per-domain bars, curves, accuracy against parameters); nothing is fetched from elsewhere
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert all(ref.startswith("data:") for ref in re.findall(r'(?:src|href)="([^"]*)"', page))

    # user strings are escaped: the only way "<script" could appear is from the run name
    assert "<script" not in page and html.escape(EVIL) in page

    # the interrupted run is reported with what happened, not dropped silently
    assert "lora-s2: no results.json: interrupted or still running (last logged step 50)" in html.unescape(page)
    assert "skipped 1 malformed line(s) (line 51)" in page

    md = md_path.read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == 3
    for ref in refs:
        assert (md_path.parent / ref).read_bytes().startswith(PNG_MAGIC)
    assert "85.0 ± 7.1" in md and "<script" not in md


def test_setups_differing_beyond_the_seed_are_separate_groups(tmp_path: Path):
    runs = [
        make_run(tmp_path, "r8", "lora", 0, best=[0.8, 0.8, 0.8]),
        make_run(tmp_path, "r4", "lora", 1, best=[0.6, 0.6, 0.6], rank=4),
    ]
    rows = table_rows(write_report(runs, tmp_path / "out")[0].read_text())
    labels = {r[0]: r[3] for r in rows if len(r) > 3 and r[1] == "1"}
    assert labels == {"lora (method.rank=8)": "80.0", "lora (method.rank=4)": "60.0"}


def test_same_named_runs_are_told_apart(tmp_path: Path):
    runs = [
        make_run(tmp_path / "a", "seed0", "lora", 0, best=[0.8] * 3),
        make_run(tmp_path / "b", "seed0", "x", 0, [0.5] * 3),
    ]
    page = write_report(runs, tmp_path / "out")[0].read_text()
    assert "a/seed0" in page and "b/seed0" in page


def test_a_path_that_is_not_a_run_dir_is_named(tmp_path: Path):
    good = make_run(tmp_path, "ok", "lora", 0, best=[0.8] * 3)
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "nowhere"):
        with pytest.raises(NotARunDirError, match=re.escape(str(bad))):
            write_report([good, bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


# ---- continual runs -------------------------------------------------------------------------------------------
LORA = {"name": "lora", "rank": 2, "target_modules": ["attn.qkv"]}
TWO_TASKS = {"domains": ["digits"], "sequence": [[0, 1], [2, 3]], "train_per_domain": 300, "val_per_domain": 30,
             "test_per_domain": 120}  # fmt: skip
SHORT = {"steps": 3, "warmup_steps": 1, "eval_every": 3, "checkpoint_every": 3}
SEQUENCE_LABEL, JOINT_LABEL = "lora (train.joint=false)", "lora (train.joint=true)"


def _trained(root: Path, **sections) -> Path:
    config = load_config(tiny_config(root, **sections))
    train(config, progress=False)
    return Path(config.output.dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two seeds of a two-task class-incremental sequence, its joint upper bound and one ordinary run."""
    root = tmp_path_factory.mktemp("trained")
    continual = {**SHORT, "regime": "continual"}
    runs = {f"seed{s}": _trained(root / f"seed{s}", method=LORA, data=TWO_TASKS, train={**continual, "seed": s})
            for s in (0, 1)}  # fmt: skip
    runs["joint"] = _trained(root / "joint", method=LORA, data=TWO_TASKS, train={**continual, "joint": True})
    runs["ordinary"] = _trained(root / "ordinary", train=SHORT)
    return runs


def markdown_row(md: str, first_cell: str, cells: int) -> list[str]:
    """The one Markdown table row with ``cells`` cells whose first cell is ``first_cell``."""
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in md.splitlines() if line.startswith("| ")]
    (row,) = [r for r in rows if r[0] == first_cell and len(r) == cells]
    return row


def section(md: str, title: str) -> str:
    """The Markdown of one section, from its heading to the next."""
    return md.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_continual_runs_have_their_section_beside_ordinary_runs(trained: dict[str, Path], tmp_path: Path):
    html_path, md_path = write_report(list(trained.values()), tmp_path / "out")
    md = md_path.read_text()
    results = [json.loads((trained[f"seed{s}"] / "results.json").read_text()) for s in (0, 1)]

    def pct(key: str) -> str:
        values = [100 * r[key] for r in results]
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    sequence = markdown_row(md, SEQUENCE_LABEL, 13)
    assert sequence[1:4] == ["2", "0, 1 (data 0)", "class"]
    assert sequence[4:9] == [pct("A_T"), pct("avg_incremental"), pct("forgetting_max"), pct("forgetting_first"),
                             pct("backward_transfer")]  # fmt: skip
    assert sequence[9:11] == [f"{results[0]['params']['per_task']:,}", f"{results[0]['params']['trainable']:,}"]
    joint_a_t = json.loads((trained["joint"] / "results.json").read_text())["A_T"]
    joint = markdown_row(md, JOINT_LABEL, 13)
    assert joint[3:5] == ["class (joint)", f"{100 * joint_a_t:.1f}"] and joint[5:10] == ["—"] * 5

    # one heat-map, of the sequence (a joint run has no "after task i"), written beside the Markdown and inlined
    refs = [ref for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) if "accuracy_matrix" in ref]
    assert refs == ["figures/accuracy_matrix_1_lora.png"]
    assert (md_path.parent / refs[0]).read_bytes().startswith(PNG_MAGIC)
    assert len(re.findall(r'src="data:image/png;base64,', html_path.read_text())) == 3  # + bars and curves

    # the ordinary run keeps every section it had; continual runs stay out of its tables and curves
    for title in ("Runs", "Results: mean ± std over seeds", "Results per run", "Training curves", "Parameters"):
        assert f"\n## {title}\n" in md
    assert markdown_row(md, "shared_specific", 11)[1] == "1"
    assert "lora" not in section(md, "Results: mean ± std over seeds") + section(md, "Results per run")
    assert "metrics.jsonl" not in md and "lacks" not in md


def test_a_report_of_continual_runs_alone_names_an_unfinished_sequence(trained: dict[str, Path], tmp_path: Path):
    unfinished = shutil.copytree(trained["seed0"], tmp_path / "unfinished")
    (unfinished / "results.json").unlink()
    state = json.loads((unfinished / "continual.json").read_text())
    (unfinished / "continual.json").write_text(json.dumps({**state, "done": 1, "matrix": state["matrix"][:1]}))
    md = write_report([trained["seed0"], trained["seed1"], unfinished], tmp_path / "out")[1].read_text()
    assert "unfinished: no results.json: interrupted or still running (1 of 2 tasks done)" in md
    assert markdown_row(md, "lora", 13)[1:3] == ["2", "0, 1 (data 0)"]  # the unfinished copy of seed 0 is not counted
    sections = re.findall(r"^## (.+)$", md, re.M)
    assert sections == ["Runs", "Continual learning", "Parameters"]


# ---- accuracy against trainable parameters --------------------------------------------------------------------
TRADEOFF = "Accuracy against trainable parameters"
QV = ["attn.qkv.q", "attn.qkv.v"]
TWO_STEPS = {"steps": 2, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def sized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRA at ranks 1 and 2 and CLoRA with 1 and 2 bases on the q and v rows, two steps each."""
    root = tmp_path_factory.mktemp("sized")
    methods = {f"lora{r}": {"name": "lora", "rank": r, "target_modules": QV} for r in (1, 2)}
    methods |= {f"clora{p}": {"name": "clora", "rank": 1, "bases": p, "target_modules": QV} for p in (1, 2)}
    return {name: _trained(root / name, method=method, train=TWO_STEPS) for name, method in methods.items()}


def test_accuracy_against_parameters_has_a_curve_per_method(sized: dict[str, Path], tmp_path: Path):
    html_path, md_path = write_report(list(sized.values()), tmp_path / "out")
    md = md_path.read_text()
    text = section(md, TRADEOFF)
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert refs == ["figures/accuracy_vs_parameters_1.png"]
    assert (md_path.parent / refs[0]).read_bytes().startswith(PNG_MAGIC)
    assert "digits, mnist: test acc/mean at the best validation step" in text
    assert "lora (2 points); clora (coefficients=module) (2 points)" in text  # ranks and bases are sizes, not curves
    assert "digits, mnist: test acc/mean at the best validation step" in html.unescape(html_path.read_text())
    assert len(re.findall(r'src="data:image/png;base64,', html_path.read_text())) == 3  # + bars and curves


def test_one_parameter_count_has_no_accuracy_against_parameters(sized: dict[str, Path], tmp_path: Path):
    md = write_report([sized["lora1"]], tmp_path / "alone")[1].read_text()
    assert f"\n## {TRADEOFF}\n" not in md and "accuracy_vs_parameters" not in md
    same_size = [  # two setups, one size: nothing to plot against
        make_run(tmp_path, "r8", "lora", 0, best=[0.8] * 3),
        make_run(tmp_path, "r4", "lora", 0, best=[0.6] * 3, rank=4),
    ]
    assert TRADEOFF not in write_report(same_size, tmp_path / "out")[1].read_text()


def test_each_data_set_has_its_own_accuracy_against_parameters(tmp_path: Path):
    other = ("cifar", "svhn", "dtd")
    runs = [
        make_run(tmp_path, "a-r8-s0", "lora", 0, best=[0.8] * 3),
        make_run(tmp_path, "a-r8-s1", "lora", 1, best=[0.7] * 3),
        make_run(tmp_path, "a-r4", "lora", 0, best=[0.6] * 3, rank=4, trainable=6_000),
        make_run(tmp_path, "a-r2", "lora", 0, best=[0.5] * 3, rank=2, trainable=6_000),
        make_run(tmp_path, "b-r8", "lora", 0, best=[0.4] * 3, domains=other),
        make_run(tmp_path, "b-r4", "lora", 0, best=[0.3] * 3, rank=4, trainable=6_000, domains=other),
        make_run(tmp_path, "c-r8", "lora", 0, best=[0.2] * 3, domains=("only", "one", "size")),
    ]
    md_path = write_report(runs, tmp_path / "out")[1]
    text = section(md_path.read_text(), TRADEOFF)
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert refs == ["figures/accuracy_vs_parameters_1.png", "figures/accuracy_vs_parameters_2.png"]
    assert all((md_path.parent / ref).read_bytes().startswith(PNG_MAGIC) for ref in refs)
    assert "fashion, mnist, digits: test acc/mean" in text and "lora (3 points)" in text
    assert "cifar, svhn, dtd: test acc/mean" in text and "lora (2 points)" in text
    assert "only, one, size" not in text  # one size alone on its data: no figure
    # two setups of one curve at one size are named, not silently joined
    (note,) = re.findall(r"\*\*Note:\*\* (.*)", text)
    assert note.startswith("fashion, mnist, digits: lora (") and "method.rank=4); lora (" in note
    assert note.endswith("method.rank=2) have 6,000 trainable parameters each (lora)")
