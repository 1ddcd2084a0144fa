"""MTLoRA on Swin: the dense pyramid, the stream-aware blocks' exact dataflow, dense heads, what is
trained, the paper's parameter count, and dense models' save/load."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

import loraplex as lp
from loraplex import cli
from loraplex.config import ConfigError, from_dict, load_config
from loraplex.core.layer import AdaptedLinear
from loraplex.data import SourceMissingError
from loraplex.data.dense import TASK_OUTPUTS
from loraplex.data.scenes import dense_scenes, normals_of, scene_target, smooth_height
from loraplex.eval.dense import DenseMeter, delta_m, task_loss
from loraplex.eval.floors import dense_pixel_floor
from loraplex.models.dense import SwinPyramid, TimmPyramid, _attention_before_proj, _unwindow, block_streams
from loraplex.models.heads import DenseHead
from loraplex.train.runner import build_regime, domain_splits, evaluate_run

from .tiny import randomize_adapters, tiny_config

DENSE = {"semseg": 21, "saliency": 1, "normals": 3}
PAPER = "configs/paper/mtlora_swin_t_pascal.yaml"
SWIN_T_BLOCK_WIDTHS = 2 * 96 + 2 * 192 + 6 * 384 + 2 * 768  # Σ over blocks of the block's width C


def tiny_swin3(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=32, patch_size=2,
        window_size=4, embed_dim=24, depths=(2, 2, 2), num_heads=(2, 2, 4),
    ).eval()  # fmt: skip


def dense_model(method: str = "mtlora", seed: int = 0, randomize: bool = True, **kw) -> lp.AdaptedModel:
    cfg = lp.make_config(method, tasks=list(DENSE), **({"rank": 3, "task_rank": 2} | kw))
    model = lp.wrap(SwinPyramid(tiny_swin3(seed)), cfg, heads=DENSE, head={"kind": "dense", "out_size": 32})
    if randomize:
        randomize_adapters(model)
    return model.eval()


def x_images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_pyramid_is_each_stage_after_patch_merging_without_final_norm():
    swin = tiny_swin3()
    x = x_images()
    stages = swin.forward_intermediates(x, intermediates_only=True, norm=False)  # timm: before merging
    pyramid = SwinPyramid(swin)
    features = pyramid(x)
    assert pyramid.feature_channels == [48, 96, 96] == [f.shape[1] for f in features]
    for i, feature in enumerate(features):
        expected = stages[i].permute(0, 2, 3, 1)
        if i + 1 < len(stages):
            expected = swin.layers[i + 1].downsample(expected)
        torch.testing.assert_close(feature, expected.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="timm SwinTransformer"):
        SwinPyramid(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0))


def test_task_specific_layers_sit_in_the_last_block_of_each_stage_only():
    model = dense_model()
    task_layers = sorted(n for n, m in model.adapted_layers().items() if "task" in m.groups)
    last = ["layers.0.blocks.1", "layers.1.blocks.1", "layers.2.blocks.1"]
    assert task_layers == sorted(f"{b}.{m}" for b in last for m in ("attn.proj", "mlp.fc1", "mlp.fc2"))
    qkv = model.adapted_layers()["layers.2.blocks.1.attn.qkv"]
    assert list(qkv.groups) == ["shared"]  # attention runs once
    shared = model.adapted_layers()["layers.0.blocks.0.mlp.fc1"].groups["shared"]
    assert float(shared.scale[0]) == 4.0 and shared.dropout.p == 0.05  # constant scale, not alpha / r
    assert isinstance(model.adapted_layers()["layers.0.blocks.1.mlp.fc1"].groups["task"].dropout, torch.nn.Identity)


def test_stream_block_follows_the_exact_dataflow():
    model = dense_model()
    block = model.backbone.layers[0].blocks[1]  # shifted windows, task-specific layers
    x = torch.randn(2, 16, 16, 24, generator=torch.Generator().manual_seed(1))
    with model.routed(lp.core.routing.Route()):
        shared, tasks = block_streams(block, x)
        torch.testing.assert_close(shared, block(x), atol=1e-5, rtol=1e-5)  # the shared stream is the block
    proj, fc1, fc2 = block.attn.proj, block.mlp.fc1, block.mlp.fc2
    windows, padded = _attention_before_proj(block, block.norm1(x))
    for t in range(len(DENSE)):

        def task_only(layer: AdaptedLinear, frozen_in: torch.Tensor, task_in: torch.Tensor, t: int = t) -> torch.Tensor:
            delta = layer.groups["task"].delta_weight(t)  # the task path omits the shared delta
            return layer.base(frozen_in) + task_in @ delta.T

        h_shared = x + _unwindow(block, proj.base(windows) + windows @ proj.delta_weight(None).T, padded, 16, 16)
        h_task = x + _unwindow(block, task_only(proj, windows, windows), padded, 16, 16)
        n_shared, n_task = block.norm2(h_shared), block.norm2(h_task)
        g_shared = F.gelu(fc1.base(n_shared) + n_shared @ fc1.delta_weight(None).T)
        g_task = F.gelu(task_only(fc1, n_shared, n_task))  # frozen matmul on the shared input
        expected = h_task + task_only(fc2, g_shared, g_task)
        torch.testing.assert_close(tasks[t], expected, atol=1e-5, rtol=1e-5)


def test_all_tasks_in_one_pass_equal_each_task_and_zero_task_deltas_share_features():
    model = dense_model()
    x = x_images()
    everything = model(x, task="all")
    assert {k: tuple(v.shape) for k, v in everything.items()} == {t: (2, c, 32, 32) for t, c in DENSE.items()}
    for name in DENSE:
        torch.testing.assert_close(everything[name], model(x, task=name))
    assert not torch.allclose(everything["semseg"][:, :1], model(x, task="saliency")[:, :1])
    fresh = dense_model(randomize=False)  # B = 0: every task stream equals the shared one
    with fresh.routed(lp.core.routing.Route()):
        streams = fresh.backbone.forward_tasks(x, len(DENSE))
    for per_task in streams:
        for got, expected in zip(per_task, fresh.backbone(x), strict=True):
            torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="every task on every image"):
        model(x, task=torch.tensor([0, 1]))
    assert not model.mergeable
    with pytest.raises(ValueError, match="not one LoRA per task"):
        lp.export_peft(model, "/tmp/unused", task="semseg")


def test_what_mtlora_and_mtlora_plus_train():
    for method, reduction_trained in (("mtlora", True), ("mtlora_plus", False)):
        model = dense_model(method)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert "backbone.patch_embed.proj.weight" in trainable and "backbone.patch_embed.norm.bias" in trainable
        assert "backbone.layers.1.blocks.0.attn.relative_position_bias_table" in trainable
        assert "backbone.layers.1.blocks.0.norm2.weight" in trainable
        assert "backbone.layers.0.blocks.0.attn.qkv.base.bias" not in trainable  # frozen linears keep their bias
        assert ("backbone.layers.1.downsample.reduction.weight" in trainable) is reduction_trained
        adapted = "layers.1.downsample.reduction" in model.adapted_layers()
        assert adapted is not reduction_trained  # MTLoRA+: frozen reduction with a shared LoRA


def test_dense_head_matches_the_paper_structure():
    head = DenseHead([192, 384, 768, 768], 21, out_size=448)
    fusion = 192 * 18 + 384 * 36 + 768 * 72 + 768 * 144  # bias-free 1×1 convs to HRNet-W18 widths
    decode = (270 * 1080 + 1080) + 2 * 1080 + (1080 * 21 + 21)
    assert sum(p.numel() for p in head.parameters()) == fusion + decode
    features = [torch.randn(1, c, s, s) for c, s in ((192, 8), (384, 4), (768, 2), (768, 2))]
    assert head.eval()(features).shape == (1, 21, 448, 448)


def test_paper_configuration_counts_exactly(capsys):
    counts = {}
    for rank in (16, 64):
        assert cli.main(["params", PAPER, "--json", "--set", f"method.rank={rank}"]) == 0
        counts[rank] = json.loads(capsys.readouterr().out)
    assert counts[16]["trainable"] == 4_953_146  # MTLoRA's 4.95 M
    assert counts[64]["trainable"] - counts[16]["trainable"] == (64 - 16) * 16 * SWIN_T_BLOCK_WIDTHS
    assert counts[64]["trainable"] == 8_344_634  # the paper's 8.34 M


def test_dense_model_save_load_round_trip(tmp_path):
    model = dense_model("mtlora_plus")
    with torch.no_grad():
        model.backbone.layers[0].blocks[0].norm1.weight.add_(0.1)  # a trained backbone module travels too
    model.save(tmp_path / "adapter")
    loaded = lp.load(tmp_path / "adapter", SwinPyramid(tiny_swin3())).eval()
    x = x_images()
    for name, out in model(x, task="all").items():
        assert torch.equal(loaded(x, task="all")[name], out)


def test_multitask_config_errors_name_the_key(tmp_path):
    raw = load_config(PAPER).to_dict()
    bad = [
        ({"data": {**raw["data"], "tasks": []}}, "needs data.tasks"),
        ({"data": {**raw["data"], "tasks": ["semseg", "edges"]}}, r"unknown dense task\(s\) \['edges'\]"),
        ({"train": {**raw["train"], "task_weights": {"depth": 1.0}}}, r"task_weights names \['depth'\]"),
        ({"train": {**raw["train"], "regime": "multidomain"}}, "data.tasks is for train.regime multitask"),
    ]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_dict({**raw, **change})
    with pytest.raises(SourceMissingError, match=r"PASCAL_MT from disk: set data.roots.pascal_context"):
        build_regime(load_config(PAPER), None)


# ---- dense data, metrics and the multitask regime ----------------------------------------------
def test_scenes_are_deterministic_with_consistent_targets():
    g = torch.Generator().manual_seed(0)
    pool = (torch.rand(6, 28, 28, generator=g) * 255).to(torch.uint8), torch.arange(1, 7)
    a, b = dense_scenes([pool], 8, size=32, seed=1), dense_scenes([pool], 8, size=32, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    semseg, depth, normals = (scene_target(a.targets, t) for t in ("semseg", "depth", "normals"))
    assert semseg.min() >= 0 and semseg.max() <= 6 and (semseg > 0).any()
    assert torch.equal(scene_target(a.targets, "saliency"), (semseg > 0).float())
    background = semseg == 0
    assert torch.all(depth[:, 0][background] == 1.0) and torch.all(depth[:, 0][~background] < 1.0)
    assert torch.all(a.images[background] == 0) and torch.all(a.images[~background] > 40)  # items: bright pixels
    torch.testing.assert_close(normals.norm(dim=1), torch.ones_like(depth[:, 0]), atol=2e-3, rtol=0)
    flat = torch.zeros(1, 5, 5)
    torch.testing.assert_close(normals_of(flat)[0], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 5, 5))
    ramp = torch.arange(5.0).view(1, 5).expand(5, 5)  # h = x: normal ∝ (−1, 0, 1)
    torch.testing.assert_close(normals_of(ramp)[:, 2, 2], torch.tensor([-1.0, 0.0, 1.0]) / 2**0.5)


def test_scene_normals_are_expressible_at_the_pyramids_finest_stride():
    """The reason the height field is smoothed: a head predicting on a stride-4 map and upsampling must be
    able to beat a flat surface (on raw fields the cell-averaged truth scored worse than flat)."""
    g = torch.Generator().manual_seed(0)
    pool = (torch.rand(6, 28, 28, generator=g) * 255).to(torch.uint8), torch.arange(1, 7)
    normals = scene_target(dense_scenes([pool], 16, size=32, seed=0).targets, "normals")
    cells = F.interpolate(F.adaptive_avg_pool2d(normals, 8), size=32, mode="bilinear", align_corners=False)
    flat = torch.zeros_like(normals)
    flat[:, 2] = 1.0
    error = {}
    for name, pred in (("cells", cells), ("flat", flat)):
        meter = DenseMeter("normals", 3)
        meter.update(pred, normals)
        error[name] = meter.result()["mean_angle"]
    assert error["cells"] < 0.6 * error["flat"], error
    constant = torch.full((32, 32), 0.7)
    torch.testing.assert_close(smooth_height(constant), constant)  # flat stays flat, borders included


def test_dense_metrics_on_known_predictions():
    target = torch.tensor([[[0, 1], [1, 2]]])
    meter = DenseMeter("semseg", 3)
    meter.update(F.one_hot(torch.tensor([[[0, 1], [2, 2]]]), 3).permute(0, 3, 1, 2).float(), target)
    # class 0: 1/1, class 1: 1/2 (one of its pixels called 2), class 2: 1/2
    assert meter.result()["miou"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    sal = DenseMeter("saliency", 1)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    sal.update((mask * 20 - 10).unsqueeze(1), mask)
    assert sal.result() == {"miou": pytest.approx(1.0), "maxf": pytest.approx(1.0)}
    normals = DenseMeter("normals", 3)
    up = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2)
    tilted = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]).unsqueeze(0).unsqueeze(2)  # 45° and 0°
    normals.update(tilted * 3.0, up)  # the scale of the prediction does not matter
    assert normals.result()["mean_angle"] == pytest.approx(22.5, abs=1e-4)
    assert normals.result()["rmse_angle"] == pytest.approx((45**2 / 2) ** 0.5, abs=1e-4)
    depth = DenseMeter("depth", 1)
    depth.update(torch.zeros(1, 1, 1, 2), torch.tensor([[[[3.0, 4.0]]]]))
    assert depth.result()["rmse"] == pytest.approx((25 / 2) ** 0.5)
    assert delta_m({"semseg": 0.55, "normals": 18.0}, {"semseg": 0.5, "normals": 20.0}) == pytest.approx(10.0)
    logits = torch.tensor([[[[3.0, -3.0, -3.0, -3.0]]]])  # 1 positive of 4: positives weigh 3/4, negatives 1/4
    expected = (0.75 * F.softplus(-torch.tensor(3.0)) + 3 * 0.25 * F.softplus(torch.tensor(-3.0))) / 4
    assert task_loss("saliency", logits, torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])) == pytest.approx(float(expected))


def test_normals_loss_averages_over_valid_elements_as_mtloras_code_does():
    target = torch.zeros(1, 3, 1, 3)
    target[0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])  # one valid pixel, two invalid (zero vector)
    target[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])
    pred = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 1, 3)  # right at pixel 1, wrong at pixel 0
    # |(1,0,0) − (0,0,1)| summed = 2 over pixel 0, 0 over pixel 1: mean over the 6 valid elements is 2/6
    assert task_loss("normals", pred, target) == pytest.approx(2 / 6)


def test_task_loras_reading_the_shared_input_share_the_shared_loras_dropout_mask():
    """At ``attn.proj`` (no per-task input) the official code drops the input once and feeds both LoRAs."""
    model = dense_model().train()
    layer = model.adapted_layers()["layers.0.blocks.1.attn.proj"]
    mask = (torch.arange(24) % 3 != 0).float() * 1.5

    class FixedMask(torch.nn.Module):
        def forward(self, x):
            return x * mask

    layer.groups["shared"].dropout = FixedMask()
    x = torch.randn(4, 16, 24)
    with torch.no_grad():
        y_shared, y_tasks = layer.forward_streams(x)
        pre = layer.base(x)
        torch.testing.assert_close(y_shared, pre + (x * mask) @ layer.groups["shared"].delta_weight(0).T)
        for t in range(len(DENSE)):
            expected = pre + (x * mask) @ layer.groups["task"].delta_weight(t).T
            torch.testing.assert_close(y_tasks[t], expected, atol=1e-5, rtol=1e-5)


def test_a_dense_multitask_run_trains_from_the_cli(tmp_path, capsys):
    config = tiny_config(
        tmp_path,
        backbone={"name": "swin_tiny_patch4_window7_224", "img_size": 32,
                  "kwargs": {"patch_size": 2, "window_size": 4, "embed_dim": 24, "depths": [2, 2, 2],
                             "num_heads": [2, 2, 4]}},
        method={"name": "mtlora", "rank": 2, "task_rank": 2},
        data={"domains": ["scenes"], "tasks": ["semseg", "saliency", "normals", "depth"], "train_per_domain": 48,
              "val_per_domain": 16, "test_per_domain": 16},
        train={"regime": "multitask", "steps": 6, "batch_size": 8, "warmup_steps": 1, "eval_every": 3,
               "checkpoint_every": 3, "task_weights": {"normals": 10.0}},
    )  # fmt: skip
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    test = results["best"]["test"]
    assert {"semseg/miou", "saliency/maxf", "normals/mean_angle", "normals/rmse_angle", "depth/rmse"} <= set(test)
    assert results["selection_metric"] == "score/mean" and 0.0 < test["score/mean"] <= 1.0
    assert evaluate_run(tmp_path / "run", "best") == pytest.approx(test)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/semseg", "loss/normals"} <= set(records[0])
    assert (tmp_path / "run" / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "run_seed1"  # a second seed of the same setup: its maps are not shown twice
    shutil.copytree(tmp_path / "run", again)
    saved = yaml.safe_load((again / "config.yaml").read_text())
    saved["train"]["seed"] = 1
    (again / "config.yaml").write_text(yaml.safe_dump(saved))
    assert cli.main(["report", str(tmp_path / "run"), str(again), "--out", str(tmp_path / "report")]) == 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Dense predictions" in html and "semseg/miou" in html and html.count("predicted map.</figcaption>") == 1


def test_a_cnn_is_a_dense_backbone_from_its_stages_after_the_stem(tmp_path):
    """The dense benchmark's small-CNN floor: timm stage outputs under the same dense heads, same loop."""
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    pyramid = TimmPyramid(cnn)
    features = pyramid(x_images())
    assert pyramid.num_features == [64, 128, 256, 512] == [f.shape[1] for f in features]
    assert [f.shape[-1] for f in features] == [8, 4, 2, 1]  # strides 4 … 32 at 32 px
    expected = cnn.forward_intermediates(x_images(), indices=[1, 2, 3, 4], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(features, expected, strict=True))
    with pytest.raises(ValueError, match="no stage features"):
        TimmPyramid(torch.nn.Linear(2, 2))
    config = tiny_config(
        tmp_path,
        backbone={"name": "resnet10t", "img_size": 32, "kwargs": {}},
        method={"name": "full_finetune"},
        data={"domains": ["scenes"], "tasks": ["semseg", "depth"], "train_per_domain": 16, "val_per_domain": 8,
              "test_per_domain": 8},
        train={"regime": "multitask", "steps": 2, "batch_size": 4, "warmup_steps": 0, "eval_every": 2},
    )  # fmt: skip
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    test = json.loads((tmp_path / "run" / "results.json").read_text())["best"]["test"]
    assert {"semseg/miou", "depth/rmse"} <= set(test)


def test_dense_pixel_floor_reads_what_raw_pixels_show():
    """Per-pixel linear models on raw patches: saliency of items on a black canvas is visible in the pixels
    (near-perfect), item classes are not (far below); metrics are named as the multitask regime names them."""
    config = from_dict(
        {"backbone": {"name": "swin_clipart_tiny", "img_size": 32}, "method": {"name": "linear_probe"},
         "data": {"domains": ["scenes"], "tasks": ["semseg", "saliency", "normals", "depth"],
                  "train_per_domain": 48, "val_per_domain": 16, "test_per_domain": 16},
         "train": {"regime": "multitask"}}
    )  # fmt: skip
    metrics = dense_pixel_floor(domain_splits(config), config.data.tasks, TASK_OUTPUTS, scene_target)
    assert set(metrics) == {"semseg/miou", "saliency/miou", "saliency/maxf", "normals/mean_angle",
                            "normals/rmse_angle", "depth/rmse"}  # fmt: skip
    assert metrics["saliency/maxf"] > 0.95 and metrics["semseg/miou"] < 0.5
    assert 0 < metrics["normals/mean_angle"] <= metrics["normals/rmse_angle"] < 90 and 0 < metrics["depth/rmse"] < 1
