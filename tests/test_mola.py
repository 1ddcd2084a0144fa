"""MoLA (seed 002): conv LoRA in the engine, the two variants, the router, TwD, and their clear errors.

The method contract (init, mixed = per-task in outputs and gradients for every kernel, merge, save/load,
PEFT export) runs MoLA on ViT, Swin and ResNet in tests/test_contract.py; here: what is MoLA's own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

import loraplex as lp
from loraplex import cli
from loraplex.core.conv import AdaptedConv2d
from loraplex.core.inject import GroupSpec, inject
from loraplex.core.model import AdaptedModel
from loraplex.core.routers import ResNet20, Router
from loraplex.core.routing import Route, RouteContext
from loraplex.methods.mola import task_sum, twd_loss

from .test_contract import MIXED_IDS, RESNET_TARGETS
from .tiny import HEADS, TASKS, build, images, tiny_config, tiny_resnet, tiny_vit

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"


def conv_lora_parameters(conv: nn.Conv2d, rank: int) -> int:
    """The paper's count: per expert r·k²·(C_in + C_out)."""
    k = conv.kernel_size[0]
    return rank * k * k * (conv.in_channels + conv.out_channels)


# ---- conv LoRA ----------------------------------------------------------------------------------
def adapted_conv(routing: str, n: int = 3, groups: int = 1) -> AdaptedConv2d:
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, groups=groups)
    net = nn.Sequential()
    net.add_module("conv", conv)
    context = RouteContext()
    inject(net, ["conv"], [GroupSpec("e", routing, n=n, rank=2, alpha=16.0)], context)
    with torch.no_grad():
        net.conv.groups["e"].B.normal_(generator=torch.Generator().manual_seed(1))
    return net.conv


