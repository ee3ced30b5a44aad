"""Strategies (where and how much to distill): each owns the training step."""
from adakd.strategies.base import LossWeights, Precision, Strategy
from adakd.strategies.registry import available, get, register_strategy
from adakd.strategies import abl, abl_search, ablations, ctkd, dot, sakd, standard  # noqa: F401  (registers)

__all__ = ["LossWeights", "Precision", "Strategy", "available", "get", "register_strategy"]
