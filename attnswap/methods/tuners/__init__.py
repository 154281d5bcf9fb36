"""Tuners: each adds trainable weight paths to a layer's projections (one file per tuner). `members` is the
member axis of tuners with N > 1 members (an ensemble in one batched forward); `calibration` measures the
calibration of next-token predictions (for ensembles and single models alike)."""
from .. import Registry
from .base import Tuner

REGISTRY = Registry("tuner", __name__, Tuner)
register = REGISTRY.register

__all__ = ["REGISTRY", "Tuner", "register"]
