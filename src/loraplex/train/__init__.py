"""The one training loop, its regimes, DDP plumbing, and the config-to-run glue."""

from .loop import Regime, TrainingDiverged, fit

__all__ = ["Regime", "TrainingDiverged", "fit"]
