"""Video: the three dataset layouts read back from tiny real files written with PyAV, TSN sampling, the
frame-wise wrapper under mixed batches, and the offline motion benchmark generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import loraplex as lp
from loraplex import cli
from loraplex.config import ConfigError, from_dict
from loraplex.data import SourceMissingError
from loraplex.data.domains import PARTS, domain_classes, domain_parts
from loraplex.data.motion import PATTERNS, motion_clips
from loraplex.data.video import VideoDomain, VideoList, hmdb51, kinetics400, segment_indices, ucf101
from loraplex.models import FrameWise
from loraplex.train.runner import evaluate_run, load_run, train

from .tiny import TASKS, randomize_adapters, tiny_config, tiny_vit

av = pytest.importorskip("av")

STEP = 20  # frame i is a flat grey of value STEP * i, so a decoded frame tells its index


def write_video(path: Path, num_frames: int, codec: str = "mpeg4") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), STEP * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_ids(clip: torch.Tensor) -> list[int]:
    return [round(float(f.float().mean()) / STEP) for f in clip]


def clip_of(videos: VideoList, row: int, frames: int, size: int, step: int | None = None) -> torch.Tensor:
    domain = VideoDomain(videos.name, videos, list(range(len(videos))), frames=frames, size=size)
    return domain.take(torch.tensor([row]), step=step)[0]


def test_segment_sampling_centres_offsets_and_short_videos():
    assert segment_indices(16, 4, train=False) == [2, 6, 10, 14]
    assert segment_indices(3, 6, train=False) == [0, 0, 1, 1, 2, 2]
    rng = np.random.default_rng(0)
    for _ in range(20):
        picked = segment_indices(17, 4, train=True, rng=rng)
        bounds = [(0, 4), (4, 8), (8, 12), (12, 17)]
        assert all(lo <= i < hi for i, (lo, hi) in zip(picked, bounds, strict=True))
    draws = {tuple(segment_indices(40, 4, train=True, rng=rng)) for _ in range(10)}
    assert len(draws) > 1  # training offsets vary
    with pytest.raises(ValueError, match="rng"):
        segment_indices(8, 2, train=True)


def make_ucf(root: Path) -> None:
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\r\n2 HandstandPushups\r\n")
    (lists / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nHandstandPushups/v_HandStandPushups_g08_c01.avi 2\n"
    )
    (lists / "testlist01.txt").write_text("HandstandPushups/v_HandStandPushups_g01_c01.avi\n")
    for rel, n in [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 8),
        ("HandstandPushups/v_HandStandPushups_g08_c01.avi", 12),
        ("HandstandPushups/v_HandStandPushups_g01_c01.avi", 6),
    ]:
        write_video(root / "UCF-101" / rel, n)


def test_ucf101_layout_reads_back_with_centre_frames(tmp_path):
    make_ucf(tmp_path)
    train = ucf101(tmp_path, "train")
    assert train.classes == ["ApplyEyeMakeup", "HandstandPushups"] and train.labels == [0, 1]
    test = ucf101(tmp_path, "test")
    assert test.labels == [1]
    clip = clip_of(train, 1, frames=4, size=16)
    assert clip.dtype == torch.uint8 and clip.shape == (4, 16, 16, 3)
    assert frame_ids(clip) == segment_indices(12, 4, train=False) == [1, 4, 7, 10]
    with pytest.raises(SourceMissingError, match=r"trainlist02\.txt"):
        ucf101(tmp_path, "train", fold=2)


def test_training_clips_depend_on_seed_step_and_video_only(tmp_path):
    make_ucf(tmp_path)
    videos = ucf101(tmp_path, "train")
    a = VideoDomain("ucf101", videos, [0, 1], frames=3, size=16, seed=5)
    b = VideoDomain("ucf101", videos, [0, 1], frames=3, size=16, seed=5)
    assert a.sample_shape == (3, 16, 16, 3) and a.labels.tolist() == [0, 1] and a.num_classes == 2
    both = a.take(torch.tensor([0, 1]), step=7)
    # the same clip whatever else is drawn with it: rank shards decode what one process would
    assert torch.equal(both[1], b.take(torch.tensor([1]), step=7)[0])
    ids = frame_ids(both[1])
    assert all(lo <= i < hi for i, (lo, hi) in zip(ids, [(0, 4), (4, 8), (8, 12)], strict=True))
    assert len({tuple(a.frame_indices(1, step)) for step in range(8)}) > 1  # new offsets as training goes on
    assert frame_ids(a.take(torch.tensor([1]))[0]) == [2, 6, 10]  # evaluation: segment centres
    assert a.resized(8).take(torch.tensor([0])).shape == (1, 3, 8, 8, 3)


def test_hmdb51_split_labels(tmp_path):
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    for cls in ("brush_hair", "cartwheel"):
        (splits / f"{cls}_test_split1.txt").write_text(f"{cls}_a.avi 1 \n{cls}_b.avi 2 \n{cls}_c.avi 0 \n")
        for name in "abc":
            if name != "c":  # the unused video need not exist
                write_video(tmp_path / cls / f"{cls}_{name}.avi", 4)
    train, test = hmdb51(tmp_path, "train"), hmdb51(tmp_path, "test")
    assert train.classes == ["brush_hair", "cartwheel"]
    assert [p.name for p in train.paths] == ["brush_hair_a.avi", "cartwheel_a.avi"] and train.labels == [0, 1]
    assert [p.name for p in test.paths] == ["brush_hair_b.avi", "cartwheel_b.avi"]
    assert clip_of(test, 1, frames=2, size=8).shape == (2, 8, 8, 3)
    (tmp_path / "cartwheel" / "cartwheel_b.avi").unlink()
    with pytest.raises(SourceMissingError, match=r"1 of 2 videos .*cartwheel_b\.avi"):
        hmdb51(tmp_path, "test")
    assert hmdb51(tmp_path, "test", missing="skip").labels == [0]
    with pytest.raises(SourceMissingError, match="test_split2"):
        hmdb51(tmp_path, "train", fold=2)


def test_kinetics_csv_with_label_dirs_and_flat_dirs(tmp_path):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    header = "label,youtube_id,time_start,time_end,split\n"
    (annotations / "train.csv").write_text(header + "riding a bike,abc,10,20,train\nabseiling,xyz,0,10,train\n")
    (annotations / "val.csv").write_text(header + "abseiling,qqq,5,15,val\n")
    write_video(tmp_path / "train" / "riding a bike" / "abc_000010_000020.mp4", 5, codec="libx264")
    write_video(tmp_path / "train" / "abseiling" / "xyz_000000_000010.mp4", 5, codec="libx264")
    write_video(tmp_path / "val" / "qqq_000005_000015.mp4", 7, codec="libx264")  # flat (CVDF archives)
    train = kinetics400(tmp_path, "train")
    assert train.classes == ["abseiling", "riding a bike"] and train.labels == [1, 0]
    val = kinetics400(tmp_path, "val")
    assert val.labels == [0] and frame_ids(clip_of(val, 0, frames=3, size=16)) == [1, 3, 5]
    with pytest.raises(SourceMissingError, match=r"test\.csv"):
        kinetics400(tmp_path, "test")


def test_frame_wise_wrapper_mixed_batch_equals_each_clip_alone():
    cfg = lp.make_config("shared_specific", tasks=TASKS, rank=2, constraint="subspace", target_modules=["qkv", "fc1"])
    model = lp.wrap(FrameWise(tiny_vit()), cfg, heads=dict.fromkeys(TASKS, 4)).eval()
    randomize_adapters(model)
    clips = torch.randn(5, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([2, 0, 1, 0, 2])
    out = model(clips, task=ids)
    for t, name in enumerate(TASKS):
        for i in torch.nonzero(ids == t).flatten():
            alone = model(clips[i : i + 1], task=name)
            position = (out.index[name] == i).nonzero().item()
            torch.testing.assert_close(out.logits[name][position : position + 1], alone, atol=1e-5, rtol=1e-5)
    # adapters shared across frames, average pooling: a clip's features are the mean of its frames' features
    frames = torch.stack([model.forward_features(clips[0, f : f + 1].unsqueeze(1), task="digits") for f in range(3)])
    torch.testing.assert_close(model.forward_features(clips[:1], task="digits"), frames.mean(0), atol=1e-5, rtol=1e-5)


def test_concat_pooling_sees_frame_order_and_mean_pooling_does_not():
    clips = torch.randn(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mean, concat = FrameWise(tiny_vit()).eval(), FrameWise(tiny_vit(), "concat", frames=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(mean(clips), mean(clips.flip(1)), atol=1e-5, rtol=1e-5)
        assert concat(clips).shape == (2, 3 * mean.num_features) == (2, concat.num_features)
        assert not torch.allclose(concat(clips), concat(clips.flip(1)), atol=1e-3)
        per_frame = [tiny_vit().eval()(clips[:, f]) for f in range(3)]
        torch.testing.assert_close(concat(clips), torch.cat(per_frame, 1), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="concatenates 3 frames, got clips of 2"):
            concat(clips[:, :2])
    with pytest.raises(ValueError, match="needs the number of frames"):
        FrameWise(tiny_vit(), "concat")


def centroids(clip: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted (x, y) per frame."""
    weights = clip.float()
    grid = torch.arange(clip.shape[-1], dtype=torch.float32)
    total = weights.sum((1, 2))
    return torch.stack([(weights.sum(1) * grid).sum(1) / total, (weights.sum(2) * grid).sum(1) / total], 1)


