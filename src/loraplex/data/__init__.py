"""Data layer: real offline sources, seeded stratified splits, and the resumable multi-domain stream."""

from .sources import (
    FASHION_ROOT,
    KNOWN_CLASSES,
    ImageSource,
    SourceMissingError,
    load_source,
    num_classes,
    read_idx,
)
from .splits import Splits, class_balanced, split
from .stream import DomainData, MultiDomainStream, eval_batches, to_model_input, to_tensor_batch

__all__ = [
    "FASHION_ROOT",
    "KNOWN_CLASSES",
    "DomainData",
    "ImageSource",
    "MultiDomainStream",
    "SourceMissingError",
    "Splits",
    "class_balanced",
    "eval_batches",
    "load_source",
    "num_classes",
    "read_idx",
    "split",
    "to_model_input",
    "to_tensor_batch",
]
