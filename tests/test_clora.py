"""CLoRA: bases shared by every module of one shape (also on q / k / v rows), CLoRA# and ARC as configurations of
the same code, SADE in its weight-only and sample-dependent forms, and the paper's parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import loraplex as lp
from loraplex.config import load_config
from loraplex.core.state import AdapterFileError, load_tensors
from loraplex.methods.clora import bank_modules, sade_loss, sade_samples, sade_weights
from loraplex.train.runner import train

from .tiny import images, randomize_adapters, tiny_config, tiny_vit

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper" / "clora_vitb_vtab.yaml"
QV = ["attn.qkv.q", "attn.qkv.v"]


def _clora(**kw) -> lp.AdaptedModel:
    cfg = lp.make_config("clora", tasks=["a"], rank=2, target_modules=QV, **kw)
    return lp.wrap(tiny_vit(), cfg, heads={"a": 3}).eval()


@pytest.mark.parametrize(
    ("overrides", "adapter"),
    [([], 13_824), (["method.bases=2"], 27_648), (["method.bases=4"], 55_296), (["method.name=lora"], 294_912)],
)
def test_the_paper_configuration_counts_as_the_paper(overrides, adapter, capsys):
    from loraplex import cli

    args = ["params", str(PAPER), "--json", *[x for o in overrides for x in ("--set", o)]]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["adapter"] == adapter


def test_every_module_is_built_from_the_shared_bases_of_its_shape():
    model = _clora(bases=2)
    randomize_adapters(model)
    (key, (bank, groups)), = bank_modules(model).items()  # fmt: skip
    assert key == "clora_48x48" and len(groups) == 2  # q and v of both blocks: one d×d shape group
    layer = model.adapted_layers()["blocks.1.attn.qkv"]
    q = layer.groups["clora"].Q  # [1 branch, 2 parts (q, v), p, r, r]
    delta = layer.delta_weight(None)
    expected = torch.zeros_like(delta)
    for part, rows in enumerate((slice(0, 48), slice(96, 144))):
        expected[rows] = sum(bank.B[h] @ q[0, part, h] @ bank.A[h] for h in range(2))
    assert torch.allclose(delta, expected, atol=1e-5)
    assert torch.all(delta[48:96] == 0)  # the k rows: no module there
    assert torch.linalg.matrix_rank(delta[:48]) <= 2 * 2  # rank ≤ p·r


def test_variants_are_configurations_of_the_same_code():
    shared = _clora(bases=2, coefficients="shared")  # CLoRA#: nothing module-specific
    assert [n for n, _ in shared.named_parameters() if ".groups." in n] == []
    assert {n.rsplit(".", 1)[1] for n, _ in shared.banks.named_parameters()} == {"A", "B", "Q"}
    arc = _clora(tied=True, coefficients="diagonal")  # ARC: B = Aᵀ, diagonal coefficients
    randomize_adapters(arc)
    layer = arc.adapted_layers()["blocks.0.attn.qkv"]
    bank, lam = layer.groups["clora"].bank, layer.groups["clora"].Q[0, 0, 0]
    assert torch.allclose(layer.delta_weight(None)[:48], bank.A[0].T @ torch.diag(lam) @ bank.A[0], atol=1e-5)
    counts = lp.count_parameters(arc)
    assert counts["adapter"] == 2 * 48 + 4 * 2  # one 2×48 basis; 4 modules × r diagonal coefficients


def test_delta_starts_at_zero_and_every_factor_trains():
    model = _clora(bases=2)
    x = images(batch=4, size=16)
    with torch.no_grad():
        assert all(torch.all(layer.delta_weight(None) == 0) for layer in model.adapted_layers().values())
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):  # the coefficients move first (the bases' gradient is zero while Q = 0), then everything
        before = [p.detach().clone() for p in params]
        optimiser.zero_grad()
        model(x, task="a").square().mean().backward()
        optimiser.step()
    moved = {n for (n, p), b in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), before,
                                     strict=True) if not torch.equal(p, b)}  # fmt: skip
    assert any(n.startswith("banks.") and n.endswith(".A") for n in moved)
    assert any(n.startswith("banks.") and n.endswith(".B") for n in moved)
    assert any(n.endswith("groups.clora.Q") for n in moved)


def _materialised_sade(bank, q: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """SADE the slow way: every contribution M_h as a matrix (and its outputs on x)."""
    values = []
    for m in range(q.shape[0]):
        maps = [bank.B[h] @ q[m, h] @ bank.A[h] for h in range(bank.size)]
        outs = maps if x is None else [x[m] @ mh.T for mh in maps]
        for h in range(bank.size):
            for k in range(bank.size):
                if h != k:
                    gram = outs[h] @ outs[k].T if x is None else outs[h].T @ outs[k]
                    values.append(gram.square().sum() / (outs[h].square().sum() * outs[k].square().sum()))
    return torch.stack(values).mean()


def test_sade_weight_form_matches_its_definition_and_the_sample_form_with_identity_inputs():
    model = _clora(bases=3)
    randomize_adapters(model)
    (bank, groups), = bank_modules(model).values()  # fmt: skip
    q = torch.cat([g.coefficients().flatten(0, 1) for g in groups]).double()
    with torch.no_grad():
        bank.double()
        weights = sade_weights(bank, q)
        assert torch.allclose(weights, _materialised_sade(bank, q), rtol=1e-9)
        identity = torch.eye(48, dtype=torch.float64).expand(q.shape[0], 48, 48)
        assert torch.allclose(sade_samples(bank, q, identity), weights, rtol=1e-9)
        x = torch.randn(q.shape[0], 20, 48, dtype=torch.float64)
        assert torch.allclose(sade_samples(bank, q, x), _materialised_sade(bank, q, x), rtol=1e-9)
        assert 0 < weights < 1
    single = _clora(bases=1)
    randomize_adapters(single)
    assert sade_loss(single) == 0  # one pair of bases: nothing to diversify


def test_sade_enters_the_training_loss_and_bad_inputs_are_refused(tmp_path):
    method = {"name": "clora", "rank": 2, "bases": 2, "sade": 0.1, "target_modules": QV}
    config = load_config(tiny_config(tmp_path, method=method, train={"steps": 4, "eval_every": 4}))
    train(config, progress=False)
    logged = [json.loads(line) for line in (Path(config.output.dir) / "metrics.jsonl").read_text().splitlines()]
    assert all("sade" in r for r in logged if r["split"] == "train")
    for bad, message in (({"bases": 0}, "'bases'"), ({"sade": -1.0}, "'sade'"), ({"coefficients": "x"}, "'coeff")):
        with pytest.raises(ValueError, match=message):
            lp.make_config("clora", tasks=["a"], **bad)
    with pytest.raises(ValueError, match="SADE regularises the contributions of shared bases: this model has no"):
        sade_loss(lp.wrap(tiny_vit(), lp.make_config("lora", tasks=["a"], rank=2), heads={"a": 3}))
    _clora(bases=2).save(tmp_path / "p2")  # a coefficient file for another p
    with pytest.raises(
        AdapterFileError, match=r"p2.* has shape \(1, 2, 2, 2, 2\), the model expects \(1, 2, 1, 2, 2\)"
    ):
        load_tensors(_clora(bases=1), tmp_path / "p2")
