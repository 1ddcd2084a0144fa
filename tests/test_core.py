"""Core engine properties that are not per-method: subspaces, memories, banks, routes, injection."""

from __future__ import annotations

import pytest
import timm
import torch

import loraplex as lp
from loraplex.core.inject import GroupSpec, block_indices, block_layout, find_targets, inject
from loraplex.core.routing import Route, RouteContext
from loraplex.core.subspace import FeatureMemory, weight_subspaces

from .tiny import TASKS, build, images, randomize_adapters, tiny_swin, tiny_vit


def test_weight_subspaces_split_the_output_space():
    w = torch.randn(12, 5) @ torch.randn(5, 4)  # rank 4, tall
    column, null = weight_subspaces(w)
    assert column.shape == (12, 4) and null.shape == (12, 8)
    torch.testing.assert_close(null.T @ w, torch.zeros(8, 4), atol=1e-5, rtol=0)
    basis = torch.cat([column, null], 1)
    torch.testing.assert_close(basis.T @ basis, torch.eye(12), atol=1e-5, rtol=0)
    assert weight_subspaces(w, k=2)[0].shape == (12, 2)
    assert weight_subspaces(w, k=1.0)[0].shape[1] == 4  # all energy needs the full numerical rank
    with pytest.raises(ValueError, match="outside"):
        weight_subspaces(w, k=9)


@pytest.mark.parametrize("form", ["coordinates", "projection"])
def test_subspace_constraint_invariants(form):
    model = build("shared_specific", rank=3, constraint="subspace", form=form, target_modules=["qkv", "fc1"])
    x = torch.randn(10, 48)
    for layer in model.adapted_layers().values():
        w = layer.base.weight
        _, null = weight_subspaces(w)
        shared = layer.groups["shared"].delta_weight(0)
        assert shared.abs().max() > 1e-3
        torch.testing.assert_close(null.T @ shared, torch.zeros(null.shape[1], w.shape[1]), atol=1e-5, rtol=0)
        for t in range(len(TASKS)):
            domain = layer.groups["domain"].delta_weight(t)
            assert domain.abs().max() > 1e-3
            torch.testing.assert_close(w.T @ domain, torch.zeros(w.shape[1], w.shape[1]), atol=1e-5, rtol=0)
            inner = ((x @ shared.T) * (x @ domain.T)).sum(1)  # branch outputs orthogonal for any input
            torch.testing.assert_close(inner, torch.zeros(10), atol=1e-4, rtol=0)


def test_coordinate_form_has_fewer_parameters_than_projection():
    coords = lp.count_parameters(build("shared_specific", rank=2, constraint="subspace", form="coordinates"))
    proj = lp.count_parameters(build("shared_specific", rank=2, constraint="subspace", form="projection"))
    d, depth, r, n = 48, 2, 2, len(TASKS)
    # qkv is 3d×d with rank d: shared C is d×r, each domain C is 2d×r; A is r×d everywhere
    assert coords["adapter"] == depth * ((r * d + d * r) + n * (r * d + 2 * d * r))
    assert proj["adapter"] == depth * (1 + n) * (r * d + 3 * d * r)


def test_rank_beyond_the_null_space_names_the_layer_and_dimensions():
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.proj.*48×48.*dimension 0.*truncation"):
        build("shared_specific", rank=2, constraint="subspace", target_modules=["attn.proj"])
    with pytest.raises(ValueError, match=r"rank 100 .*column space of its 144×48 weight \(k=48\) has dimension 48"):
        build("shared_specific", rank=100, domain_rank=2, constraint="subspace")
    model = build("shared_specific", rank=2, constraint="subspace", k=40, target_modules=["attn.proj"])
    assert model.adapted_layers()["blocks.0.attn.proj"].groups["domain"].output_space.dim == 8


