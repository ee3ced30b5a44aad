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
from adakd.distillers import mlkd  # noqa: F401  (issue 21: multi-level logit distillation)
from adakd.distillers import ickd, pad, srd  # noqa: F401  (issue 22: torchdistill's feature distillers)
from adakd.distillers import kdsvd, ofd  # noqa: F401  (issue 22: KDSVD, the CRD benchmark's; OFD, mdistiller's)
from adakd.distillers import ab, fsp  # noqa: F401  (issue 22: the CRD benchmark's initialisation methods)
from adakd.distillers import dist_plus, skd  # noqa: F401  (issue 22: torchdistill's DIST+ and SKD)
from adakd.distillers import sskd  # noqa: F401  (issue 22: self-supervised KD on rotated copies)
from adakd.distillers.factory import create

__all__ = ["DistillContext", "Distiller", "DistillerDefaults", "masked_mean", "relational_term", "resolve_spots",
           "available", "create", "get", "register_distiller"]
