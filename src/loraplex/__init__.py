"""loraplex: structured multi-LoRA fine-tuning of pre-trained vision transformers."""

from . import methods
from .api import AdapterFileError, count_parameters, export_peft, load, wrap
from .core.model import AdaptedModel, MixedOutput
from .methods import make_config

__version__ = "0.1.0"
__all__ = [
    "AdaptedModel",
    "AdapterFileError",
    "MixedOutput",
    "count_parameters",
    "export_peft",
    "load",
    "make_config",
    "methods",
    "wrap",
]
