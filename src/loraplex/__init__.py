"""loraplex: structured multi-LoRA fine-tuning of pre-trained vision transformers."""

from . import methods
from .api import AdapterFileError, configs_dir, count_parameters, export_peft, load, load_run, wrap
from .core.model import AdaptedModel, MixedOutput
from .methods import make_config

__version__ = "0.1.0"
__all__ = [
    "AdaptedModel",
    "AdapterFileError",
    "MixedOutput",
    "configs_dir",
    "count_parameters",
    "export_peft",
    "load",
    "load_run",
    "make_config",
    "methods",
    "wrap",
]
