"""Seed 000 beyond the contract suite: placement over depth, the null-space error, the paper's counts,
and the analysis (numbers, CLI, report section)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import loraplex as lp
from loraplex import cli
from loraplex.config import dump_config, from_dict
from loraplex.core.inject import BlockLayout
from loraplex.eval.analysis import analyze_model, effective_rank, principal_angles
from loraplex.eval.report import write_report
from loraplex.methods.schedules import Placement, StageLast
from loraplex.train.runner import build_model

from .tiny import TASKS, build, randomize_adapters

PAPER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper" / "shared_specific_vitb_video.yaml"


def ranks_by_block(model: lp.AdaptedModel, group: str) -> list[int]:
    """Rank of ``group`` on each block's qkv, in block order (0 where the group is absent)."""
    layers = [m for name, m in model.backbone.named_modules() if name.endswith("attn.qkv")]
    return [layer.groups[group].rank if group in getattr(layer, "groups", {}) else 0 for layer in layers]


def test_placement_schedules_halve_the_depth():
    def flat(n: int) -> BlockLayout:
        return BlockLayout((tuple(range(n)),))

    assert Placement("upper_heavy", 8)(flat(12)) == [0] * 6 + [8] * 6
    assert Placement("lower_heavy", 4)(flat(5)) == [4, 4, 4, 0, 0]  # an odd middle block belongs to both halves
    assert Placement("upper_heavy", 4)(flat(5)) == [0, 0, 4, 4, 4]
    assert Placement("uniform", 2)(flat(3)) == [2, 2, 2]
    swin_t = BlockLayout(((0, 1), (2, 3), (4, 5, 6, 7, 8, 9), (10, 11)))  # depths 2, 2, 6, 2
    assert StageLast(4)(swin_t) == [0, 4, 0, 4, 0, 0, 0, 0, 0, 4, 0, 4]
    assert Placement("upper_heavy", 8)(swin_t) == [0] * 6 + [8] * 6  # placements count across stages


@pytest.mark.parametrize(("kind", "depth"), [("vit", 2), ("swin", 4)])
def test_placements_resolve_per_backbone(kind, depth):
    half = depth // 2
    upper = build("shared_specific", kind, rank=3, domain_rank=2, placement="upper_heavy", target_modules=["qkv"])
    assert ranks_by_block(upper, "shared") == [3] * depth  # default reading: shared stays everywhere
    assert ranks_by_block(upper, "domain") == [0] * half + [2] * half
    both = build(
        "shared_specific", kind, rank=3, placement="upper_heavy", placement_shared="upper_heavy", target_modules=["qkv"]
    )
    assert ranks_by_block(both, "shared") == ranks_by_block(both, "domain") == [0] * half + [3] * half
    lower = build("shared_specific", kind, rank=3, placement_shared="lower_heavy", target_modules=["qkv"])
    assert ranks_by_block(lower, "shared") == [3] * half + [0] * half
    explicit = build("shared_specific", kind, rank=[1] * depth, domain_rank=list(range(depth)), target_modules=["qkv"])
    assert ranks_by_block(explicit, "domain") == list(range(depth))


def test_placement_config_errors():
    with pytest.raises(ValueError, match="'placement' is 'upper_heavy' but the rank is an explicit per-block list"):
        lp.make_config("shared_specific", tasks=TASKS, domain_rank=[0, 2], placement="upper_heavy")
    with pytest.raises(ValueError, match="'placement_shared' must be one of"):
        lp.make_config("shared_specific", tasks=TASKS, placement_shared="top")
    with pytest.raises(ValueError, match="both 0 everywhere"):
        lp.make_config("shared_specific", tasks=TASKS, rank=0, domain_rank=[0, 0])
    with pytest.raises(ValueError, match="'domain_rank' must be ≥ 0, got -1"):
        lp.make_config("shared_specific", tasks=TASKS, domain_rank=-1)
    shared_only = build("shared_specific", rank=2, domain_rank=0, target_modules=["qkv"])
    assert ranks_by_block(shared_only, "domain") == [0, 0]


def test_domain_rank_beyond_the_left_null_space_is_an_error_through_the_method():
    # square, full-rank attn.proj with the exact rank: empty left null space; upper_heavy → first in block 1
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.proj: group 'domain' has rank 2 .*48×48.*dimension 0"):
        build("shared_specific", rank=2, constraint="subspace", placement="upper_heavy", target_modules=["attn.proj"])
    # tall qkv (144×48): null space 96; asking for more names both numbers and the ways out
    message = r"blocks\.0\.attn\.qkv: group 'domain' has rank 97 .*144×48 weight \(k=48\) has dimension 96.*truncation"
    with pytest.raises(ValueError, match=message):
        build("shared_specific", rank=2, domain_rank=97, constraint="subspace", form="coordinates")


