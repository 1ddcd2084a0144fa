"""Where tensors live and in what precision, without a GPU.

* **Fake CUDA** (``FakeTensorMode``): every registered method's forwards — homogeneous, mixed batches
  (``bmm``, ``masked``), soft gates, every task at once, task streams, merged — and the regimes' losses
  run on a pretend ``cuda`` device; a tensor made on the CPU and mixed in raises.  PyTorch's autograd
  engine needs a real CUDA context for CUDA tensors, so backward passes run on the **meta** device
  instead: it has no data either, so these runs also prove the forwards and backwards never read the
  device from the host (``.item()``, ``.tolist()``, masks of data-dependent size all raise there).
  ``slices`` is left out on purpose: its segment bounds are read on the host by design.
* **bf16 / fp16** for real on the CPU: adapters load onto their backbone held in a lower precision, a
  bf16 backbone trains with fp32 factors, and a bf16 run is killed, resumes and evaluates.
* **torch.compile**: one graph, no breaks, no recompiles when the task composition changes.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

import loraplex as lp
from loraplex.core.inject import GroupSpec, inject
from loraplex.core.routing import Route
from loraplex.data.dense import TASK_OUTPUTS
from loraplex.eval.dense import task_loss
from loraplex.methods import get_method
from loraplex.train.loop import _on_cpu, make_optimizer
from loraplex.train.placement import hold_frozen, resolve_device
from loraplex.train.regimes import MultiDomainBatch, MultiDomainRegime

from .test_contract import CASES, MIXED_IDS, make, size_of
from .test_mtlora import DENSE, dense_model
from .tiny import BACKBONES, HEADS, TASKS, build, images, randomize_adapters, tiny_vit

MIXED = ("bmm", "masked")


def soft_model(kind: str = "vit") -> lp.AdaptedModel:
    """A LoRA model with a soft-routed expert group added on fc2 (the kernel routers use)."""
    model = make("lora", kind)
    inject(model.backbone, ["fc2"], [GroupSpec("experts", "soft", n=3, rank=2)], model.context)
    randomize_adapters(model)
    return model.eval()


def gates(batch: int, device: str) -> torch.Tensor:
    return torch.softmax(torch.arange(3 * batch, dtype=torch.float32, device=device).view(batch, 3), dim=1)


def run_every_route(model: lp.AdaptedModel, x: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Every route a classification model answers; returns what it produced (the losses differentiable)."""
    ids = MIXED_IDS.to(x.device)
    produced = [model(x, task="mnist"), model.forward_features(x, task="digits"), *model(x, task="all").values()]
    for strategy in MIXED:
        model.mixed_strategy = strategy
        out = model(x, task=ids)
        produced += [out.loss(labels), out.sample_losses(labels, 0.1).mean(), out.predictions()]
        produced.append(model.forward_features(x, task=ids))
    model.mixed_strategy = "bmm"
    if model.mergeable:
        with model.merged(task="digits"):
            produced.append(model(x, task="digits"))
    return produced


# ---- fake CUDA ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(BACKBONES))
@pytest.mark.parametrize("case", list(CASES))
def test_every_method_runs_every_route_on_a_fake_gpu(case, kind):
    model = make(case, kind)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to("cuda")
        x = torch.randn(len(MIXED_IDS), 3, size_of(kind), size_of(kind), device="cuda")
        labels = torch.randint(0, 5, (len(MIXED_IDS),), device="cuda")
        for out in run_every_route(model, x, labels):
            assert out.device.type == "cuda"
        regime = MultiDomainRegime.__new__(MultiDomainRegime)  # its loss alone: no data needed
        regime.label_smoothing = 0.1
        cfg = lp.make_config(model.method_name, **model.method_config)
        regime.objective = functools.partial(get_method(model.method_name).objective, cfg)  # MoLA's TwD included
        loss, metrics = regime.loss(model, MultiDomainBatch(x, labels, MIXED_IDS.to("cuda")))
        assert loss.device.type == metrics["acc"].device.type == "cuda"


