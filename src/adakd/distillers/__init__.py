"""Distillers (what to distill): one file per method, each returning one loss per spot."""
from adakd.distillers.base import (
    DistillContext,
    Distiller,
    DistillerDefaults,
    masked_mean,
    relational_term,
    resolve_spots,
)
from adakd.distillers.registry import available, get, register_distiller
from adakd.distillers import at, cc, crd, dkd, fitnets, ft, kd, nst, pkt, reviewkd, rkd, sp, vid  # noqa: F401
from adakd.distillers import dist, nkd, ttm, wsld  # noqa: F401  (issue 21: logit distillers of 2021-2024)
from adakd.distillers.factory import create

__all__ = ["DistillContext", "Distiller", "DistillerDefaults", "masked_mean", "relational_term", "resolve_spots",
           "available", "create", "get", "register_distiller"]
