"""Numeric rules shared by every room: the precision losses are computed in (a ground-floor module)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def at_least_float32(t: Tensor) -> Tensor:
    """`t` in float32 when narrower (autocast's float16/bfloat16, where CE and softmax could overflow), else as is.

    A plain `.float()` would round a float64 run's losses to float32, so that it could not match a float64 reference.
    """
    return t.to(torch.promote_types(t.dtype, torch.float32))


def cross_entropy_upcast(logits: Tensor, targets: Tensor, **kwargs) -> Tensor:
    """F.cross_entropy on logits in at least float32: half precision is upcast, float32 and float64 stay as they are."""
    return F.cross_entropy(at_least_float32(logits), targets, **kwargs)


__all__ = ["at_least_float32", "cross_entropy_upcast"]