def test_conv_lora_has_the_papers_format_and_delta():
    layer = adapted_conv("task")
    conv, group = layer.base, layer.groups["e"]
    assert group.A.shape == (3, 2 * 3, 6 * 3) and group.B.shape == (3, 10 * 3, 2 * 3)
    assert sum(p.numel() for p in group.parameters()) == 3 * conv_lora_parameters(conv, 2)
    assert torch.equal(group.scale, torch.full((3,), 16.0 / 2))  # alpha / r with the nominal r
    delta = (group.B[1] @ group.A[1] * 8.0).reshape(10, 6, 3, 3)  # loralib's view of B A
    torch.testing.assert_close(layer.delta_weight(1), delta)
    x = torch.randn(2, 6, 9, 9)
    layer.context.set(Route(task=1))
    expected = F.conv2d(x, conv.weight + delta, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    grouped = adapted_conv("task", groups=2)  # grouped convs: A reads C_in / g channels
    assert grouped.groups["e"].A.shape == (3, 6, 3 * 3) and grouped.delta_weight(0).shape == (10, 3, 3, 3)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("strategy", ["slices", "bmm", "masked"])
def test_soft_gates_on_a_conv_fold_each_samples_mixture_into_w(strategy, groups):
    layer = adapted_conv("soft", groups=groups)
    conv, group = layer.base, layer.groups["e"]
    x = torch.randn(4, 6, 9, 9)
    gates = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    layer.context.set(Route(task_ids=torch.tensor([0, 1, 2, 0]), weights=gates, strategy=strategy))
    stack = torch.stack([group.delta_weight(e).reshape(conv.weight.shape) for e in range(3)])
    for i in range(4):  # reference: sample i through W + Σ_e g_ie ΔW_e
        weight = conv.weight + torch.einsum("e,e...->...", gates[i], stack)
        expected = F.conv2d(x[i : i + 1], weight, conv.bias, stride=2, padding=1, groups=groups)
        torch.testing.assert_close(layer(x)[i : i + 1], expected, atol=1e-5, rtol=1e-5)


# ---- placement and parameter parity -------------------------------------------------------------
def test_stage_placement_on_a_resnet():
    model = build(
        "mola_grad", "resnet", stages=[1, 3], ranks=[2, 4], stem_rank=3, target_modules=RESNET_TARGETS, randomize=False
    )
    ranks = {n: layer.groups["experts"].rank // layer.rank_factor for n, layer in model.adapted_layers().items()}
    assert ranks["conv1"] == 3  # the stem
    assert {n.split(".")[0] for n in ranks if n != "conv1"} == {"layer2", "layer4"}
    assert all(ranks[n] == (2 if n.startswith("layer2") else 4) for n in ranks if n != "conv1")
    assert not any("downsample" in n for n in ranks)  # shortcuts only with downsample: true
    with_down = build("mola_grad", "resnet", stages=[1], ranks=[2], downsample=True, target_modules=RESNET_TARGETS)
    assert "layer2.0.downsample.0" in with_down.adapted_layers()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("mola_router_r50_vlcs.yaml", {"adapter": 2_383_872, "router": 269_492, "head": 40_980}),
        ("mola_grad_r50_vlcs.yaml", {"adapter": 1_673_824, "router": 0, "head": 40_980}),
    ],
)
def test_paper_configurations_count_as_the_paper(config, expected, capsys):
    assert cli.main(["params", str(PAPER / config), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert {k: counts[k] for k in expected} == expected


def test_the_medmnist_configuration_counts_by_the_formula(capsys):
    assert cli.main(["params", str(PAPER / "mola_grad_r18_medmnist.yaml"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    convs = [m for m in timm.create_model("resnet18").modules() if isinstance(m, nn.Conv2d)]
    assert counts["adapter"] == 9 * sum(conv_lora_parameters(c, 8) for c in convs)  # r = 8 on every conv, 9 tasks
    assert counts["router"] == 0


def test_the_router_is_the_papers_resnet20():
    router = ResNet20(4)
    assert sum(p.numel() for p in router.parameters()) == 269_332
    x = torch.randn(2, 3, 32, 32)
    assert router(x).shape == (2, 4)
    block = router.blocks[3]  # entering stage 2: stride 2, 16 → 32 channels, no parameters on the shortcut
    assert block.shortcut(torch.ones(1, 16, 8, 8)).shape == (1, 32, 4, 4)


# ---- losses -------------------------------------------------------------------------------------
def test_twd_is_the_supervised_contrastive_loss_of_the_spec():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # task 3 has a single sample: an anchor without positives
    tau = 0.7
    terms = []
    for i in range(7):
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(7) if k != i)
        for j in range(7):
            if j != i and labels[j] == labels[i]:
                terms.append(-math.log(math.exp(float(z[i] @ z[j]) / tau) / denominator))
    assert twd_loss(z, labels, tau).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert twd_loss(z, torch.arange(7), tau).item() == 0.0  # no positive pair at all


def test_mola_losses_sum_each_tasks_mean_and_add_twd():
    model = build("mola_router", rank=2, router="patch", twd=0.5, temperature=2.0).train()
    x, labels = images(len(MIXED_IDS)), torch.arange(len(MIXED_IDS)) % 5
    out = model(x, task=MIXED_IDS)
    per_task = [F.cross_entropy(out.logits[name], labels[MIXED_IDS == t]) for t, name in enumerate(TASKS)]
    torch.testing.assert_close(task_sum(out, labels, 0.0), sum(per_task))
    cfg = lp.make_config("mola_router", tasks=TASKS, rank=2, router="patch", twd=0.5, temperature=2.0)
    loss, metrics = lp.methods.get_method("mola_router").objective(cfg, out, labels, 0.0)
    torch.testing.assert_close(loss, sum(per_task) + 0.5 * twd_loss(out.router_embedding, MIXED_IDS, 2.0))
    loss.backward()
    router = dict(model.router.named_parameters())
    assert router["projection.weight"].grad.abs().sum() > 0 and router["body.fc.weight"].grad.abs().sum() > 0
    assert set(metrics) == {"twd"}


def test_mola_grad_separates_the_experts_gradients_by_task():
    model = build("mola_grad", rank=2).train()
    x, labels = images(len(MIXED_IDS)), torch.arange(len(MIXED_IDS)) % 5
    out = model(x, task=MIXED_IDS)
    mnist = MIXED_IDS == 1
    F.cross_entropy(out.outputs["mnist"][mnist], labels[mnist]).backward()
    for layer in model.adapted_layers().values():
        grad = layer.groups["experts"].B.grad
        assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())  # trained too


def test_top1_gates_are_one_hot_forward_and_softmax_backward():
    router = Router(nn.Identity(), 4, hard=True)
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.3], [1.5, 0.0, 0.2, 0.1]], requires_grad=True)
    gates = router.gates(logits)
    assert torch.equal(gates.detach(), torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]]))
    weights = torch.randn(2, 4)
    (gates * weights).sum().backward()
    soft_logits = logits.detach().clone().requires_grad_(True)
    (soft_logits.softmax(1) * weights).sum().backward()
    torch.testing.assert_close(logits.grad, soft_logits.grad)


# ---- training from the CLI ----------------------------------------------------------------------
RESNET = {"name": "resnet18", "img_size": 16, "kwargs": {"channels": [8, 8, 16, 16]}}


