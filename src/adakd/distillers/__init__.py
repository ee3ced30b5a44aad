"""Distillers (what to distill): one file per method, each returning one loss per spot."""
from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.registry import available, get, register_distiller
from adakd.distillers import kd  # noqa: F401  (registers)

__all__ = ["Distiller", "DistillerDefaults", "masked_mean", "available", "get", "register_distiller"]
