"""Gate analysis of routed models: the statistics on hand-made gates, and ``analyze`` / ``report`` on real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loraplex import cli
from loraplex.eval import write_report
from loraplex.eval.gates import collect_gates, gate_statistics, heatmap_order, sample_rows

from .test_report import PNG_MAGIC, make_run, table_rows
from .tiny import build, tiny_config

TASKS = ["a", "b", "c"]


def hand_made() -> tuple[torch.Tensor, torch.Tensor]:
    """Task a: one-hot on e0; b: uniform; c: one-hot on e1, then on e2.  Rows interleaved across tasks."""
    third = 1 / 3
    rows = [
        ([1.0, 0.0, 0.0], 0),
        ([third, third, third], 1),
        ([0.0, 1.0, 0.0], 2),
        ([1.0, 0.0, 0.0], 0),
        ([third, third, third], 1),
        ([0.0, 0.0, 1.0], 2),
        ([third, third, third], 1),
    ]
    return torch.tensor([g for g, _ in rows], dtype=torch.float64), torch.tensor([t for _, t in rows])


def test_statistics_of_known_gates():
    gates, ids = hand_made()
    stats = gate_statistics(gates, ids, TASKS)
    json.dumps(stats, allow_nan=False)  # JSON-ready: plain numbers, no NaN
    assert stats["experts"] == 3 and stats["samples"] == {"a": 2, "b": 3, "c": 2}
    expected_means = [[1, 0, 0], [1 / 3] * 3, [0, 0.5, 0.5]]
    torch.testing.assert_close(
        torch.tensor(stats["mean"], dtype=torch.float64), torch.tensor(expected_means, dtype=torch.float64)
    )

    cos_ab, cos_ac, cos_bc = 1 / math.sqrt(3), 0.0, math.sqrt(2 / 3)
    expected_cosine = [[1, cos_ab, cos_ac], [cos_ab, 1, cos_bc], [cos_ac, cos_bc, 1]]
    torch.testing.assert_close(
        torch.tensor(stats["cosine"], dtype=torch.float64), torch.tensor(expected_cosine, dtype=torch.float64)
    )
    assert stats["cosine_offdiag_mean"] == pytest.approx((cos_ab + cos_ac + cos_bc) / 3)

    h, log3 = stats["entropy"], math.log(3)
    assert h["max"] == pytest.approx(log3)
    assert h["sample"] == pytest.approx([0.0, log3, 0.0])  # one-hot: 0; uniform: log E
    assert h["sample_normalised"] == pytest.approx([0.0, 1.0, 0.0])
    assert h["of_mean"] == pytest.approx([0.0, log3, math.log(2)])  # c's samples are decided, its mean is not
    assert h["of_mean_normalised"] == pytest.approx([0.0, 1.0, math.log(2) / log3])
    assert h["overall_sample"] == pytest.approx(log3 / 3)  # tasks weighted equally
    assert stats["overall_mean"] == pytest.approx([4 / 9, 5 / 18, 5 / 18])
    assert h["overall_of_mean"] == pytest.approx(-sum(p * math.log(p) for p in (4 / 9, 5 / 18, 5 / 18)))

    # arg-max share; a uniform gate's tie goes to the first expert
    assert stats["argmax_share"] == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]


def test_edge_cases_a_task_without_samples_one_expert_and_bad_shapes():
    gates, ids = hand_made()
    stats = gate_statistics(gates, ids, [*TASKS, "empty"])
    json.dumps(stats, allow_nan=False)
    assert stats["samples"]["empty"] == 0 and stats["mean"][3] is None and stats["argmax_share"][3] is None
    assert stats["cosine"][3] == [None] * 4 and stats["cosine"][0][3] is None
    assert stats["entropy"]["overall_sample"] == pytest.approx(math.log(3) / 3)  # the empty task is left out

    single = gate_statistics(torch.ones(4, 1), torch.tensor([0, 0, 1, 1]), ["x", "y"])
    assert single["entropy"]["sample"] == [0.0, 0.0] and single["entropy"]["sample_normalised"] == [0.0, 0.0]
    assert single["cosine"] == [[1.0, 1.0], [1.0, 1.0]] and single["argmax_share"] == [[1.0], [1.0]]

    with pytest.raises(ValueError, match="one task id per row"):
        gate_statistics(torch.ones(4, 2), torch.zeros(3, dtype=torch.long), ["x"])


def test_sample_choice_and_heatmap_order_are_deterministic():
    assert sample_rows(5, 10, seed=0).tolist() == [0, 1, 2, 3, 4]
    rows = sample_rows(1000, 50, seed=3)
    assert rows.tolist() == sample_rows(1000, 50, seed=3).tolist() != sample_rows(1000, 50, seed=4).tolist()
    assert len(set(rows.tolist())) == 50 and rows.tolist() == sorted(rows.tolist()) and rows.max() > 100

    gates, ids = hand_made()
    order = heatmap_order(gates, ids).tolist()
    assert [int(ids[i]) for i in order] == sorted(ids.tolist())  # grouped by task, in task order
    assert order[-2:] == [2, 5]  # task c: the e1 sample, then the e2 one


def test_collect_gates_matches_the_router():
    model = build("mola_router", rank=2, router="patch")

    class Domain:  # what collect_gates reads of a DomainData
        def __init__(self, n: int, seed: int) -> None:
            self.images = torch.randint(
                0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
            )

        def __len__(self) -> int:
            return len(self.images)

        def take(self, rows: torch.Tensor) -> torch.Tensor:
            return self.images.index_select(0, rows)

    domains = [Domain(7, 0), Domain(3, 1), Domain(5, 2)]
    gates, ids = collect_gates(model, domains, img_size=16, samples=4, seed=0, batch_size=3)
    assert gates.shape == (11, 3) and ids.tolist() == [0] * 4 + [1] * 3 + [2] * 4
    torch.testing.assert_close(gates.sum(1), torch.ones(11))
    from loraplex.data import to_model_input

    x = to_model_input(domains[1].take(torch.arange(3)), 16)
    with torch.no_grad():
        torch.testing.assert_close(gates[4:7], model.gated(x)[0])
    with pytest.raises(ValueError, match="no router"):
        collect_gates(build("lora", rank=2), domains, img_size=16)


# ---- end to end: train through the CLI, analyze, report --------------------------------------------
ROUTER = {"name": "mola_router", "rank": 2, "router": "patch", "target_modules": ["attn.qkv", "mlp.fc1"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two router runs differing in TwD only, and a plain LoRA run, each trained for a few steps."""
    root = tmp_path_factory.mktemp("gates")
    methods = {
        "twd": {**ROUTER, "twd": 0.1},
        "notwd": {**ROUTER, "twd": 0.0},
        "lora": {"name": "lora", "rank": 2, "target_modules": ["attn.qkv", "mlp.fc1"]},
    }
    found = {}
    for name, method in methods.items():
        path = tiny_config(root / name, method=method, train={"steps": 4, "eval_every": 4, "checkpoint_every": 4})
        assert cli.main(["train", str(path), "--no-progress"]) == 0
        found[name] = root / name / "run"
    return found