def test_motion_clips_are_deterministic_and_the_pattern_is_the_class():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(10, 28, 28, generator=g) * 200 + 55).to(torch.uint8)  # no black item
    clips = motion_clips(images, 64, frames=8, seed=3)
    assert clips.clips.shape == (64, 8, 32, 32) and clips.classes == list(PATTERNS)
    assert torch.equal(clips.clips, motion_clips(images, 64, frames=8, seed=3).clips)
    assert not torch.equal(clips.clips, motion_clips(images, 64, frames=8, seed=4).clips)
    assert torch.bincount(clips.labels, minlength=len(PATTERNS)).tolist() == [8] * len(PATTERNS)
    expected = {  # sign of the centroid's (dx, dy) from first to last frame; image y grows downwards
        "left_to_right": (1, 0),
        "right_to_left": (-1, 0),
        "top_to_bottom": (0, 1),
        "bottom_to_top": (0, -1),
        "diagonal_down": (1, 1),
        "diagonal_up": (1, -1),
    }
    for clip, label in zip(clips.clips, clips.labels, strict=True):
        pattern = PATTERNS[label]
        c = centroids(clip)
        if pattern in expected:
            dx, dy = (c[-1] - c[0]).tolist()
            ex, ey = expected[pattern]
            assert (dx > 4) if ex > 0 else (dx < -4) if ex < 0 else abs(dx) < 2, (pattern, dx, dy)
            assert (dy > 4) if ey > 0 else (dy < -4) if ey < 0 else abs(dy) < 2, (pattern, dx, dy)
        elif pattern == "zoom_in":
            area = (clip > 0).flatten(1).sum(1)
            assert area[-1] > 4 * area[0]
        else:  # circle: the centroid goes round and comes back
            assert (c - c.mean(0)).norm(dim=1).min() > 1.5
            assert (c[-1] - c[0]).norm() < 2