@pytest.mark.parametrize(
    ("backbone", "method"),
    [
        (None, {"name": "mola_router", "rank": 2, "router": "patch", "gate": "top1"}),
        (RESNET, {"name": "mola_router", "stages": [2, 3], "ranks": [2, 2], "downsample": True}),
        (RESNET, {"name": "mola_grad", "rank": 2, "stem_rank": 2, "target_modules": RESNET_TARGETS}),
    ],
)
def test_both_variants_train_from_the_cli(backbone, method, tmp_path):
    sections = {"method": method} | ({"backbone": backbone} if backbone else {})
    path = tiny_config(tmp_path, **sections)
    assert cli.main(["train", str(path), "--no-progress"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert set(results["best"]["test"]) >= {"acc/digits", "acc/mnist", "acc/mean"}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_keys = set().union(*(r for r in logged if r["split"] == "train"))
    assert ("twd" in train_keys) == (method["name"] == "mola_router")  # TwD is logged where it is trained
    model = lp.load_run(run, "best", device="cpu")
    assert model.method_name == method["name"] and (model.router is not None) == (method["name"] == "mola_router")


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_input_gets_errors_that_name_the_thing(tmp_path):
    with pytest.raises(ValueError, match="'experts' is 5, but mola_grad has one expert per task: 3 tasks"):
        lp.make_config("mola_grad", tasks=TASKS, experts=5)
    with pytest.raises(ValueError, match="'ranks' must give one rank per stage"):
        lp.make_config("mola_grad", tasks=TASKS, stages=[0, 1], ranks=[4])
    with pytest.raises(ValueError, match="names stage 4, but this backbone has 4 stage"):
        build("mola_grad", "resnet", stages=[4], ranks=[2], target_modules=RESNET_TARGETS)
    with pytest.raises(ValueError, match="per-block ranks, but this backbone has 2 blocks"):
        build("mola_grad", rank=[2, 2, 2])
    with pytest.raises(ValueError, match="'router' must be one of"):
        lp.make_config("mola_router", tasks=TASKS, router="mlp")
    model = build("mola_router", rank=2, router="patch")
    x = images(4)
    with pytest.raises(ValueError, match=r"gates of shape \(4, 2\) for a batch of 4 and 3 experts"):
        model(x, task="mnist", gates=torch.ones(4, 2))
    with pytest.raises(ValueError, match="input-dependent gates"), model.merged(task="mnist"):
        pass
    with pytest.raises(ValueError, match="no soft-routed"):
        build("mola_grad", rank=2)(x, task="mnist", gates=torch.ones(4, 3))
    lora = build("lora", rank=2)
    with pytest.raises(ValueError, match="a router was given but no adapted layer has soft-routed"):
        AdaptedModel(lora.backbone, lora.heads, TASKS, lora.context, {}, router=Router(ResNet20(3), 3))
    inject(lora.backbone, ["fc2"], [GroupSpec("experts", "soft", n=3, rank=2)], lora.context)
    with pytest.raises(ValueError, match="soft-routed \\(gated\\) groups need a router"):
        AdaptedModel(lora.backbone, lora.heads, TASKS, lora.context, {})
    with pytest.raises(ValueError, match="asks for an output subspace of W on a convolution"):
        build("shared_specific", "resnet", rank=2, constraint="subspace", target_modules=["conv2"])
    path = tiny_config(tmp_path, method={"name": "mola_router", "router": "patch", "experts": 0})
    assert cli.main(["train", str(path), "--no-progress"]) == 2  # one line, exit 2


def test_adapted_convs_keep_the_frozen_convs_geometry():
    backbone = tiny_resnet()
    model = lp.wrap(backbone, lp.make_config("lora", tasks=TASKS, rank=2, target_modules=RESNET_TARGETS), heads=HEADS)
    for layer in model.adapted_layers().values():
        assert isinstance(layer, AdaptedConv2d)
    stem = model.adapted_layers()["conv1"].base
    assert (stem.stride, stem.padding, stem.kernel_size) == ((2, 2), (3, 3), (7, 7))
    vit = lp.wrap(tiny_vit(), lp.make_config("lora", tasks=TASKS, rank=2, target_modules=["patch_embed.proj"]), HEADS)
    x = images(3)
    assert torch.equal(vit.forward_features(x, task="mnist"), tiny_vit()(x))  # B = 0: unchanged at init


@pytest.mark.parametrize(
    ("method", "kind", "strategy"), [("mola_grad", "resnet", "bmm"), ("mola_router", "resnet", "masked")]
)
def test_conv_experts_compile_to_one_graph_for_every_task_composition(method, kind, strategy):
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = build(method, kind, rank=2, target_modules=RESNET_TARGETS, freeze_backbone=True)
    model.mixed_strategy = strategy
    torch._dynamo.reset()
    counters.clear()
    model.compile(backend="eager")
    x, labels = images(8, 32), torch.arange(8) % 5
    compositions = [[0, 1, 2, 0, 1, 2, 0, 1], [2, 2, 2, 2, 2, 2, 2, 2], [1, 0, 0, 0, 0, 0, 0, 0]]
    model(x, task=torch.tensor(compositions[0])).loss(labels).backward()
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new graph from here on raises
        for ids in compositions[1:]:
            model(x, task=torch.tensor(ids)).loss(labels).backward()
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