def test_analyze_a_router_run_writes_gates_and_the_report_compares_runs(runs, tmp_path, capsys):
    for name in ("twd", "notwd"):
        capsys.readouterr()
        assert cli.main(["analyze", str(runs[name]), "--gate-samples", "25"]) == 0
        out = capsys.readouterr().out
        assert "ΔW analysis skipped" in out and "cosine of the tasks' mean gates" in out
        assert f"twd={0.1 if name == 'twd' else 0.0}" in out and "digits" in out and "mnist" in out

        analysis = runs[name] / "analysis"
        data = json.loads((analysis / "analysis.json").read_text())
        gates = data["gates"]
        tasks, experts = gates["tasks"], gates["experts"]
        assert tasks == ["digits", "mnist"] and experts == 2  # one expert per task by default
        assert gates["samples"] == {"digits": 25, "mnist": 25} and gates["sample_cap"] == 25
        assert gates["setup"]["twd"] == (0.1 if name == "twd" else 0.0) and gates["setup"]["router"] == "patch"
        for key in ("mean", "argmax_share"):
            assert len(gates[key]) == 2 and all(len(row) == experts for row in gates[key])
            assert all(sum(row) == pytest.approx(1.0) for row in gates[key])
        assert len(gates["cosine"]) == 2 and all(len(row) == 2 for row in gates["cosine"])
        assert all(len(gates["entropy"][k]) == 2 for k in ("sample", "sample_normalised", "of_mean"))
        assert 0 <= gates["entropy"]["overall_sample_normalised"] <= 1
        for figure in gates["figures"]:
            assert (analysis / figure["file"]).read_bytes().startswith(PNG_MAGIC)
        assert {f["file"] for f in gates["figures"]} == {"gates.png", "gate_cosine.png"}
        assert data["summary"] == [] and data["notes"]  # no fixed ΔW: skipped with a note

    # analysing again with the same cap gives the same numbers (the sample choice is seeded)
    before = json.loads((runs["twd"] / "analysis" / "analysis.json").read_text())["gates"]
    assert cli.main(["analyze", str(runs["twd"]), "--gate-samples", "25"]) == 0
    assert json.loads((runs["twd"] / "analysis" / "analysis.json").read_text())["gates"] == before

    html_path, md_path = write_report([runs["twd"], runs["notwd"]], tmp_path / "report")
    page = html_path.read_text()
    assert "Router gates" in page and "low off-diagonal cosine" in page
    rows = table_rows(page)
    overview = [r for r in rows if len(r) == 7 and r[0] in ("twd/run", "notwd/run")]
    assert [r[0] for r in overview] == ["twd/run", "notwd/run"]  # side by side, in the order given
    assert "twd=0.1" in overview[0][1] and "twd=0.0" in overview[1][1]
    assert [r for r in rows if r[:1] == ["digits"] and len(r) == 3]  # a cosine table row: digits vs both tasks
    figures = sorted(p.name for p in (tmp_path / "report" / "figures").iterdir())
    for run in ("twd_run", "notwd_run"):
        assert f"analysis_{run}_gates.png" in figures and f"analysis_{run}_gate_cosine.png" in figures
    assert "figures/analysis_twd_run_gates.png" in md_path.read_text()


