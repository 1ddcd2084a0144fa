"""Registered methods.  Importing this package registers every method."""

from . import baselines, shared_specific
from .baselines import FullFinetuneConfig, LinearProbeConfig, LoRAConfig, LoRAPerTaskConfig
from .registry import REGISTRY, AdapterPlan, MethodConfig, get_method, make_config, method_of, register
from .shared_specific import SharedSpecificConfig

__all__ = [
    "REGISTRY",
    "AdapterPlan",
    "FullFinetuneConfig",
    "LinearProbeConfig",
    "LoRAConfig",
    "LoRAPerTaskConfig",
    "MethodConfig",
    "SharedSpecificConfig",
    "baselines",
    "get_method",
    "make_config",
    "method_of",
    "register",
    "shared_specific",
]
