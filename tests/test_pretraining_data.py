"""Pre-training sources and augmentation: fractals, clip art, the batched augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from loraplex.data import SourceMissingError, load_source
from loraplex.data.augment import Augment
from loraplex.data.fractals import default_sigma_range, make_fractal_dataset, sample_systems, sigma_factor
from loraplex.data.sources.clipart import list_clipart, load_clipart


def test_fractal_systems_hit_their_sigma_range_and_render_deterministically(tmp_path):
    for system in sample_systems(20, seed=3):
        lo, hi = default_sigma_range(len(system.prob))
        assert lo - 1e-9 <= sigma_factor(system.linear) <= hi + 1e-9
        assert np.isclose(system.prob.sum(), 1.0) and (system.prob > 0).all()
    images, labels = make_fractal_dataset(n_classes=4, per_class=3, size=32, seed=1)
    again, _ = make_fractal_dataset(n_classes=4, per_class=3, size=32, seed=1, cache=tmp_path / "f.npz")
    assert images.shape == (12, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert np.array_equal(images, again)
    assert np.array_equal(make_fractal_dataset(4, 3, size=32, seed=9, cache=tmp_path / "f.npz")[0], images)  # cached
    assert (images.reshape(12, -1) > 0).mean(1).min() > 0.01  # no empty canvases ("dust")


def test_clipart_labels_come_from_category_directories_and_small_classes_merge(tmp_path):
    root = tmp_path / "png"
    layout = {"animals/birds": 3, "animals/cats": 1, "animals/dogs": 1, "food/fruit": 2}
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
            image.paste((30, 30, 30, 255), (5, 5, 35, 15))
            image.save(root / folder / f"{i}.png")
    paths, labels, classes = list_clipart(root, level=2, min_per_class=2)
    assert classes == ["animals", "animals/birds", "food/fruit"]  # lone cat and dog join their category...
    assert len(paths) == 7 and np.bincount(labels).tolist() == [2, 3, 2]
    paths, labels, classes = list_clipart(root, level=2, min_per_class=3)
    assert classes == ["animals/birds"]  # ...and what is still too small is dropped
    images, labels, _ = load_clipart(size=16, root=root, min_per_class=2)
    assert images.shape == (7, 16, 16) and images[0, 0, 0] == 255 and images[0].min() < 100  # dark on white
    with pytest.raises(SourceMissingError, match="apt-get update && apt-get install -y openclipart-png"):
        load_source("clipart", root=str(tmp_path / "nothing"))


def test_augment_is_seeded_shaped_normalised_and_varied():
    images = torch.zeros(64, 64, 64, dtype=torch.uint8)
    images[:, 16:48, 24:40] = 200
    augment = Augment(size=32, channels=3)
    torch.manual_seed(0)
    first = augment(images)
    torch.manual_seed(0)
    assert torch.equal(first, augment(images))  # the loop's per-step seed replays it exactly
    assert first.shape == (64, 3, 32, 32) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first[:, 0], first[:, 1])  # grey stays grey
    means = first.mean((1, 2, 3))
    assert means.std() > 0.1  # crops, inversion and contrast differ per image
    assert (means > 0).any() and (means < -0.5).any()  # some inverted (light background), some not
