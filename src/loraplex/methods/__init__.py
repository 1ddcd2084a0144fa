"""Registered methods.  Importing this package registers every method."""

from . import baselines, mtlora, shared_specific
from .baselines import FullFinetuneConfig, LinearProbeConfig, LoRAConfig, LoRAPerTaskConfig
from .mtlora import MTLoRAConfig, MTLoRAPlusConfig
from .registry import REGISTRY, AdapterPlan, MethodConfig, get_method, make_config, method_of, register
from .shared_specific import SharedSpecificConfig

__all__ = [
    "REGISTRY",
    "AdapterPlan",
    "FullFinetuneConfig",
    "LinearProbeConfig",
    "LoRAConfig",
    "LoRAPerTaskConfig",
    "MTLoRAConfig",
    "MTLoRAPlusConfig",
    "MethodConfig",
    "SharedSpecificConfig",
    "baselines",
    "get_method",
    "make_config",
    "method_of",
    "mtlora",
    "register",
    "shared_specific",
]
