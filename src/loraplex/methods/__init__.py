"""Registered methods.  Importing this package registers every method."""

from . import baselines, clora, duallora, inflora, mola, mtlora, shared_specific
from .baselines import FullFinetuneConfig, LinearProbeConfig, LoRAConfig, LoRAPerTaskConfig
from .clora import CLoRAConfig
from .duallora import DualLoRAConfig
from .inflora import InfLoRAConfig
from .mola import MoLAGradConfig, MoLARouterConfig
from .mtlora import MTLoRAConfig, MTLoRAPlusConfig
from .registry import REGISTRY, AdapterPlan, Continual, MethodConfig, get_method, make_config, method_of, register
from .shared_specific import SharedSpecificConfig

__all__ = [
    "REGISTRY",
    "AdapterPlan",
    "CLoRAConfig",
    "Continual",
    "DualLoRAConfig",
    "FullFinetuneConfig",
    "InfLoRAConfig",
    "LinearProbeConfig",
    "LoRAConfig",
    "LoRAPerTaskConfig",
    "MTLoRAConfig",
    "MTLoRAPlusConfig",
    "MethodConfig",
    "MoLAGradConfig",
    "MoLARouterConfig",
    "SharedSpecificConfig",
    "baselines",
    "clora",
    "duallora",
    "get_method",
    "inflora",
    "make_config",
    "method_of",
    "mola",
    "mtlora",
    "register",
    "shared_specific",
]
