"""The contract every registered method obeys, over every route mode, on tiny timm backbones."""

from __future__ import annotations

import copy

import pytest
import torch

import loraplex as lp
from loraplex.methods import REGISTRY

from .tiny import BACKBONES, HEADS, TASKS, build, images, randomize_adapters

CASES = {
    "lora": ("lora", {"rank": 4}),
    "lora_per_task": ("lora_per_task", {"rank": 4, "alpha": 8.0}),
    "linear_probe": ("linear_probe", {}),
    "full_finetune": ("full_finetune", {}),
    "shared_specific": ("shared_specific", {"rank": 3, "domain_rank": 2, "target_modules": ["attn.qkv", "fc1"]}),
    "shared_specific_coords": (
        "shared_specific",
        {"rank": 3, "constraint": "subspace", "form": "coordinates", "target_modules": ["qkv", "fc1"]},
    ),
    "shared_specific_proj_k": (
        "shared_specific",
        {
            "rank": 2,
            "constraint": "subspace",
            "form": "projection",
            "k": 0.9,
            "target_modules": ["qkv", "attn.proj", "fc1", "fc2"],
        },
    ),
    "shared_specific_upper_heavy": (
        "shared_specific",
        {"rank": 3, "domain_rank": 2, "constraint": "subspace", "placement": "upper_heavy", "target_modules": ["qkv"]},
    ),
    # classification use of MTLoRA's groups (its dense, stream-aware use: tests/test_mtlora.py)
    "mtlora": ("mtlora", {"rank": 3, "task_rank": 2}),
    "mtlora_plus": ("mtlora_plus", {"rank": 2, "task_rank": 2}),
    "mola_grad": ("mola_grad", {"rank": 3, "freeze_backbone": True}),
    "mola_grad_trained_backbone": ("mola_grad", {"stages": [0], "ranks": [2], "stem_rank": 2, "downsample": True}),
    "mola_router": ("mola_router", {"rank": 2, "experts": 4, "router": "patch"}),
    "mola_router_top1": ("mola_router", {"rank": 2, "gate": "top1", "twd": 0.0, "freeze_backbone": True}),
    # one always-on branch per task on the k and v rows of qkv (the continual regime sets A and trains one branch)
    "inflora": ("inflora", {"rank": 2}),
    "duallora": ("duallora", {"rank": 2, "residual_rank": 2}),
    # bases shared by every module of one shape (the q and v rows of qkv: one d×d group), CLoRA# and ARC
    "clora": ("clora", {"rank": 2, "bases": 2}),
    "clora_shared": ("clora", {"rank": 2, "bases": 2, "coefficients": "shared"}),
    "arc": ("clora", {"rank": 2, "tied": True, "coefficients": "diagonal"}),
    "clora_whole_layers": ("clora", {"rank": 2, "bases": 2, "target_modules": ["attn.qkv", "mlp.fc1", "mlp.fc2"]}),
}
ADAPTED = [c for c in CASES if CASES[c][0] not in ("linear_probe", "full_finetune")]
SOFT = [c for c in CASES if CASES[c][0] == "mola_router"]
MERGEABLE = [c for c in ADAPTED if c not in SOFT]
EXPORTABLE = [c for c in MERGEABLE if c != "mola_grad_trained_backbone"]  # a trained backbone is not a PEFT LoRA
# On a ResNet every case adapts convolutions (stem, 3×3 and 1×1 convs, projection shortcuts); subspace
# constraints and MTLoRA's Swin-specific trained modules are linear-layer features (their refusal on convs
# is tested in test_mola.py).
RESNET_TARGETS = ["conv1", "conv2", "conv3", "downsample.0"]
LINEAR_ONLY = {
    *("shared_specific_coords", "shared_specific_proj_k", "shared_specific_upper_heavy"),
    *("mtlora", "mtlora_plus", "inflora", "duallora", "clora", "clora_shared", "arc", "clora_whole_layers"),
}
STRATEGIES = ["slices", "bmm", "masked"]
MIXED_IDS = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0])


def make(case: str, kind: str = "vit", **kw) -> lp.AdaptedModel:
    method, params = CASES[case]
    if kind == "resnet":
        if case in LINEAR_ONLY:
            pytest.skip(f"{case} adapts linear layers only")
        params = {**params, "target_modules": RESNET_TARGETS}
        if method == "mola_router":
            params["router"] = "resnet20"
    return build(method, kind, **{**params, **kw})


def size_of(kind: str) -> int:
    return 16 if kind == "vit" else 32


def test_every_registered_method_is_in_the_contract_suite():
    assert set(REGISTRY) <= {m for m, _ in CASES.values()}


