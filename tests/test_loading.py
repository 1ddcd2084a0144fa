"""Reading batches in worker processes: bit-identical to the stream for any number of workers, exact resume from
the state of the last batch returned, rank shards, evaluation batches, and image folders decoded on demand."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraplex.data import BatchLoader, DomainData, MultiDomainStream, eval_batches, eval_loader, load_source
from loraplex.data import sources as sources_module
from loraplex.data.domains import PARTS, domain_parts
from loraplex.data.pascal import PascalDomain
from loraplex.data.sources import FolderDomain
from loraplex.data.video import VideoDomain

from .test_data import assert_shards_interleave

SIZE = 8
Batches = list[tuple[torch.Tensor, ...]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of grey and RGB PNGs, no two of the same size."""
    root = tmp_path_factory.mktemp("folder")
    for label, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir()
        for i in range(6):
            size, colour = (5 + 3 * i, 9 + 2 * label), (40 * i, 100 * label, 7)
            image = Image.new("RGB", size, colour) if i % 2 else Image.new("L", size, 40 * i + label)
            image.save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def domains(folder: Path) -> list[DomainData]:
    """An image folder decoded on demand next to an in-memory domain, at one sample shape."""
    digits = load_source("digits")
    memory = DomainData("digits", digits.images[:30], torch.arange(30), 30).resized(SIZE, channels=3)
    return [domain_parts(f"folder:{folder}", root=None, seed=0, train=8, val=2, test=2, size=SIZE)["train"], memory]


def stream(domains: list[DomainData], **kwargs) -> MultiDomainStream:
    return MultiDomainStream(domains, batch_size=6, sampling="uniform", seed=3, **kwargs)


def batches(source: MultiDomainStream | BatchLoader, steps: int) -> Batches:
    return [source.next_batch() for _ in range(steps)]