def test_analyze_without_a_router_has_no_gates(runs, tmp_path, capsys):
    assert cli.main(["analyze", str(runs["lora"])]) == 0
    out = capsys.readouterr().out
    assert "gates (" not in out and "cosine" not in out and "branch" in out
    analysis = runs["lora"] / "analysis"
    data = json.loads((analysis / "analysis.json").read_text())
    assert "gates" not in data and data["summary"] and not (analysis / "gates.png").exists()
    page = write_report([runs["lora"]], tmp_path / "report")[0].read_text()
    assert "Where each ΔW lives" in page and "Router gates" not in page
    assert (tmp_path / "report" / "figures" / "analysis_run_energy_column.png").is_file()
    assert cli.main(["analyze", str(runs["twd"]), "--gate-samples", "0"]) == 2
    assert "--gate-samples must be ≥ 1" in capsys.readouterr().err


def test_report_survives_a_damaged_gates_entry(tmp_path):
    run = make_run(tmp_path, "routed", "mola_router", 0, best=[0.8, 0.8, 0.8])
    (run / "analysis").mkdir()
    good = gate_statistics(*hand_made(), TASKS) | {"split": "test", "setup": {"twd": 0.1}, "figures": []}
    entry = {"summary": [], "figures": [], "gates": good}
    (run / "analysis" / "analysis.json").write_text(json.dumps(entry))
    other = make_run(tmp_path, "broken", "mola_router", 1, best=[0.7, 0.7, 0.7])
    (other / "analysis").mkdir()
    broken = {"summary": [], "figures": [{"nofile": 1}], "gates": {"tasks": ["a"], "experts": 2}}
    (other / "analysis" / "analysis.json").write_text(json.dumps(broken))
    page = write_report([run, other], tmp_path / "out")[0].read_text()
    assert "broken: the gates entry of analysis/analysis.json is damaged (KeyError" in page
    overview = [r for r in table_rows(page) if len(r) == 7 and r[0] == "routed"]
    assert overview == [["routed", "mola_router (twd=0.1)", "3", "2 / 3", "0.465", "0.333", "0.976"]]