@pytest.mark.parametrize("kind", list(BACKBONES))
@pytest.mark.parametrize("case", list(CASES))
def test_adapters_at_init_leave_the_backbone_unchanged(case, kind):
    plain = BACKBONES[kind](0)
    x = images(len(MIXED_IDS), size_of(kind))
    expected = plain(x)
    model = make(case, kind, randomize=False)
    assert torch.equal(model.forward_features(x), expected)
    assert torch.equal(model.forward_features(x, task="mnist"), expected)
    assert torch.equal(model.forward_features(x, task=MIXED_IDS), expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", list(BACKBONES))
@pytest.mark.parametrize("case", list(CASES))
def test_mixed_batch_equals_each_task_alone_outputs_and_gradients(case, kind, strategy):
    model = make(case, kind)
    model.mixed_strategy = strategy
    x = images(len(MIXED_IDS), size_of(kind))
    y = torch.arange(len(MIXED_IDS)) % 5
    params = [p for p in model.parameters() if p.requires_grad]

    out = model(x, task=MIXED_IDS)
    mixed_grads = torch.autograd.grad(out.loss(y), params, allow_unused=True)

    separate_loss = 0.0
    for t, name in enumerate(TASKS):
        idx = torch.nonzero(MIXED_IDS == t).flatten()
        logits = model(x[idx], task=name)
        torch.testing.assert_close(out.logits[name], logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.index[name], idx)
        separate_loss = separate_loss + torch.nn.functional.cross_entropy(logits, y[idx])
    separate_grads = torch.autograd.grad(separate_loss, params, allow_unused=True)
    for g_mixed, g_sep in zip(mixed_grads, separate_grads, strict=True):
        assert (g_mixed is None) == (g_sep is None)
        if g_mixed is not None:  # float32 sums in another order: tolerance relative to the gradient's scale
            scale = max(1.0, float(g_sep.abs().max()))
            torch.testing.assert_close(g_mixed, g_sep, atol=1e-4 * scale, rtol=1e-4)
    features = model.forward_features(x, task=MIXED_IDS)
    for t, name in enumerate(TASKS):
        idx = torch.nonzero(MIXED_IDS == t).flatten()
        torch.testing.assert_close(features[idx], model.forward_features(x[idx], task=name), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_all_tasks_route_equals_each_task(case):
    model = make(case)
    x = images(4)
    everything = model(x, task="all")
    assert list(everything) == TASKS
    for name in TASKS:
        torch.testing.assert_close(everything[name], model(x, task=name), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(BACKBONES))
@pytest.mark.parametrize("case", MERGEABLE)
def test_merged_equals_unmerged_and_unmerge_restores_w(case, kind):
    model = make(case, kind)
    x = images(5, size_of(kind))
    weights = {n: layer.base.weight.clone() for n, layer in model.adapted_layers().items()}
    for task in TASKS:
        expected = model(x, task=task)
        with model.merged(task=task):
            merged = model(x, task=task)
            changed = [not torch.equal(layer.base.weight, weights[n]) for n, layer in model.adapted_layers().items()]
            assert all(changed)
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
        for n, layer in model.adapted_layers().items():
            assert torch.equal(layer.base.weight, weights[n])


def test_merged_model_refuses_other_tasks_and_mixed_batches():
    model = make("lora_per_task")
    x = images(3)
    with model.merged(task="mnist"):
        with pytest.raises(RuntimeError, match="merged for task 1"):
            model(x, task="digits")
        with pytest.raises(RuntimeError, match="merged"):
            model(x, task=torch.tensor([0, 1, 2]))
    assert model.context.merged is False
    model(x, task="digits")


@pytest.mark.parametrize("kind", list(BACKBONES))
@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip_is_identical(case, kind, tmp_path):
    model = make(case, kind)
    x = images(len(MIXED_IDS), size_of(kind))
    if case in ("full_finetune", "mola_grad_trained_backbone", "mola_router"):  # trained backbone weights travel too
        with torch.no_grad():
            for p in model.backbone.parameters():
                p.add_(0.01)
    model.save(tmp_path / "adapter")
    loaded = lp.load(tmp_path / "adapter", BACKBONES[kind](0)).eval()
    for task in TASKS:
        assert torch.equal(loaded(x, task=task), model(x, task=task))
    out_a, out_b = loaded(x, task=MIXED_IDS), model(x, task=MIXED_IDS)
    for name in TASKS:
        assert torch.equal(out_a.logits[name], out_b.logits[name])
    assert lp.count_parameters(loaded) == lp.count_parameters(model)


def test_load_refuses_another_backbone_and_bad_files(tmp_path):
    model = make("shared_specific_coords")
    model.save(tmp_path / "a")
    with pytest.raises(lp.AdapterFileError, match="fingerprint"):
        lp.load(tmp_path / "a", BACKBONES["vit"](seed=1))  # same architecture, other weights
    with pytest.raises(lp.AdapterFileError, match="trained on backbone vit_tiny_patch16_224"):
        lp.load(tmp_path / "a", BACKBONES["swin"](0))
    with pytest.raises(lp.AdapterFileError, match="is missing"):
        lp.load(tmp_path / "nothing", BACKBONES["vit"](0))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "loraplex_config.json").write_text((tmp_path / "a" / "loraplex_config.json").read_text())
    data = (tmp_path / "a" / "adapters.safetensors").read_bytes()
    (broken / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(lp.AdapterFileError, match="corrupted or truncated"):
        lp.load(broken, BACKBONES["vit"](0))
    (broken / "loraplex_config.json").write_text("{not json")
    with pytest.raises(lp.AdapterFileError, match="not valid JSON"):
        lp.load(broken, BACKBONES["vit"](0))


def test_lora_equals_peft_lora_given_the_same_weights():
    peft = pytest.importorskip("peft")
    model = make("lora", rank=4, alpha=6.0, target_modules=["attn.qkv", "mlp.fc2"])
    reference = peft.get_peft_model(
        BACKBONES["vit"](0), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["attn.qkv", "mlp.fc2"])
    ).eval()
    peft_layers = dict(reference.base_model.model.named_modules())
    for name, layer in model.adapted_layers().items():
        group = layer.groups["shared"]
        with torch.no_grad():
            peft_layers[name].lora_A["default"].weight.copy_(group.A[0])
            peft_layers[name].lora_B["default"].weight.copy_(group.B[0])
    x = images(4)
    torch.testing.assert_close(reference(x), model.forward_features(x, task="fashion"), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("case", EXPORTABLE)
def test_export_peft_loads_in_peft_with_identical_outputs(case, kind, tmp_path):
    peft = pytest.importorskip("peft")
    model = make(case, kind)
    x = images(4, size_of(kind))
    lp.export_peft(model, tmp_path / "peft", task="digits")
    loaded = peft.PeftModel.from_pretrained(BACKBONES[kind](0), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(x), model.forward_features(x, task="digits"), atol=1e-5, rtol=1e-5)

    lp.export_peft(model, tmp_path / "with_head", task="digits", include_head=True)
    with_head = peft.PeftModel.from_pretrained(
        BACKBONES[kind](0, num_classes=HEADS["digits"]), tmp_path / "with_head"
    ).eval()
    torch.testing.assert_close(with_head(x), model(x, task="digits"), atol=1e-5, rtol=1e-5)


def test_export_refuses_input_dependent_routing(tmp_path):
    from loraplex.core.inject import GroupSpec, inject

    model = make("lora")
    inject(model.backbone, ["fc2"], [GroupSpec("experts", "soft", n=3, rank=2)], model.context)
    with pytest.raises(ValueError, match="input-dependent gates"):
        lp.export_peft(model, tmp_path / "p", task="mnist")
    with pytest.raises(ValueError, match="input-dependent gates"), model.merged(task="mnist"):
        pass


def test_count_parameters_is_exact():
    model = build("lora_per_task", rank=4, target_modules=["attn.qkv", "mlp.fc1"])
    d, depth = 48, 2
    per_block = 4 * (d + 3 * d) + 4 * (d + 4 * d)
    counts = lp.count_parameters(model)
    assert counts["adapter"] == len(TASKS) * depth * per_block
    assert counts["head"] == sum((d + 1) * c for c in HEADS.values())
    backbone = sum(p.numel() for p in BACKBONES["vit"](0).parameters())
    assert counts["frozen"] == backbone
    assert counts["trainable"] == counts["adapter"] + counts["head"]
    assert counts["total"] == backbone + counts["trainable"]
    probe = lp.count_parameters(build("linear_probe"))
    assert probe["adapter"] == 0 and probe["trainable"] == probe["head"]
    full = lp.count_parameters(build("full_finetune"))
    assert full["frozen"] == 0 and full["trainable"] == backbone + full["head"]


def test_training_moves_only_trainable_tensors():
    model = make("shared_specific_coords").train()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = images(len(MIXED_IDS)), torch.arange(len(MIXED_IDS)) % 5
    for _ in range(2):
        optimizer.zero_grad()
        model(x, task=MIXED_IDS).loss(y).backward()
        optimizer.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_deepcopy_keeps_one_route_context_per_model():
    model = make("lora_per_task")
    clone = copy.deepcopy(model)
    layers = list(clone.adapted_layers().values())
    assert all(layer.context is clone.context for layer in layers)
    assert clone.context is not model.context
    randomize_adapters(clone, seed=5)
    x = images(3)
    assert not torch.allclose(clone(x, task="mnist"), model(x, task="mnist"))