def same(a: Batches, b: Batches) -> bool:
    return all(torch.equal(x, y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kinds", ["memory", "folder", "both"])
def test_loader_gives_the_stream_s_batches_for_any_number_of_workers(domains, workers, kinds):
    chosen = {"memory": domains[1:], "folder": domains[:1], "both": domains}[kinds]
    expected = stream(chosen)
    want = batches(expected, 5)  # crosses the folder domain's epochs
    with BatchLoader(stream(chosen), workers=workers) as loader:
        assert same(batches(loader, 5), want)
        assert loader.state_dict() == expected.state_dict()  # the last batch returned, not those read ahead


def test_resume_with_workers_is_exact_although_the_loader_read_ahead(domains):
    uninterrupted = batches(stream(domains), 7)
    with BatchLoader(stream(domains), workers=2) as first:
        assert same(batches(first, 3), uninterrupted[:3])
        state = json.loads(json.dumps(first.state_dict()))
        assert state["step"] == 3 and first.stream.step > 3
    with BatchLoader(stream(domains), workers=2) as resumed:
        resumed.load_state_dict(state)
        assert resumed.stream.step == 3  # lazy: nothing read before the first next_batch
        assert same(batches(resumed, 4), uninterrupted[3:])


def test_closing_rewinds_to_the_last_batch_returned_and_reading_goes_on(domains):
    uninterrupted = batches(stream(domains), 4)
    loader = BatchLoader(stream(domains), workers=2)
    assert loader.stream.step == 0  # no workers before the first batch
    first = batches(loader, 2)
    loader.close()
    assert loader.stream.state_dict() == loader.state_dict() and loader.state_dict()["step"] == 2
    assert same(first + batches(loader, 2), uninterrupted)
    loader.close()


def test_rank_loaders_interleave_into_the_global_batch(domains):
    world_size = 2
    single = batches(stream(domains), 4)
    shards = []
    for r in range(world_size):
        with BatchLoader(stream(domains, rank=r, world_size=world_size), workers=2) as loader:
            shards.append(batches(loader, 4))
    assert_shards_interleave(single, shards)


def test_starting_workers_leaves_the_global_rng_alone(domains):
    """Training seeds torch's RNG per step (augmentation, dropout): when workers start must not change a run."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with BatchLoader(stream(domains), workers=2) as loader:
        loader.next_batch()
    assert torch.equal(torch.rand(3), expected)


def test_eval_loader_with_workers_equals_eval_batches(domains):
    for domain in domains:  # 8 and 30 samples: a short last batch
        expected = list(eval_batches(domain, 5))
        assert same(list(eval_loader(domain, 5, workers=2)), expected)
        assert same(list(eval_loader(domain, 5)), expected)


def test_folder_parts_decode_nothing_up_front(folder, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("domain_parts decoded an image")

    monkeypatch.setattr(sources_module, "read_image", no_decoding)
    parts = domain_parts(f"folder:{folder}", root=None, seed=0, train=None, val=2, test=2, size=SIZE, augment=True)
    assert all(isinstance(parts[p], FolderDomain) for p in PARTS) and [len(parts[p]) for p in PARTS] == [8, 2, 2]
    assert parts["train"].sample_shape == (2 * SIZE, 2 * SIZE, 3) and parts["val"].sample_shape == (SIZE, SIZE, 3)
    assert parts["train"].rgb and parts["train"].num_classes == 2 and parts["train"].frames is None
    with pytest.raises(ValueError, match="RGB"):
        parts["val"].resized(SIZE, channels=1)


def test_folder_domain_reads_what_the_eager_load_and_resize_gave(tmp_path):
    """For a folder of same-size images, a run sees the pixels it saw when the folder was decoded up front."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    eager = load_source.__wrapped__(f"folder:{tmp_path}")  # images in file order: a/0, a/1, a/2, b/0, …
    files = sorted(tmp_path.glob("*/*.png"))
    parts = domain_parts(f"folder:{tmp_path}", root=None, seed=0, train=2, val=2, test=2, size=SIZE)
    for part in PARTS:
        rows = torch.tensor([files.index(path) for path in parts[part].paths])
        expected = DomainData("f", eager.images[rows], eager.labels[rows], 2).resized(SIZE)
        assert torch.equal(parts[part].take(torch.arange(len(rows))), expected.images)
        assert torch.equal(parts[part].labels, expected.labels)


def test_on_demand_tells_decoding_domains_from_in_memory_ones(domains):
    assert [d.on_demand for d in domains] == [True, False]
    assert VideoDomain.on_demand and PascalDomain.on_demand and not DomainData.on_demand


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_undecodable_image_is_an_error_naming_the_file(tmp_path, damage):
    (tmp_path / "cls").mkdir()
    Image.new("RGB", (6, 6), (1, 2, 3)).save(tmp_path / "cls" / "good.png")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noisy.save(tmp_path / "cls" / "broken.png")
    bad = tmp_path / "cls" / "broken.png"
    bad.write_bytes(b"not an image at all" if damage == "garbage" else bad.read_bytes()[:200])
    domain = FolderDomain("broken", sorted((tmp_path / "cls").iterdir()), torch.zeros(2, dtype=torch.int64), 1, SIZE)
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.png"):
        domain.take(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.png"):  # raised again from a worker
        list(eval_loader(domain, 2, workers=1))


def test_workers_do_not_hold_up_interpreter_exit():
    script = textwrap.dedent(
        """
        import torch
        from loraplex.data import BatchLoader, DomainData, MultiDomainStream

        domain = DomainData("d", torch.zeros(10, 4, 4, dtype=torch.uint8), torch.arange(10), 10)
        loader = BatchLoader(MultiDomainStream([domain], batch_size=2), workers=2)
        print(loader.next_batch()[0].shape)  # and exit with the workers running
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "torch.Size([2, 4, 4])"


def test_video_batches_are_identical_with_workers(tmp_path):
    pytest.importorskip("av")
    from .test_video import make_ucf_two_classes

    make_ucf_two_classes(tmp_path, train_per_class=2, test_per_class=1)
    parts = domain_parts("ucf101", root=str(tmp_path), seed=0, train=None, val=1, test=None, size=SIZE, frames=2)
    clips = MultiDomainStream([parts["train"]], batch_size=2, seed=1)
    want = batches(clips, 3)
    with BatchLoader(MultiDomainStream([parts["train"]], batch_size=2, seed=1), workers=2) as loader:
        assert same(batches(loader, 3), want)