def test_input_complement_of_a_memory_silences_remembered_inputs():
    backbone = tiny_vit()
    context = RouteContext()
    spec = GroupSpec("ortho", "always", rank=4, input_subspace="complement")
    layers = inject(backbone, ["fc1"], [spec], context).layers
    g = torch.Generator().manual_seed(0)
    for layer in layers.values():
        group = layer.groups["ortho"]
        with torch.no_grad():
            group.B.normal_(generator=g)
        memory = torch.linalg.qr(torch.randn(48, 6, generator=g))[0]
        group.input_space.set_basis(memory)
        remembered = torch.randn(6, 5, generator=g)
        x = (memory @ remembered).T  # five inputs inside span(M)
        torch.testing.assert_close(group.delta_weight(0) @ x.T, torch.zeros(192, 5), atol=1e-5, rtol=0)
        fresh = torch.randn(5, 48, generator=g)
        assert (group.delta_weight(0) @ fresh.T).abs().max() > 1e-3


def test_input_span_confines_each_branch_to_its_own_basis():
    backbone = tiny_vit()
    spec = GroupSpec("residual", "task", n=2, rank=3, input_subspace="span")
    layer = next(iter(inject(backbone, ["fc2"], [spec], RouteContext()).layers.values()))
    group = layer.groups["residual"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        group.B.normal_(generator=g)
    assert group.delta_weight(0).abs().max() == 0  # an empty span allows nothing yet
    bases = [torch.linalg.qr(torch.randn(192, m, generator=g))[0] for m in (5, 2)]  # per-task widths differ
    group.input_space.set_basis(bases)
    for t, u in enumerate(bases):
        delta = group.delta_weight(t)
        outside = torch.randn(192, 4, generator=g)
        outside = outside - u @ (u.T @ outside)
        torch.testing.assert_close(delta @ outside, torch.zeros(48, 4), atol=1e-5, rtol=0)
        torch.testing.assert_close(delta @ u @ u.T, delta, atol=1e-5, rtol=1e-5)  # row space inside span(U_t)
        assert delta.abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs 192 rows"):
        group.input_space.set_basis(torch.zeros(48, 2))


def test_feature_memory_grows_by_energy_and_keeps_task_bases():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 3, generator=g))[0]
    memory = FeatureMemory(16)
    memory.observe((basis @ torch.randn(3, 200, generator=g)).T.reshape(20, 10, 16))
    first = memory.grow(threshold=0.99)
    assert first.shape == (16, 3)
    torch.testing.assert_close(first @ first.T @ basis, basis, atol=1e-4, rtol=0)
    memory.observe((basis @ torch.randn(3, 50, generator=g)).T)
    assert memory.grow(threshold=0.99).shape == (16, 0)  # nothing new to remember
    other = torch.linalg.qr(torch.randn(16, 2, generator=g))[0]
    memory.observe((other @ torch.randn(2, 80, generator=g)).T)
    directions = memory.residual_directions(2)
    torch.testing.assert_close(memory.memory.T @ directions, torch.zeros(3, 2), atol=1e-4, rtol=0)
    assert memory.grow(threshold=0.99).shape[1] == 2
    assert [b.shape[1] for b in memory.task_bases] == [3, 0, 2]
    m = memory.memory
    torch.testing.assert_close(m.T @ m, torch.eye(5), atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="before any input"):
        memory.grow(0.9)


def test_layers_record_inputs_into_a_memory_only_while_asked():
    model = build("lora")
    memory = FeatureMemory(48, cls_only=True)
    model.context.recorders["blocks.1.attn.qkv"] = memory
    model(images(4), task="mnist")
    assert memory.count == 4
    model.context.recorders.clear()
    model(images(4), task="mnist")
    assert memory.count == 4


def test_fixed_down_projection_is_a_buffer_that_gets_no_gradient():
    backbone = tiny_vit()
    layers = inject(backbone, ["qkv"], [GroupSpec("inf", "task", n=2, rank=3, train_A=False)], RouteContext()).layers
    group = next(iter(layers.values())).groups["inf"]
    assert "A" in dict(group.named_buffers()) and "A" not in dict(group.named_parameters())
    assert [n for n, _ in group.named_parameters()] == ["B"]


