"""Sub-module targets on fused projections (``attn.qkv.k``), always-on groups of stacked branches, and
training one branch of a stacked group at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loraplex as lp
from loraplex.config import TrainSection
from loraplex.core.inject import GroupSpec, OutputSubspaceSpec, find_targets, inject
from loraplex.core.routing import RouteContext
from loraplex.train.loop import make_optimizer, no_weight_decay_names

from .tiny import HEADS, TASKS, build, images, randomize_adapters, tiny_resnet, tiny_vit

D, DEPTH = 48, 2  # the tiny ViT's width (attn.qkv is D → 3·D) and depth
KV = ["attn.qkv.k", "attn.qkv.v"]


def _stacked_always(kind: str = "vit", n: int = 3) -> lp.AdaptedModel:
    """A LoRA model plus an ``always`` group of ``n`` branches (on the k and v rows of the ViT's qkv; on the
    ResNet's ``conv2`` layers), every factor random and each branch its own scale."""
    backbone = tiny_vit(0) if kind == "vit" else tiny_resnet(0)
    target = ["mlp.fc2"] if kind == "vit" else ["conv3"]
    model = lp.wrap(backbone, lp.make_config("lora", tasks=TASKS, rank=2, target_modules=target), heads=HEADS)
    stacked = KV if kind == "vit" else ["conv2"]
    inject(model.backbone, stacked, [GroupSpec("stack", "always", n=n, rank=2)], model.context)
    randomize_adapters(model, std=0.2 if kind == "vit" else 0.02)
    for layer in model.adapted_layers().values():
        if "stack" in layer.groups:
            layer.groups["stack"].scale.copy_(torch.tensor([0.5, 1.0, 2.0][:n]))
    return model.eval()


# ---- sub-module targets -----------------------------------------------------------------------------


def test_sub_targets_are_separate_loras_on_their_rows_only():
    model = build("lora", rank=2, target_modules=KV)
    layer = model.adapted_layers()["blocks.0.attn.qkv"]
    group = layer.groups["shared"]
    assert group.row_slices == ((D, 2 * D), (2 * D, 3 * D))
    assert group.A.shape == (1, 4, D) and group.B.shape == (1, 2, D, 2)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(0))
    expected = layer.base(x)
    s, a, b = group.scale[0], group.A[0], group.B[0]
    expected[:, D : 2 * D] += s * (x @ a[:2].T) @ b[0].T  # k rows: the first LoRA only
    expected[:, 2 * D :] += s * (x @ a[2:].T) @ b[1].T  # v rows: the second
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        _, b_eff = group.factors()
        assert group.factors()[1] is b_eff  # built once while gradients are off, like every built factor
    assert torch.equal(b_eff[:, :D], torch.zeros(1, D, 4))  # q rows untouched
    assert torch.equal(b_eff[:, D : 2 * D, 2:], torch.zeros(1, D, 2))  # k rows: none of v's columns


def test_sub_targets_merge_exactly_and_mix_tasks_like_single_tasks():
    model = build("lora_per_task", rank=2, target_modules=["attn.qkv.q", "attn.qkv.v", "mlp.fc1"])
    x = images(3)
    for task in TASKS:
        expected = model(x, task=task)
        with model.merged(task=task):
            torch.testing.assert_close(model(x, task=task), expected, atol=1e-6, rtol=1e-6)
    for strategy in ("slices", "bmm", "masked"):
        model.mixed_strategy = strategy
        mixed = model(x, task=torch.tensor([2, 0, 1]))
        for i, t in enumerate([2, 0, 1]):
            torch.testing.assert_close(mixed.outputs[TASKS[t]][i], model(x[i : i + 1], task=t)[0], atol=1e-5, rtol=0)


def test_sub_target_parameters_are_the_compact_tensors():
    r, n = 4, len(TASKS)
    model = build("lora_per_task", rank=r, target_modules=KV)
    assert lp.count_parameters(model)["adapter"] == DEPTH * n * 2 * r * (D + D)  # S·r·(in + d) per branch
    shared = build("lora", rank=r, target_modules=["attn.qkv.k"])
    assert lp.count_parameters(shared)["adapter"] == DEPTH * r * (D + D)


