"""Data layer: real offline sources, seeded stratified splits, the resumable multi-domain stream, and its loader
that reads batches in worker processes."""

from .loader import BatchLoader, eval_loader
from .sources import (
    FASHION_ROOT,
    KNOWN_CLASSES,
    DataError,
    ImageSource,
    SourceMissingError,
    load_source,
    num_classes,
    read_idx,
)
from .splits import Splits, class_balanced, split
from .stream import BatchPlan, DomainData, MultiDomainStream, eval_batches, to_model_input, to_tensor_batch

__all__ = [
    "FASHION_ROOT",
    "KNOWN_CLASSES",
    "BatchLoader",
    "BatchPlan",
    "DataError",
    "DomainData",
    "ImageSource",
    "MultiDomainStream",
    "SourceMissingError",
    "Splits",
    "class_balanced",
    "eval_batches",
    "eval_loader",
    "load_source",
    "num_classes",
    "read_idx",
    "split",
    "to_model_input",
    "to_tensor_batch",
]
