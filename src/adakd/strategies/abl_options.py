"""ABL's options (ABLOptions), their checks, and the rules that size stage 1's search from the run's length."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from adakd.strategies.abl_heads import AUX_KINDS
from adakd.strategies.base import OptionError

HYPERGRADS = ("exact", "fd_blockwise")
VAL_OBJECTIVES = ("kd_total", "ce", "composite")


@dataclass(frozen=True)
class ABLOptions:
    """Every ABL knob; the defaults are the spec's one-line default configuration (§12)."""

    input_size: int = 32  # filled in by the engine from the data; the heads are built from measured block shapes
    input_channels: int = 3  # filled in by the engine (1 for grayscale sets)
    aux_type: str = "aux3"
    aux_width: int | None = None
    aux_final_dim: int | None = None
    # "weighted" scales the head update by p1 * alpha ([S]'s coupling, §12 row 3); the paper's Eq. 8 does not.
    aux_grad: str = "unweighted"
    group_by_stage: bool = False  # one block per stage, for deep thin students (§2 rule 2)
    # Stage 2: where p comes from (exactly one, for `abl`): a search run (its folder or gamma.json), gamma, or p1.
    gamma_from: str | None = None
    gamma: tuple[tuple[float, ...], ...] | None = None  # one row (student, teacher) per non-last block
    p1: tuple[float, ...] | None = None  # one student weight per non-last block
    random_resample: bool = False  # abl-random: draw p1 ~ U(0, 1) again every iteration
    eval_heads: bool = True  # test accuracy of every auxiliary head per epoch (Fig. 4c, Fig. 6)
    # Stage 1 (abl-search). The counts and meta_lr left at None are set from search_scale (see below); the paper's
    # values are PAPER_SEARCH.
    warm_steps: int | None = None
    meta_steps: int | None = None
    meta_every: int = 1
    hypergrad: str = "exact"
    val_objective: str = "kd_total"
    val_bn: str = "train"  # "train": batch statistics, buffers restored afterwards; "eval": running statistics
    val_fraction: float = 0.5
    meta_lr: float | None = None
    meta_betas: tuple[float, float] = (0.5, 0.999)
    meta_weight_decay: float = 1e-3
    meta_grad_clip: float | None = None
    fd_xi: float = 0.01  # fd_blockwise: xi = fd_xi / ||v|| (the paper's footnote)
    early_stop_delta: float = 0.01
    early_stop_window: int | None = None
    log_every: int | None = None
    # Stage 1's length relative to its run. The paper searches 40k warm-start steps + 10k gamma updates for a
    # 187,680-step final run (CIFAR-100: 240 epochs of 782 batches); `auto` keeps that proportion for any run, a
    # number S multiplies the paper's counts by S and divides meta_lr by S as given (see resolve_search).
    # int first: a whole number stays as given (gamma.json and the pipeline's line record `search_scale 1`, not 1.0).
    search_scale: int | float | str = "auto"
    # The final run's length in optimiser steps (optim.epochs x batches of the whole training set): filled in by
    # the engine, read by search_scale=auto. None (options built without a run) means the paper's length.
    run_steps: int | None = None
    # What resolve_search decided (scale, counts, floor, cap): set once, so a copy (dataclasses.replace) keeps the
    # resolved fields as they are instead of scaling them again.
    search_plan: dict[str, Any] | None = dataclasses.field(default=None, compare=False,
                                                           metadata={"resolved": True})

    def __post_init__(self) -> None:
        if self.search_plan is None:
            plan = resolve_search(self)
            for name in SEARCH_FIELDS:
                object.__setattr__(self, name, plan[name])
            object.__setattr__(self, "search_plan", plan)
        check_options(self)


# The paper's search ([A] "Warm start"; spec §12 rows 8 and 13): 40k warm-start steps, 10k gamma updates at Adam's
# 3e-4 (DARTS' value), early stop over 2k updates, a gamma row every 100; for a final run of 240 x 782 steps.
PAPER_SEARCH = {"warm_steps": 40_000, "meta_steps": 10_000, "meta_lr": 3e-4, "early_stop_window": 2_000,
                "log_every": 100}