# ---- video domains in runs ------------------------------------------------------------------------
def make_ucf_two_classes(root: Path, train_per_class: int = 3, test_per_class: int = 2) -> None:
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 Archery\n2 Bowling\n")
    train_lines, test_lines = [], []
    for label, cls in enumerate(["Archery", "Bowling"], start=1):
        for g in range(train_per_class + test_per_class):
            rel = f"{cls}/v_{cls}_g{g:02d}_c01.avi"
            write_video(root / rel, 6 + g)
            (train_lines.append(f"{rel} {label}") if g < train_per_class else test_lines.append(rel))
    (lists / "trainlist01.txt").write_text("\n".join(train_lines) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test_lines) + "\n")


def test_motion_domain_is_balanced_deterministic_clips_per_split():
    parts = domain_parts("motion:digits", root=None, seed=0, train=40, val=16, test=24, size=16, frames=4)
    assert [len(parts[p]) for p in PARTS] == [40, 16, 24]
    assert parts["train"].sample_shape == (4, 16, 16) and parts["train"].num_classes == len(PATTERNS)
    assert torch.bincount(parts["train"].labels).tolist() == [5] * len(PATTERNS)
    again = domain_parts("motion:digits", root=None, seed=0, train=40, val=16, test=24, size=16, frames=4)
    other = domain_parts("motion:digits", root=None, seed=1, train=40, val=16, test=24, size=16, frames=4)
    assert torch.equal(parts["test"].images, again["test"].images)
    assert not torch.equal(parts["test"].images, other["test"].images)
    assert domain_classes("motion:fashion") == len(PATTERNS) and domain_classes("ucf101:2") == 101