def test_soft_routing_and_dense_task_streams_run_on_a_fake_gpu():
    soft, dense = soft_model(), dense_model()
    with FakeTensorMode(allow_non_fake_inputs=True):
        soft.to("cuda")
        x = torch.randn(4, 3, 16, 16, device="cuda")
        with soft.routed(Route(weights=gates(4, "cuda"))):
            assert soft.backbone(x).device.type == "cuda"
        dense.to("cuda")
        out = dense(torch.randn(2, 3, 32, 32, device="cuda"), task="all")
        targets = {
            "semseg": torch.randint(0, 21, (2, 32, 32), device="cuda"),
            "saliency": torch.rand(2, 32, 32, device="cuda"),
            "normals": torch.randn(2, 3, 32, 32, device="cuda"),
        }
        for task in DENSE:
            assert out[task].shape[1] == TASK_OUTPUTS[task]
            assert task_loss(task, out[task], targets[task]).device.type == "cuda"


def test_a_tensor_made_on_the_host_in_a_forward_is_caught(monkeypatch):
    """The fake device is a real check: a kernel that builds its one-hot on the CPU fails there."""
    from loraplex.core import layer

    model = make("lora_per_task")
    real_arange = torch.arange
    monkeypatch.setattr(layer.torch, "arange", lambda n, **kw: real_arange(n))  # drops device=
    model.mixed_strategy = "masked"
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to("cuda")
        x = torch.randn(len(MIXED_IDS), 3, 16, 16, device="cuda")
        with pytest.raises(RuntimeError, match="cuda:0 and cpu"):
            model(x, task=MIXED_IDS.to("cuda"))