def test_paper_config_counts_without_download_or_data(capsys):
    assert cli.main(["params", str(PAPER_CONFIG), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["adapter"] == 1_179_648  # shared + 3 domain LoRAs × 294,912 (r = 8 on 12 fused qkv)
    assert counts["head"] == 424_488  # 769 × (101 + 400 + 51)


# ---- analysis ---------------------------------------------------------------------------------------


def test_effective_rank_and_principal_angles():
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0])) == pytest.approx(3.0)
    assert effective_rank(torch.tensor([5.0, 0.0])) == pytest.approx(1.0)
    e = torch.eye(4, dtype=torch.float64)
    assert principal_angles(e[:, :2], e[:, 2:]) == pytest.approx([90.0, 90.0])
    tilted = torch.stack([e[:, 0], (e[:, 1] + e[:, 2]) / math.sqrt(2)], 1)
    assert principal_angles(e[:, :2], tilted) == pytest.approx([0.0, 45.0], abs=1e-5)


def test_analysis_separates_constrained_from_unconstrained():
    constrained = analyze_model(build("shared_specific", rank=2, constraint="subspace", target_modules=["qkv"]))
    free = analyze_model(build("shared_specific", rank=2, target_modules=["qkv"]))
    for layer in constrained["layers"]:
        assert layer["kind"] == "attn.qkv" and layer["k"] == 48
        assert layer["branches"]["shared"]["energy_column"] == pytest.approx(1.0, abs=1e-6)
        for task in TASKS:
            branch = layer["branches"][f"domain/{task}"]
            assert branch["energy_column"] == pytest.approx(0.0, abs=1e-6)
            assert branch["numerical_rank"] == 2 and 1.0 <= branch["effective_rank"] <= 2.0
            assert min(layer["angles"][f"shared | domain/{task}"]["degrees"]) == pytest.approx(90.0, abs=1e-3)
        assert "domain/fashion | domain/mnist" in layer["angles"]
    # random factors spread over the whole 144-d output space: a third of the energy in the 48-d column space
    energies = [layer["branches"]["shared"]["energy_column"] for layer in free["layers"]]
    assert all(0.05 < e < 0.95 for e in energies)
    swin = analyze_model(build("shared_specific", "swin", rank=2, target_modules=["qkv"]))
    assert [layer["block"] for layer in swin["layers"]] == [0, 1, 2, 3]  # counted across stages
    assert {layer["kind"] for layer in swin["layers"]} == {"attn.qkv"}


def fake_run(tmp_path: Path, method: dict) -> Path:
    """A run directory as `loraplex train` leaves it (config.yaml + best/), with random adapters."""
    raw = {
        "backbone": {
            "name": "vit_tiny_patch16_224",
            "img_size": 16,
            "kwargs": {"patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3},
        },
        "method": method,
        "data": {"domains": ["digits", "mnist"]},
        "output": {"dir": str(tmp_path), "tensorboard": False},
    }
    config = from_dict(raw)
    torch.manual_seed(config.train.seed)  # as `train` does: the random-init backbone is rebuilt identically
    model = build_model(config)
    randomize_adapters(model)
    model.save(tmp_path / "best")
    (tmp_path / "config.yaml").write_text(dump_config(config))
    return tmp_path


def test_analyze_command_writes_numbers_plots_and_a_report_section(tmp_path, capsys):
    method = {"name": "shared_specific", "rank": 2, "target_modules": ["qkv", "fc1"], "constraint": "subspace"}
    run = fake_run(tmp_path / "run", {**method, "k": 0.9, "placement": "upper_heavy"})
    assert cli.main(["analyze", str(run)]) == 0
    assert "domain/digits" in capsys.readouterr().out
    result = json.loads((run / "analysis" / "analysis.json").read_text())
    assert result["k"] == 0.9 and result["method"] == "shared_specific"
    assert {f["file"] for f in result["figures"]} == {"energy_column.png", "effective_rank.png", "principal_angles.png"}
    for f in result["figures"]:
        assert (run / "analysis" / f["file"]).read_bytes().startswith(b"\x89PNG")
    domain_blocks = {layer["block"] for layer in result["layers"] if "domain/mnist" in layer["branches"]}
    assert domain_blocks == {1}
    _, markdown = write_report([run], tmp_path / "report")
    text = markdown.read_text()
    assert "## Analysis" in text and "analysis_run_energy_column.png" in text
    assert (tmp_path / "report" / "figures" / "analysis_run_principal_angles.png").is_file()