def test_video_layout_domain_carves_val_from_train_and_tests_on_the_official_list(tmp_path):
    make_ucf_two_classes(tmp_path)
    parts = domain_parts("ucf101", root=str(tmp_path), seed=0, train=None, val=2, test=None, size=8, frames=2)
    train, val, test = (parts[p] for p in PARTS)
    names = {p: {train.videos.paths[r].name for r in parts[p].rows} for p in PARTS}
    assert len(names["train"]) == 4 and len(names["val"]) == 2 and len(names["test"]) == 4
    assert not (names["train"] & names["val"]) and not (names["train"] | names["val"]) & names["test"]
    assert all(int(n.split("_g")[1][:2]) >= 3 for n in names["test"])  # the official test videos (g03, g04)
    assert sorted(val.labels.tolist()) == [0, 1] and test.take(torch.tensor([0, 3])).shape == (2, 2, 8, 8, 3)


def test_image_domains_with_a_colon_stay_image_domains(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    parts = domain_parts(f"folder:{tmp_path}", root=None, seed=0, train=4, val=2, test=4, size=8)
    assert [len(parts[p]) for p in PARTS] == [4, 2, 4] and parts["train"].frames is None


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [
        ("motion:digits", {"frames": None}, ValueError, "set data.frames"),
        ("digits", {"frames": 4}, ValueError, "use motion:digits"),
        ("motion:digits", {"frames": 4, "augment": True}, ValueError, "flips and crops"),
        ("ucf101", {"frames": 4}, SourceMissingError, r"data\.roots\.ucf101"),
        ("hmdb51:x", {"frames": 4}, ValueError, "split fold"),
    ],
)
def test_video_domain_errors_say_what_to_set(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        domain_parts(name, root=None, seed=0, train=8, val=4, test=8, size=16, **kwargs)


def test_a_video_run_trains_from_the_cli_and_reloads_frame_wise(tmp_path):
    make_ucf_two_classes(tmp_path / "ucf")
    config = tiny_config(
        tmp_path,
        data={
            "domains": ["motion:digits", "ucf101"],
            "roots": {"ucf101": str(tmp_path / "ucf")},
            "frames": 3,
            "train_per_domain": 4,
            "val_per_domain": 2,
            "test_per_domain": 4,
        },
        train={"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2},
        backbone={"temporal_pooling": "concat"},
    )
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert set(results["best"]["test"]) == {"acc/motion:digits", "acc/ucf101", "acc/mean"}
    config_back, model = load_run(run)
    assert isinstance(model.backbone, FrameWise) and config_back.data.frames == 3
    assert model.backbone.pooling == "concat" and model.backbone.num_features == 3 * 48
    assert evaluate_run(run, "best") == pytest.approx(results["best"]["test"])
    other = {**yaml.safe_load(config.read_text()), "data": {"domains": ["digits"], "frames": 3}}
    other["output"] = {**other["output"], "dir": str(tmp_path / "images")}
    with pytest.raises(ConfigError, match=r"data: .*use motion:digits"):
        train(from_dict(other))