def test_bank_built_delta_equals_sum_of_products_and_has_rank_at_most_p_r():
    backbone = tiny_vit()
    p, r = 3, 2
    result = inject(backbone, ["attn.proj", "fc2"], [GroupSpec("clora", "always", rank=r, bank_size=p)], RouteContext())
    assert sorted(result.banks) == ["clora_48x192", "clora_48x48"]  # one bank per layer shape
    randomize_adapters(torch.nn.ModuleDict({"x": torch.nn.ModuleList(result.banks.values())}))
    for layer in result.layers.values():
        group = layer.groups["clora"]
        with torch.no_grad():
            group.Q.normal_()
            group.bank.A.normal_()
            group.bank.B.normal_()
        bank = group.bank
        expected = sum(bank.B[h] @ group.Q[0, h] @ bank.A[h] for h in range(p))
        torch.testing.assert_close(group.delta_weight(0), group.scale[0] * expected, atol=1e-5, rtol=1e-5)
        assert torch.linalg.matrix_rank(group.delta_weight(0)) <= p * r
    m = len(result.layers)
    bank_params = sum(q.numel() for b in result.banks.values() for q in b.parameters())
    q_params = sum(layer.groups["clora"].Q.numel() for layer in result.layers.values())
    d = 48
    assert bank_params == p * (r * d + d * r) + p * (r * 192 + d * r)
    assert q_params == m * p * r * r


def test_soft_routing_with_one_hot_gates_equals_task_routing():
    backbone = tiny_vit()
    context = RouteContext()
    layers = inject(backbone, ["qkv", "fc2"], [GroupSpec("experts", "soft", n=3, rank=2)], context).layers
    randomize_adapters(backbone)
    x = images(5)
    ids = torch.tensor([0, 0, 1, 2, 2])
    context.set(Route(weights=torch.nn.functional.one_hot(ids, 3).float()))
    soft = backbone(x)
    for layer in layers.values():
        layer.groups["experts"].routing = "task"  # the same factors, now routed by task id
    for strategy in ("slices", "bmm", "masked"):
        context.set(Route.for_samples(ids, strategy))
        torch.testing.assert_close(soft, backbone(x), atol=1e-5, rtol=1e-5)
    context.set(Route(task=2))
    torch.testing.assert_close(soft[3:], backbone(x[3:]), atol=1e-5, rtol=1e-5)
    for layer in layers.values():
        layer.groups["experts"].routing = "soft"
    context.set(Route())
    with pytest.raises(RuntimeError, match="without gate weights"):
        backbone(x)


def test_forward_streams_runs_the_frozen_matmul_once_and_omits_the_shared_delta():
    model = build("shared_specific", rank=2, target_modules=["fc1"])
    layer = model.adapted_layers()["blocks.0.mlp.fc1"]
    calls = []
    layer.base.register_forward_hook(lambda *_: calls.append(1))
    x_shared = torch.randn(2, 5, 48)
    x_tasks = torch.randn(3, 2, 5, 48)
    y_shared, y_tasks = layer.forward_streams(x_shared, x_tasks)
    assert len(calls) == 1
    pre = layer.base(x_shared)
    torch.testing.assert_close(y_shared, pre + x_shared @ layer.groups["shared"].delta_weight(0).T)
    for t in range(3):
        expected = pre + x_tasks[t] @ layer.groups["domain"].delta_weight(t).T
        torch.testing.assert_close(y_tasks[t], expected, atol=1e-5, rtol=1e-5)
    _, from_shared = layer.forward_streams(x_shared)
    torch.testing.assert_close(from_shared[1], pre + x_shared @ layer.groups["domain"].delta_weight(1).T)