PAPER_RUN_STEPS = 240 * 782  # 187,680
SEARCH_FIELDS = tuple(PAPER_SEARCH)
# How far Adam can move each gamma entry over the search: about meta_lr per update (its steps are normalised), so
# meta_lr x meta_steps = 3 in the paper, i.e. gamma1 - gamma2 can travel 6 and p1 = sigmoid of it can reach 0.0025
# or 0.9975. search_scale keeps this product.
PAPER_META_TRAVEL = 3.0  # 3e-4 x 10,000, written out: the float product is 2.9999999999999996
# Fewest gamma updates a search should make. Each update reads one held-out batch; below a few dozen the searched p
# reflects a handful of noisy hypergradients (and early stopping, over a fifth of the updates, compares two or three
# rows), not a trend. 50 keeps gamma's travel at the paper's 3 with meta_lr at most META_LR_CAP.
META_STEPS_FLOOR = 50
# Largest meta_lr: the paper's travel spread over the floor's updates (= 200 x the paper's 3e-4). One update then
# moves p1 by at most about 0.03 (sigmoid's slope 1/4 x 2 x 0.06), and p1 needs some 40 updates of one sign to pass
# 0.99; at the 3.75 that search_scale = 0.00008 gave, a single update took p1 to 0.999.
META_LR_CAP = PAPER_META_TRAVEL / META_STEPS_FLOOR  # 0.06


