"""Offline pre-training data (fractals, clip art) and objectives for small timm backbones."""

from .clipart import ClipartMissingError, list_clipart, load_clipart
from .fractals import IFS, make_fractal_dataset, render_fractals, sample_ifs, sample_systems, sigma_factor
from .objectives import (
    Augment,
    MaskedImageObjective,
    MultiObjective,
    SimCLRObjective,
    SupervisedObjective,
    pooled_features,
)

__all__ = [
    "IFS",
    "Augment",
    "ClipartMissingError",
    "MaskedImageObjective",
    "MultiObjective",
    "SimCLRObjective",
    "SupervisedObjective",
    "list_clipart",
    "load_clipart",
    "make_fractal_dataset",
    "pooled_features",
    "render_fractals",
    "sample_ifs",
    "sample_systems",
    "sigma_factor",
]