def test_block_indices_count_across_swin_stages_and_rank_schedules_apply():
    swin = tiny_swin()
    blocks = block_indices(swin)
    assert list(blocks.values()) == [0, 1, 2, 3]
    assert list(blocks)[2] == "layers.1.blocks.0"
    assert block_layout(swin).stages == ((0, 1), (2, 3)) and block_layout(tiny_vit()).stages == ((0, 1),)
    cfg = lp.make_config(
        "shared_specific", tasks=TASKS, rank=[2, 2, 2, 2], domain_rank=[0, 0, 3, 3], target_modules=["qkv"]
    )
    model = lp.wrap(tiny_swin(), cfg, heads=dict.fromkeys(TASKS, 2))
    layers = model.adapted_layers()
    assert sorted(layers["layers.0.blocks.0.attn.qkv"].groups) == ["shared"]
    assert layers["layers.1.blocks.1.attn.qkv"].groups["domain"].rank == 3


def test_targets_regex_block_selection_and_errors():
    vit = tiny_vit()
    assert find_targets(vit, r"blocks\.\d+\.mlp\.fc\d") == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]
    assert find_targets(vit, ["qkv"], blocks=[1]) == ["blocks.1.attn.qkv"]
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*blocks\.0\.attn\.qkv"):
        find_targets(vit, ["attn.query"])
    with pytest.raises(ValueError, match="modules_to_save"):
        build("lora", modules_to_save=["no_such_norm"])


def test_modules_to_save_are_trained_and_saved(tmp_path):
    model = build("lora", modules_to_save=["norm1", "norm"])
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad and ".groups." not in n}
    assert trainable == {f"blocks.{i}.norm1.{w}" for i in range(2) for w in ("weight", "bias")} | {
        "norm.weight",
        "norm.bias",
    }
    with torch.no_grad():
        model.backbone.norm.weight.mul_(1.5)
    model.save(tmp_path / "a")
    loaded = lp.load(tmp_path / "a", tiny_vit())
    assert torch.equal(loaded.backbone.norm.weight, model.backbone.norm.weight)


def test_config_and_task_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        lp.make_config("nope", tasks=TASKS)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['rnk'\]"):
        lp.make_config("lora", tasks=TASKS, rnk=4)
    with pytest.raises(ValueError, match="'rank' must be ≥ 1"):
        lp.make_config("lora", tasks=TASKS, rank=0)
    with pytest.raises(ValueError, match="'constraint'"):
        lp.make_config("shared_specific", tasks=TASKS, constraint="orthogonal")
    model = build("lora_per_task")
    with pytest.raises(ValueError, match="unknown task 'cifar'"):
        model(images(2), task="cifar")
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\)"):
        model(images(2), task=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="heads"):
        lp.wrap(tiny_vit(), lp.make_config("lora", tasks=TASKS), heads={"fashion": 3})


def test_a_cnn_backbone_with_zero_dim_buffers_wraps_saves_and_loads(tmp_path):
    def cnn():
        torch.manual_seed(0)
        return timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()

    model = lp.wrap(cnn(), lp.make_config("full_finetune", tasks=TASKS), heads=dict.fromkeys(TASKS, 3)).eval()
    with torch.no_grad():
        model.backbone.conv1[0].weight.mul_(1.1)
    model.save(tmp_path / "cnn")
    loaded = lp.load(tmp_path / "cnn", cnn()).eval()
    x = images(2, 32)
    assert torch.equal(loaded(x, task="digits"), model(x, task="digits"))


def test_built_factors_are_cached_in_evaluation_and_rebuilt_when_a_source_changes():
    model = build("shared_specific", rank=2, constraint="subspace", form="projection", target_modules=["qkv"])
    group = model.adapted_layers()["blocks.0.attn.qkv"].groups["domain"]
    with torch.no_grad():
        first = group.factors()
        assert group.factors()[1] is first[1]  # nothing changed: the built factors are reused
        group.B.add_(1.0)  # as an optimiser step does
        rebuilt = group.factors()
        assert rebuilt[1] is not first[1]
        torch.testing.assert_close(rebuilt[1], group._build()[1])
        group.output_space.set_basis(torch.linalg.qr(torch.randn(144, 40))[0])
        torch.testing.assert_close(group.factors()[1], group._build()[1])
    with torch.enable_grad():
        assert group.factors()[1].grad_fn is not None  # training never sees a cached (detached) tensor