def test_checkpoint_contents_are_device_free():
    model = make("shared_specific_coords").train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to("cuda")
        optimizer = make_optimizer(model, lp.config.TrainSection())
        x = torch.randn(len(MIXED_IDS), 3, 16, 16, device="cuda")
        out = model(x, task=MIXED_IDS.to("cuda"))
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)
        optimizer.step()
        state = _on_cpu(optimizer.state_dict())
        moments = [t for s in state["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
        assert moments and all(t.device.type == "cpu" for t in moments)
        assert out.outputs["mnist"].device.type == "cuda"
        assert all(t.device.type == "cpu" for t in lp.core.state.adapter_state(model).values())


# ---- meta: backward passes, and no host reads ---------------------------------------------------
@pytest.mark.parametrize("kind", list(BACKBONES))
@pytest.mark.parametrize("case", [c for c in CASES if c != "linear_probe"])
def test_forward_and_backward_never_read_the_device_from_the_host(case, kind):
    model = make(case, kind).train().to("meta")
    x = torch.randn(len(MIXED_IDS), 3, size_of(kind), size_of(kind), device="meta")
    labels = torch.randint(0, 5, (len(MIXED_IDS),), device="meta")
    losses = [out for out in run_every_route(model, x, labels) if out.is_floating_point() and out.dim() == 0]
    cfg = lp.make_config(model.method_name, **model.method_config)  # the method's own objective (MoLA's TwD)
    losses.append(get_method(model.method_name).objective(cfg, model(x, task=MIXED_IDS.to("meta")), labels, 0.0)[0])
    sum(losses).backward()
    model(x, task="fashion").sum().backward()  # the homogeneous route's backward too
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device.type == "meta" for g in grads)


def test_soft_gates_and_task_streams_backward_on_meta():
    soft = soft_model().train().to("meta")
    x = torch.randn(4, 3, 16, 16, device="meta")
    with soft.routed(Route(weights=gates(4, "meta"))):
        soft.backbone(x).sum().backward()
    assert soft.adapted_layers()["blocks.0.mlp.fc2"].groups["experts"].B.grad.device.type == "meta"
    dense = dense_model().train().to("meta")
    out = dense(torch.randn(2, 3, 32, 32, device="meta"), task="all")
    task_loss("normals", out["normals"], torch.randn(2, 3, 32, 32, device="meta")).backward()
    normals = list(DENSE).index("normals")
    assert all(p.grad is not None for n, p in dense.named_parameters() if n.startswith(f"heads.{normals}."))


# ---- precision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_adapter_loads_onto_its_backbone_held_in_lower_precision_and_refuses_others(dtype, tmp_path):
    model = make("shared_specific_coords")
    model.save(tmp_path / "a")
    x = images(len(MIXED_IDS))
    low = lp.load(tmp_path / "a", tiny_vit(0).to(dtype)).eval()
    frozen = {p.dtype for p in low.backbone.parameters() if not p.requires_grad}
    trained = {p.dtype for p in low.parameters() if p.requires_grad}
    assert frozen == {dtype} and trained == {torch.float32}
    with torch.no_grad():  # no autocast: the factors follow the activations' dtype, the heads get fp32 features
        torch.testing.assert_close(low(x.to(dtype), task="mnist"), model(x, task="mnist"), atol=0.05, rtol=0.05)
    with pytest.raises(lp.AdapterFileError, match=f"held in {str(dtype).removeprefix('torch.')}"):
        lp.load(tmp_path / "a", tiny_vit(1).to(dtype))  # other weights, same precision
    mixed = tiny_vit(0).to(torch.bfloat16)
    mixed.norm.to(torch.float16)
    with pytest.raises(lp.AdapterFileError, match="mixes bfloat16 and float16"):
        lp.load(tmp_path / "a", mixed)


def test_a_bf16_backbone_trains_fp32_factors_with_and_without_autocast():
    """Two ways to hold a frozen backbone in bf16: cast whole by the user (no autocast needed), or the run's
    way (``backbone.dtype``: matmul weights only) under autocast."""
    cfg = lp.make_config("shared_specific", tasks=TASKS, rank=3, domain_rank=2, target_modules=["attn.qkv", "fc1"])
    whole = lp.wrap(tiny_vit(0).to(torch.bfloat16), cfg, heads=HEADS).train()
    held = hold_frozen(build("shared_specific", rank=3, domain_rank=2, target_modules=["attn.qkv", "fc1"]), "bf16")
    x, labels = images(len(MIXED_IDS)), torch.arange(len(MIXED_IDS)) % 5
    loss = whole(x.to(torch.bfloat16), task=MIXED_IDS).loss(labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss + held.train()(x, task=MIXED_IDS).loss(labels)
    loss.backward()
    for model in (whole, held):
        assert model.adapted_layers()["blocks.0.attn.qkv"].base.weight.dtype == torch.bfloat16
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
                assert torch.isfinite(p.grad).all(), name
        assert model.adapted_layers()["blocks.0.attn.qkv"].groups["domain"].B.grad.abs().sum() > 0


def test_device_settings_fail_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(lp.config.ConfigError, match="no usable CUDA device; use cpu or auto"):
        resolve_device("cuda:1")


# ---- torch.compile ------------------------------------------------------------------------------
COMPOSITIONS = [[0, 1, 2, 0, 1, 2, 0, 1], [2, 2, 2, 2, 2, 2, 2, 2], [1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 2, 2, 1, 1]]


@pytest.mark.parametrize("strategy", MIXED)
def test_a_compiled_model_is_one_graph_for_every_task_composition(strategy):
    model = build("shared_specific", rank=3, domain_rank=2, constraint="subspace", target_modules=["qkv", "fc1"])
    model.mixed_strategy = strategy
    torch._dynamo.reset()
    counters.clear()
    model.compile(backend="eager")
    x, labels = images(8), torch.arange(8) % 5
    model.train()
    model(x, task=torch.tensor(COMPOSITIONS[0])).loss(labels).backward()  # the training graph
    with torch.no_grad():
        model(x, task="fashion")  # the homogeneous graph
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # any new graph from here on raises
        for ids in COMPOSITIONS[1:]:
            model(x, task=torch.tensor(ids)).loss(labels).backward()
        with torch.no_grad():
            for task in TASKS:
                model(x, task=task)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


def test_soft_gates_compile_to_one_graph():
    model = soft_model()
    torch._dynamo.reset()
    counters.clear()
    model.compile(backend="eager")
    x = images(4)
    with torch.no_grad(), model.routed(Route(weights=gates(4, "cpu"))):
        model.backbone(x)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for shift in range(3):
            with model.routed(Route(weights=gates(4, "cpu").roll(shift, 1))):
                model.backbone(x)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_compiled_outputs_equal_eager_ones():
    model = make("shared_specific", "vit")
    x = images(len(MIXED_IDS))
    with torch.no_grad():
        expected = model(x, task=MIXED_IDS).outputs
        model.compile(backend="aot_eager")  # AOTAutograd traces the forward as inductor would, without codegen
        got = model(x, task=MIXED_IDS).outputs
    for name in HEADS:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)