def _count(name: str, value: Any) -> int | None:
    """A step count option: None or a whole number >= 0 (ValueError otherwise)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")


def auto_search_scale(run_steps: int | None) -> float:
    """search_scale=auto: the final run's steps / the paper's 187,680, at most 1 (None: the paper's length, 1).

    A run as long as the paper's or longer (ImageNet: 500,500 steps) keeps the paper's absolute counts: the
    specification gives them for the method, and scaling them up would only lengthen the search.
    """
    if run_steps is None:
        return 1.0
    return min(1.0, run_steps / PAPER_RUN_STEPS)


def resolve_search(opts: "ABLOptions") -> dict[str, Any]:
    """Stage 1's counts and meta_lr from search_scale, plus what decided them (recorded in gamma.json).

    `auto`: S = auto_search_scale(run_steps); every value not given is the paper's x S (meta_lr: / S), except
    that meta_steps is at least META_STEPS_FLOOR, and when the floor lifts it, meta_lr, the early-stop window and
    the gamma rows follow the floor's updates instead (the paper's travel meta_lr x meta_steps, a fifth of the
    updates, a row per hundredth), so meta_lr stays at or below META_LR_CAP. Given values are kept as they are.
    A number S (the rule before `auto`): the paper's or the given counts x S, meta_lr / S, nothing floored or capped
    (search_warning names a degenerate result). S = 1 is the paper's search whatever the run's length.
    """
    scale = opts.search_scale
    numeric = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if not (scale == "auto" or (numeric and scale > 0)):
        raise ValueError(f"search_scale must be > 0 or auto, got {scale!r}")
    run_steps = opts.run_steps
    if run_steps is not None and not (isinstance(run_steps, int) and not isinstance(run_steps, bool)
                                      and run_steps >= 1):
        raise ValueError(f"run_steps must be a whole number >= 1, got {run_steps!r}")
    given = {name: _count(name, getattr(opts, name)) for name in SEARCH_FIELDS if name != "meta_lr"}
    given["meta_lr"] = opts.meta_lr
    if given["meta_lr"] is not None and not (isinstance(given["meta_lr"], (int, float))
                                             and not isinstance(given["meta_lr"], bool)):
        raise ValueError(f"meta_lr must be a number > 0, got {given['meta_lr']!r}")
    plan: dict[str, Any] = {"search_scale": scale, "run_steps": run_steps, "paper_run_steps": PAPER_RUN_STEPS,
                            "meta_steps_floor": META_STEPS_FLOOR, "meta_lr_cap": META_LR_CAP,
                            "given": {k: v for k, v in given.items() if v is not None}}
    if numeric:
        values = {name: PAPER_SEARCH[name] if given[name] is None else given[name] for name in SEARCH_FIELDS}
        if scale != 1.0:
            for name in ("warm_steps", "meta_steps", "early_stop_window", "log_every"):
                values[name] = max(1, round(values[name] * scale))
            values["meta_lr"] = values["meta_lr"] / scale
        return {**plan, "scale": float(scale), **values}
    s = auto_search_scale(run_steps)
    warm = given["warm_steps"] if given["warm_steps"] is not None else max(1, round(PAPER_SEARCH["warm_steps"] * s))
    meta = given["meta_steps"]
    # The paper's updates this search stands for: S x 10k, or the floor's 50 when it lifts them. meta_lr, the
    # early-stop window and the gamma rows follow it; a given meta_steps is taken as it is and they follow S.
    updates = PAPER_SEARCH["meta_steps"] * s
    if meta is None:
        meta = max(META_STEPS_FLOOR, round(updates))
        updates = meta
    share = updates / PAPER_SEARCH["meta_steps"]  # 1.0 exactly for the paper's 10k: its values come out unchanged
    meta_lr = given["meta_lr"]
    if meta_lr is None:
        meta_lr = PAPER_SEARCH["meta_lr"] if share == 1.0 else min(META_LR_CAP, PAPER_META_TRAVEL / updates)
    window = given["early_stop_window"]
    if window is None:
        window = round(PAPER_SEARCH["early_stop_window"] * share)
    log_every = given["log_every"] if given["log_every"] is not None else max(1, round(PAPER_SEARCH["log_every"]
                                                                                       * share))
    return {**plan, "scale": s, "warm_steps": warm, "meta_steps": meta, "meta_lr": meta_lr,
            "early_stop_window": window, "log_every": log_every}



def check_options(opts: ABLOptions) -> None:
    """Reject out-of-range options with the allowed values (ABLOptions runs it on every instance it makes)."""
    choices = {"aux_type": AUX_KINDS, "aux_grad": ("unweighted", "weighted"), "hypergrad": HYPERGRADS,
               "val_objective": VAL_OBJECTIVES, "val_bn": ("train", "eval")}
    for name, allowed in choices.items():
        if getattr(opts, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(opts, name)!r}")
    if not 0.0 < opts.val_fraction < 1.0:
        raise OptionError("val_fraction", f"the held-out fraction must lie in (0, 1), got {opts.val_fraction}")
    for name in ("warm_steps", "meta_steps", "early_stop_window"):
        if getattr(opts, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(opts, name)}")
    for name in ("meta_every", "log_every"):
        if getattr(opts, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(opts, name)}")
    for name in ("meta_lr", "fd_xi"):
        if not getattr(opts, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(opts, name)}")
    for name in ("meta_weight_decay", "early_stop_delta"):
        if not getattr(opts, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(opts, name)}")
    if opts.meta_grad_clip is not None and not opts.meta_grad_clip > 0:
        raise ValueError(f"meta_grad_clip must be > 0 (or null for no clipping), got {opts.meta_grad_clip}")
    betas = tuple(opts.meta_betas) if isinstance(opts.meta_betas, (list, tuple)) else ()
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"meta_betas must be two numbers in [0, 1) (Adam's betas), got {opts.meta_betas!r}")
    for name in ("aux_width", "aux_final_dim"):
        if getattr(opts, name) is not None and not getattr(opts, name) >= 1:
            raise ValueError(f"{name} must be >= 1 (or null for the default), got {getattr(opts, name)}")


__all__ = ["ABLOptions", "META_LR_CAP", "META_STEPS_FLOOR", "PAPER_RUN_STEPS", "PAPER_SEARCH", "auto_search_scale",
           "check_options", "resolve_search"]