def test_sub_targets_save_and_load_exactly(tmp_path):
    model = build("lora_per_task", rank=2, target_modules=[*KV, "mlp.fc1"])
    model.save(tmp_path / "adapter")
    loaded = lp.load(tmp_path / "adapter", tiny_vit(0)).eval()
    x = images(4)
    for task in TASKS:
        assert torch.equal(loaded(x, task=task), model(x, task=task))
    assert loaded.adapted_layers()["blocks.1.attn.qkv"].groups["task"].row_slices == ((D, 2 * D), (2 * D, 3 * D))
    assert lp.count_parameters(loaded) == lp.count_parameters(model)


def test_sub_targets_export_to_peft_as_a_lora_with_zero_rows(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    model = build("lora_per_task", rank=2, target_modules=["attn.qkv.q", "attn.qkv.v", "mlp.fc1"])
    lp.export_peft(model, tmp_path / "peft", task="digits")
    b = load_file(tmp_path / "peft" / "adapter_model.safetensors")["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert b.shape == (3 * D, 4) and torch.equal(b[D : 2 * D], torch.zeros(D, 4))  # rank S·r, no k rows
    loaded = peft.PeftModel.from_pretrained(tiny_vit(0), tmp_path / "peft").eval()
    x = images(4)
    torch.testing.assert_close(loaded(x), model.forward_features(x, task="digits"), atol=1e-5, rtol=1e-5)


def _toy() -> nn.Module:
    """A fused projection whose rows do not split in three, and a convolution."""
    return nn.ModuleDict({"qkv": nn.Linear(6, 10), "conv": nn.Conv2d(3, 6, 3)})


@pytest.mark.parametrize(
    ("model", "targets", "spec", "message"),
    [
        (_toy, ["qkv.k"], {}, r"qkv: group 'g' targets qkv\.k, but its out_features 10 is not divisible by 3"),
        (_toy, ["conv.v"], {}, r"conv: group 'g' targets conv\.v, but it is a convolution"),
        (
            tiny_vit,
            ["attn.qkv.k"],
            {"output_subspace": OutputSubspaceSpec("column")},
            r"blocks\.0\.attn\.qkv: group 'g' targets blocks\.0\.attn\.qkv\.k with an output subspace of W",
        ),
        (
            tiny_vit,
            ["mlp.fc1"],
            {"bank_size": 1, "bank_tied": True, "bank_coefficients": "diagonal"},
            r"blocks\.0\.mlp\.fc1: a tied bank \(B = Aᵀ, ARC\) needs square modules; these are 192×48",
        ),
        (
            tiny_vit,
            ["attn.qkv", "attn.qkv.v"],
            {},
            r"blocks\.0\.attn\.qkv: group 'g' targets blocks\.0\.attn\.qkv\.v and the whole layer at once",
        ),
        (
            tiny_vit,
            ["attn.qkv.q"],
            {"rank": 49},
            r"blocks\.0\.attn\.qkv: group 'g' has rank 49, but each of its 48×48 q / k / v parts has rank at most 48",
        ),
    ],
)
def test_sub_targets_refuse_what_they_cannot_express(model, targets, spec, message):
    with pytest.raises(ValueError, match=message):
        inject(model(), targets, [GroupSpec("g", "always", **{"rank": 1, **spec})], RouteContext())


def test_sub_targets_that_match_nothing_say_what_they_name():
    with pytest.raises(ValueError, match=r"matched no nn\.Linear.*'attn\.qkvx\.k' names the k rows of a fused"):
        find_targets(tiny_vit(), ["attn.qkvx.k"])
    assert find_targets(tiny_vit(), KV, blocks=[1]) == ["blocks.1.attn.qkv"]


def test_a_whole_layer_group_and_a_sub_target_group_share_a_layer():
    model = lp.wrap(tiny_vit(0), lp.make_config("lora", tasks=TASKS, rank=2, target_modules=["attn.qkv"]), heads=HEADS)
    inject(model.backbone, ["attn.qkv.k"], [GroupSpec("k", "always", rank=2)], model.context)
    randomize_adapters(model)
    layer = model.adapted_layers()["blocks.0.attn.qkv"]
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    expected = layer.base(x) + x @ (layer.groups["shared"].delta_weight(0) + layer.groups["k"].delta_weight(0)).T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


# ---- always-on groups of stacked branches -----------------------------------------------------------


def test_a_stacked_always_group_fires_the_sum_of_its_branches():
    model = _stacked_always()
    layer = model.adapted_layers()["blocks.0.attn.qkv"]
    group = layer.groups["stack"]
    a, b = group.factors()
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(2))
    base = layer.base(x)
    singles = [base + group.scale[i] * (x @ a[i].T) @ b[i].T for i in range(3)]  # each branch alone
    torch.testing.assert_close(layer(x), base + sum(y - base for y in singles), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.delta_weight(None), sum(group.delta_weight(i) for i in range(3)))


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_a_stacked_always_group_merges_and_exports_exactly(kind, tmp_path):
    peft = pytest.importorskip("peft")
    model = _stacked_always(kind)
    x = images(3, 16 if kind == "vit" else 32)
    expected = model(x, task="mnist")
    with model.merged(task="mnist"):
        torch.testing.assert_close(model(x, task="mnist"), expected, atol=1e-5, rtol=1e-5)
    lp.export_peft(model, tmp_path / "peft", task="mnist")
    loaded = peft.PeftModel.from_pretrained(tiny_vit(0) if kind == "vit" else tiny_resnet(0), tmp_path / "peft")
    torch.testing.assert_close(loaded.eval()(x), model.forward_features(x, task="mnist"), atol=1e-5, rtol=1e-5)


def test_a_stacked_always_group_changes_the_analysis_and_refuses_task_streams():
    from loraplex.eval.analysis import analyze_model

    model = _stacked_always()
    layer = model.adapted_layers()["blocks.0.attn.qkv"]
    entry = next(e for e in analyze_model(model)["layers"] if e["layer"] == "blocks.0.attn.qkv")
    with torch.no_grad():
        norm = float(layer.groups["stack"].delta_weight(None).norm())
    assert entry["branches"]["stack"]["norm"] == pytest.approx(norm)  # every branch's ΔW, not branch 0's
    inject(model.backbone, ["attn.qkv"], [GroupSpec("task", "task", n=3, rank=1)], model.context)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: forward_streams runs always-on groups of one branch"):
        layer.forward_streams(torch.randn(2, D))


# ---- training one branch at a time ------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["task", "always"])
def test_train_only_moves_one_branch_through_the_training_loops_optimizer(routing):
    if routing == "task":
        model, key = build("lora_per_task", rank=2, target_modules=[*KV, "mlp.fc1"]), "task"
    else:  # InfLoRA's shape: one always-on branch per task on the k and v rows
        model, key = _stacked_always(), "stack"
    model.train()
    groups = [layer.groups[key] for layer in model.adapted_layers().values() if key in layer.groups]
    for group in groups:
        group.train_only(1)
    factors = {n: p for n, p in model.named_parameters() if f".groups.{key}." in n}
    assert set(factors) <= no_weight_decay_names(model)  # AdamW's decoupled decay would move branches 0 and 2
    before = {n: p.detach().clone() for n, p in factors.items()}
    optimizer = make_optimizer(model, TrainSection(lr=1e-2, weight_decay=0.1))
    x, labels = images(6), torch.tensor([0, 1, 2, 3, 4, 0])
    ids = torch.tensor([0, 1, 2, 0, 1, 2])  # every task in the batch: without train_only every branch gets gradient
    for _ in range(3):
        optimizer.zero_grad()
        model(x, task=ids).loss(labels).backward()
        for name, p in factors.items():
            assert torch.equal(p.grad[0], torch.zeros_like(p.grad[0])), name
            assert torch.equal(p.grad[2], torch.zeros_like(p.grad[2])), name
        optimizer.step()
    for name, p in factors.items():
        assert torch.equal(p[0], before[name][0]) and torch.equal(p[2], before[name][2]), name
        assert not torch.equal(p[1], before[name][1]), name

    for group in groups:
        group.train_only(None)
    assert not set(factors) & no_weight_decay_names(model)
    model.zero_grad()
    model(x, task=ids).loss(labels).backward()
    assert all(p.grad[0].abs().sum() > 0 and p.grad[2].abs().sum() > 0 for p in factors.values())
    with pytest.raises(ValueError, match="branch 3 out of range for a group of 3 branches"):
        groups[0].train_only(3)
