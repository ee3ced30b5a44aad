"""ABL: adaptive block-wise learning for knowledge distillation (ICLR 2023 submission, OpenReview 8XfHh4XSQ0Q).

Each non-last student block l descends p1(l) * alpha * (its local error, from an auxiliary head on its output with
the block input held constant) + p2(l) * beta * (the global teacher error, ordinary backprop of the KD loss), with
p(l) = softmax(gamma(l)); the error passed down to lower blocks is the pure teacher error. Stage 1 (`abl-search`)
learns gamma by bilevel optimisation on a held-out split; stage 2 (`abl`) retrains from scratch with p fixed.
Implements the adakd specification specs/abl.md (sections cited as §n).

Gradient routing is the spec's scheme A (§3.2): one forward in which every block's input is a detached leaf, so
BatchNorm sees each batch once; the KD loss on detached copies of the spot tensors; the KD error carried down block
by block with input-only vector-Jacobian products; and the student parts of all blocks from one backward call, which
the leaves stop at every block boundary (and which skips each block's first input gradient).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.distillers.kd import kd_loss
from adakd.models.staged import StagedModel, StagedOutput, forward_with_preact
from adakd.strategies.abl_heads import AUX_KINDS, build_aux_heads
from adakd.strategies.base import LossWeights, Strategy
from adakd.strategies.registry import register_strategy

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
    gamma: tuple | None = None
    p1: tuple | None = None
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
    meta_betas: tuple = (0.5, 0.999)
    meta_weight_decay: float = 1e-3
    meta_grad_clip: float | None = None
    fd_xi: float = 0.01  # fd_blockwise: xi = fd_xi / ||v|| (the paper's footnote)
    early_stop_delta: float = 0.01
    early_stop_window: int | None = None
    log_every: int | None = None
    # Stage 1's length relative to its run. The paper searches 40k warm-start steps + 10k gamma updates for a
    # 187,680-step final run (CIFAR-100: 240 epochs of 782 batches); `auto` keeps that proportion for any run, a
    # number S multiplies the paper's counts by S and divides meta_lr by S as given (see resolve_search).
    search_scale: float | str = "auto"
    # The final run's length in optimiser steps (optim.epochs x batches of the whole training set): filled in by
    # the engine, read by search_scale=auto. None (options built without a run) means the paper's length.
    run_steps: int | None = None
    # What resolve_search decided (scale, counts, floor, cap): set once, so a copy (dataclasses.replace) keeps the
    # resolved fields as they are instead of scaling them again.
    search_plan: dict | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.search_plan is not None:
            return
        plan = resolve_search(self)
        for name in SEARCH_FIELDS:
            object.__setattr__(self, name, plan[name])
        object.__setattr__(self, "search_plan", plan)


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


def search_warning(opts: "ABLOptions") -> str | None:
    """One line when the search makes fewer gamma updates than the floor or steps gamma faster than the cap."""
    if opts.meta_steps >= META_STEPS_FLOOR and opts.meta_lr <= META_LR_CAP * (1 + 1e-9):  # 3e-4 / 0.005 rounds up
        return None
    plan = opts.search_plan or {}
    scale = plan.get("search_scale", "auto")
    forced = [f"search_scale={scale:g}"] if scale not in ("auto", 1) else []
    forced += [f"{name}={plan['given'][name]:g}" for name in ("meta_steps", "meta_lr")
               if plan.get("given", {}).get(name) is not None]
    return (f"ABL search: with {', '.join(forced) or 'these options'} it makes {opts.meta_steps} gamma update(s) "
            f"(floor {META_STEPS_FLOOR}) at meta_lr {opts.meta_lr:.3g} (cap {META_LR_CAP:.3g}): too few updates, or each "
            "too large (p1 can saturate in one), for the searched p to mean much. Leave strategy.args.search_scale "
            f"at auto (the default, which keeps >= {META_STEPS_FLOOR} updates and meta_lr <= {META_LR_CAP:.3g}) "
            f"and unset meta_steps and meta_lr, or give meta_steps >= {META_STEPS_FLOOR} and meta_lr <= "
            f"{META_LR_CAP:.3g}")


def search_record(opts: "ABLOptions") -> dict[str, Any]:
    """What stage 1 ran with, for gamma.json: search_scale as given, the scale S it resolved to, and the counts."""
    plan = opts.search_plan or {}
    return {"search_scale": plan.get("search_scale", opts.search_scale), "scale": plan.get("scale"),
            "run_steps": plan.get("run_steps"), "paper_run_steps": PAPER_RUN_STEPS,
            "warm_steps": opts.warm_steps, "meta_steps": opts.meta_steps, "meta_every": opts.meta_every,
            "meta_lr": opts.meta_lr, "early_stop_window": opts.early_stop_window, "log_every": opts.log_every,
            "meta_steps_floor": META_STEPS_FLOOR, "meta_lr_cap": META_LR_CAP}


def describe_search(opts: "ABLOptions") -> str:
    """One line saying how stage 1 was sized: the scale, where it came from, the counts and meta_lr."""
    plan = opts.search_plan or {}
    scale, run_steps = plan.get("search_scale", opts.search_scale), plan.get("run_steps")
    if scale != "auto":
        source = f"search_scale={scale:g} (given)"
    elif run_steps is None:
        source = "search_scale=auto, S = 1 (the run's length unknown: the paper's search)"
    else:
        source = (f"search_scale=auto, S = {plan['scale']:.3g} (a final run of {run_steps:,} steps, the paper's "
                  f"{PAPER_RUN_STEPS:,}{'; longer runs keep its counts' if run_steps > PAPER_RUN_STEPS else ''})")
    floor = " (the floor)" if scale == "auto" and opts.meta_steps == META_STEPS_FLOOR else ""
    cap = " (the cap)" if scale == "auto" and opts.meta_lr == META_LR_CAP else ""
    return (f"ABL search: {source}: {opts.warm_steps:,} warm-start steps, then up to {opts.meta_steps:,} gamma "
            f"updates{floor} at meta_lr {opts.meta_lr:.3g}{cap}, stopping early once p1 moves less than "
            f"{opts.early_stop_delta:g} over {opts.early_stop_window:,} update(s); {steps_budget(opts):,} steps at most")


def check_options(opts: ABLOptions) -> None:
    """Reject out-of-range options with the allowed values."""
    choices = {"aux_type": AUX_KINDS, "aux_grad": ("unweighted", "weighted"), "hypergrad": HYPERGRADS,
               "val_objective": VAL_OBJECTIVES, "val_bn": ("train", "eval")}
    for name, allowed in choices.items():
        if getattr(opts, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(opts, name)!r}")
    if not 0.0 < opts.val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {opts.val_fraction}")
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


# --------------------------------------------------------------------------------------------------- routing


def block_plan(staged: StagedModel, group_by_stage: bool = False) -> list[list[tuple[int, nn.Module, bool]]]:
    """ABL blocks as lists of (stage index, module, ends its stage), in the partition of `StagedModel.blocks()`."""
    stages = staged.stages
    groups: list[list[tuple[int, nn.Module, bool]]] = []
    pending: list[tuple[int, nn.Module, bool]] = []
    for index, stage in enumerate(stages[:-2]):
        units = [(index, module, k == len(stage.blocks) - 1) for k, module in enumerate(stage.blocks)]
        if stage.merge_into_next_block:
            pending.extend(units)
        elif group_by_stage:
            groups.append(pending + units)
            pending = []
        else:
            for unit in units:
                groups.append(pending + [unit])
                pending = []
    tail = [(i, m, k == len(stages[i].blocks) - 1) for i in (len(stages) - 2, len(stages) - 1)
            for k, m in enumerate(stages[i].blocks)]
    groups[-1].extend(pending + tail)
    return groups


@dataclass
class BlockForward:
    """One forward of the student block by block: stage features, block inputs and outputs."""

    output: StagedOutput
    block_inputs: list[Tensor]
    block_outputs: list[Tensor]


def forward_blocks(staged: StagedModel, plan, x: Tensor, preact: bool, detach: bool = False, start: int = 0,
                   cached: StagedOutput | None = None) -> BlockForward:
    """Run blocks `start..L` on `x` (block `start`'s input); stages ending below `start` come from `cached`.

    With `detach`, every block after the first starts from a detached leaf copy of the previous output (§3.2), so
    an autograd call over one block's tensors never reaches below it.
    """
    stages = staged.stages
    features: list[Tensor | None] = list(cached.features) if cached is not None else [None] * len(stages)
    preacts: list[Tensor | None] = list(cached.preacts) if cached is not None else [None] * len(stages)
    inputs, outputs = [], []
    for l in range(start, len(plan)):
        if detach and l > 0:
            x = x.detach().requires_grad_(torch.is_grad_enabled())
        inputs.append(x)
        for stage_index, module, ends_stage in plan[l]:
            if ends_stage and preact and stages[stage_index].has_preact:
                x, pre = forward_with_preact(module, x)
            else:
                x = module(x)
                pre = x
            if ends_stage:
                features[stage_index], preacts[stage_index] = x, pre
        outputs.append(x)
    return BlockForward(StagedOutput(features, preacts), inputs, outputs)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float | Tensor) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def sgd_next(param: Tensor, grad: Tensor, group: dict, state: dict) -> tuple[Tensor, float]:
    """(w', dw'/dg) of one `torch.optim.SGD` step from `grad`, without touching the optimiser (§6.3 step 2)."""
    lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
    step = grad + group["weight_decay"] * param if group["weight_decay"] else grad
    jacobian = 1.0
    if momentum:
        buffer = state.get("momentum_buffer")
        if buffer is None:
            buffer = step
        else:
            buffer = momentum * buffer + (1 - dampening) * step
            jacobian = 1 - dampening
        if group["nesterov"]:
            step = step + momentum * buffer
            jacobian = 1 + momentum * jacobian
        else:
            step = buffer
    if group.get("maximize"):
        raise ValueError("ABL's virtual step does not support SGD(maximize=True)")
    return param - lr * step, lr * jacobian


@contextlib.contextmanager
def preserved(modules: list[nn.Module], params: list[Tensor] | None = None) -> Iterator[None]:
    """Restore the BatchNorm statistics inside `modules` and `params` bit for bit on exit.

    Only BatchNorm buffers: CRD's memory banks keep the rows a validation forward writes (the validation samples'
    own rows, which the training split reads only as negatives), so validation positives are real embeddings.
    """
    buffers = [b for m in modules for sub in m.modules() if isinstance(sub, nn.modules.batchnorm._BatchNorm)
               for b in sub.buffers()]
    saved_buffers = [b.clone() for b in buffers]
    params = params or []
    saved_params = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved_buffers):
                b.copy_(s)
            for p, s in zip(params, saved_params):
                p.copy_(s)


def _average_across_ranks(tensors: list[Tensor]) -> None:
    """All-reduce mean in place (one flat buffer); a no-op without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy in at least float32 (autocast's half-precision logits are upcast; float64 stays float64)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets)


def _broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's BatchNorm statistics to every rank before a forward, as DDP's broadcast_buffers does."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, 0)


@dataclass
class Components:
    """The per-block gradient parts of §1 at the current weights, and the loss values (detached)."""

    a: list[list[Tensor | None]]  # alpha * local student error, per block, per parameter
    b: list[list[Tensor | None]]  # beta * teacher error (ordinary backprop of beta * K)
    c: list[list[Tensor | None]]  # auxiliary heads (unweighted local CE), per non-last block
    e: list[Tensor | None]  # distiller heads
    terms: dict[str, Tensor]
    logits: Tensor
    forward: BlockForward
    teacher_out: StagedOutput
    batch: tuple[Tensor, Tensor, int]  # targets, indices and epoch of the training batch (for §6.6)


# --------------------------------------------------------------------------------------------------- strategies


class ABLBase(Strategy):
    """The ABL step (§3) with p from `initial_p`; subclasses choose p and may add the bilevel search."""

    option_class: ClassVar[type] = ABLOptions
    preset: ClassVar[dict[str, Any]] = {}
    uses_heads: ClassVar[bool] = True

    def __init__(self, student: nn.Module, teacher: StagedModel | None, distiller, weights: LossWeights,
                 student_spots: list[int] | None = None, teacher_spots: list[int] | None = None,
                 **options: Any) -> None:
        known = {f.name for f in dataclasses.fields(ABLOptions)} - {"search_plan"}  # resolved, never given
        chosen = {**self.preset, **{k: options.pop(k) for k in list(options) if k in known}}
        super().__init__(student, teacher, distiller, weights, student_spots, teacher_spots, **options)
        for key in ("gamma", "p1", "meta_betas"):
            if isinstance(chosen.get(key), list):
                chosen[key] = tuple(tuple(v) if isinstance(v, list) else v for v in chosen[key])
        self.options = ABLOptions(**chosen)
        check_options(self.options)
        if teacher is None or distiller is None:
            raise ValueError(f"{type(self).__name__} needs a teacher and a distiller (task=distill)")
        # Gradients are assembled by hand, so the steps run on the bare model; DDP is replaced by explicit averaging.
        self.student_module: StagedModel = getattr(student, "module", student)
        self.student_preact = bool(getattr(distiller, "student_preact", False))
        self.teacher_preact = bool(getattr(distiller, "teacher_preact", False))
        self.plan = block_plan(self.student_module, self.options.group_by_stage)
        self.num_blocks = len(self.plan)
        if self.num_blocks < 2:
            raise ValueError(f"ABL needs at least 2 blocks; {type(self.student_module.model).__name__} has "
                             f"{self.num_blocks}")
        self.block_names = [f"block{l + 1}" for l in range(self.num_blocks)]
        self.block_params = [self._params_of(units) for units in self.plan]
        owned = {id(p) for params in self.block_params for p in params}
        missing = [n for n, p in self.student_module.named_parameters() if p.requires_grad and id(p) not in owned]
        if missing:
            raise ValueError(f"student parameters outside every ABL block: {missing[:5]}")
        reference = next(self.student_module.parameters())
        # p, gamma and every weight built from them: float32, or the student's dtype when wider. A float32 p in a
        # float64 run rounds p1 * alpha (4e-8 relative in the local gradients), so float64 could not be verified;
        # float16/bfloat16 students keep float32 as before.
        self.meta_dtype = torch.promote_types(reference.dtype, torch.float32)
        self.heads = nn.ModuleList()
        if self.uses_heads:
            shapes = self._block_shapes()
            num_classes = shapes[-1][0]
            self.heads = build_aux_heads(self.options.aux_type, shapes[:-1], num_classes, self.options.aux_width,
                                         self.options.aux_final_dim)
            self.heads.to(reference.device, reference.dtype)
        self.head_params = [list(h.parameters()) for h in self.heads]
        self.distiller_params = [p for p in distiller.trainable_parameters() if p.requires_grad]
        self.p = self.initial_p().to(reference.device, self.meta_dtype)
        self.val_batches: Iterator | None = None

    @staticmethod
    def _params_of(units) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for _, module, _ in units:
            for p in module.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    @torch.no_grad()
    def _block_shapes(self) -> list[tuple[int, ...]]:
        modes = [(m, m.training) for m in self.student_module.modules()]
        self.student_module.eval()
        try:
            ref = next(self.student_module.parameters())
            size = self.options.input_size
            dummy = torch.zeros(1, self.options.input_channels, size, size, dtype=ref.dtype, device=ref.device)
            out = forward_blocks(self.student_module, self.plan, dummy, False)
            return [tuple(h.shape[1:]) for h in out.block_outputs]
        finally:
            for m, training in modes:
                m.training = training

    # ---- p
    def initial_p(self) -> Tensor:
        """p [L - 1, 2] (column 0 = student weight p1) used by the step."""
        raise NotImplementedError

    def p_from_p1(self, p1: list[float] | Tensor) -> Tensor:
        """Stack (p1, 1 - p1) after checking there is one value per non-last block in [0, 1]."""
        # Python numbers are read in meta_dtype directly (0.3 would otherwise be rounded to float32 first).
        p1 = torch.as_tensor(p1, dtype=self.meta_dtype).flatten()
        if p1.numel() != self.num_blocks - 1:
            raise ValueError(f"ABL needs {self.num_blocks - 1} student weights (one per non-last block of "
                             f"{type(self.student_module.model).__name__}), got {p1.numel()}")
        if bool(((p1 < 0) | (p1 > 1)).any()):
            raise ValueError(f"student weights p1 must lie in [0, 1], got {p1.tolist()}")
        return torch.stack([p1, 1 - p1], dim=1)

    def current_p(self) -> Tensor:
        """p of this step."""
        return self.p

    # ---- engine hooks
    def param_groups(self) -> dict[str, Any]:
        """Student, auxiliary heads and distiller heads all learn with the student's SGD ("main")."""
        groups = super().param_groups()
        groups["main"] = groups["main"] + [p for params in self.head_params for p in params]
        return groups

    def owned_modules(self) -> list[nn.Module]:
        """The auxiliary heads."""
        return [self.heads]

    def train(self, mode: bool = True) -> None:
        """Student, distiller and heads follow `mode`; the teacher stays in eval."""
        super().train(mode)
        self.heads.train(mode)

    def state_dict(self) -> dict[str, Any]:
        """Distiller parts, auxiliary heads and p."""
        state = super().state_dict()
        state["heads"] = self.heads.state_dict()
        state["p"] = self.p.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` strictly."""
        super().load_state_dict(state)
        self.heads.load_state_dict(state["heads"], strict=True)
        if tuple(state["p"].shape) != tuple(self.p.shape):
            raise ValueError(f"checkpoint p has shape {tuple(state['p'].shape)}, this student needs "
                             f"{tuple(self.p.shape)}")
        self.p = state["p"].to(self.p.device, self.p.dtype)

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        """Test accuracy (%) of every auxiliary head: `block_acc/blockK` (Fig. 4c, Fig. 6)."""
        if not (self.options.eval_heads and len(self.heads)):
            return {}
        modes = [(m, m.training) for m in list(self.student_module.modules()) + list(self.heads.modules())]
        self.student_module.eval()
        self.heads.eval()
        hits, count = None, None
        try:
            for images, targets, _ in loader:
                with self.precision.autocast():
                    out = forward_blocks(self.student_module, self.plan, images, False)
                    correct = torch.stack([(head(h).argmax(dim=1) == targets).sum()
                                           for head, h in zip(self.heads, out.block_outputs[:-1])]).double()
                hits = correct if hits is None else hits + correct
                n = torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=correct.device)
                count = n if count is None else count + n
        finally:
            for m, training in modes:
                m.training = training
        if hits is None:
            return {}
        totals = torch.cat([hits, count.view(1)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        values = (100 * totals[:-1] / totals[-1]).tolist()
        return {f"block_acc/{name}": v for name, v in zip(self.block_names, values)}

    # ---- the step
    def kd_terms(self, output: StagedOutput, teacher_out: StagedOutput, targets: Tensor, indices: Tensor,
                 epoch: int) -> dict[str, Tensor]:
        """beta * K: the distiller's weighted terms plus the optional weighted KL."""
        return self.kd_terms_on(self.select(output, self.student_spots, self.student_preact), output.features[-1],
                                teacher_out, targets, indices, epoch)

    def kd_terms_on(self, student_feats: list[Tensor], student_logits: Tensor, teacher_out: StagedOutput,
                    targets: Tensor, indices: Tensor, epoch: int) -> dict[str, Tensor]:
        """beta * K from given student spot tensors and logits (the fused step passes detached leaves)."""
        # The bare distiller: its gradients come from autograd.grad, which DDP's reducer never sees (averaged by hand).
        named = self.distiller(student_feats, self.select(teacher_out, self.teacher_spots, self.teacher_preact),
                               targets, indices=indices, epoch=epoch)
        terms = {name: self.weights.method * value for name, value in named.items()}
        if self.weights.kl > 0:
            terms["kl"] = self.weights.kl * kd_loss(student_logits, teacher_out.features[-1],
                                                    self.weights.temperature).mean()
        return terms

    def forward_parts(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      head_scale: Tensor | None = None) -> dict[str, Any]:
        """The §3.2 forward: detached-input blocks, teacher, beta * K on spot leaves, heads' local CEs, final CE.

        `head_scale` multiplies the local error entering h_l (not the head's own gradient), for the fused step.
        """
        with self.precision.autocast():
            forward = forward_blocks(self.student_module, self.plan, images, self.student_preact, detach=True)
            logits = forward.output.features[-1]
            teacher_out = self.teacher(images, preact=self.teacher_preact)
            spots = self.select(forward.output, self.student_spots, self.student_preact) + [logits]
            leaves = [t.detach().requires_grad_() for t in spots]
            kd = self.kd_terms_on(leaves[:-1], leaves[-1], teacher_out, targets, indices, epoch)
            local = []
            for l, (head, h) in enumerate(zip(self.heads, forward.block_outputs[:-1])):
                source = _ScaleGrad.apply(h, head_scale[l]) if head_scale is not None else h
                local.append(_ce(head(source), targets))
            ce = _ce(logits, targets)
        return {"forward": forward, "teacher_out": teacher_out, "spots": spots, "leaves": leaves, "kd": kd,
                "local": local, "ce": ce, "logits": logits, "owner": self._spot_blocks(forward, spots)}

    def spot_gradients(self, fw: dict[str, Any], scale: float) -> tuple[list, list]:
        """(direct d(beta K)/d(spot) per spot tensor, e for the distiller heads): one call on the leaves."""
        kd_total = torch.stack(list(fw["kd"].values())).sum() if fw["kd"] else None
        if kd_total is None or not kd_total.requires_grad:
            return [None] * len(fw["spots"]), [None] * len(self.distiller_params)
        grads = torch.autograd.grad(kd_total * scale, fw["leaves"] + self.distiller_params, allow_unused=True)
        return list(grads[:len(fw["leaves"])]), list(grads[len(fw["leaves"]):])

    def kd_sweep(self, fw: dict[str, Any], direct: list, with_weights: bool,
                 retain: bool) -> tuple[list, list[Tensor | None]]:
        """Top-down §3.2 sweep: (b_l per block if `with_weights`, total KD gradient at every block output h_l)."""
        forward = fw["forward"]
        by_block: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for t, g, l in zip(fw["spots"], direct, fw["owner"]):
            if g is not None:
                by_block.setdefault(l, []).append((t, g))
        b: list = [[None] * len(params) for params in self.block_params]
        at_h: list[Tensor | None] = [None] * self.num_blocks
        from_above: Tensor | None = None
        for l in reversed(range(self.num_blocks)):
            h = forward.block_outputs[l]
            total = from_above
            outputs, cotangents = [], []
            for t, g in by_block.get(l, []):
                if t is h:  # a spot at the block output joins the gradient arriving from above
                    total = g if total is None else total + g
                else:
                    outputs.append(t)
                    cotangents.append(g)
            at_h[l] = total
            if total is not None:
                outputs.append(h)
                cotangents.append(total)
            from_above = None
            inputs = (list(self.block_params[l]) if with_weights else []) + ([forward.block_inputs[l]] if l else [])
            if not outputs or not inputs:
                continue
            grads = torch.autograd.grad(outputs, inputs, cotangents, retain_graph=retain, allow_unused=True)
            if with_weights:
                b[l] = list(grads[:len(self.block_params[l])])
            if l:
                from_above = grads[-1]
        return b, at_h

    def components(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int) -> Components:
        """a, b, c, e of §1 at the current weights: one forward, one student call, the KD sweep."""
        alpha = self.weights.ce
        scaler = self.precision.scaler
        scale = float(scaler.get_scale()) if scaler.is_enabled() else 1.0
        _broadcast_buffers(self.student_module)
        fw = self.forward_parts(images, targets, indices, epoch)
        theta = [p for params in self.block_params for p in params]
        phi = [p for params in self.head_params for p in params]
        direct, e = self.spot_gradients(fw, scale)
        # The leaves stop every local loss at its block's input, so one call gives every block's student part.
        student_loss = torch.stack(fw["local"]).sum() + fw["ce"] if fw["local"] else fw["ce"]
        grads = torch.autograd.grad(student_loss * scale, theta + phi, retain_graph=True, allow_unused=True)
        a_flat = [None if g is None else alpha * g for g in grads[:len(theta)]]
        c_flat = list(grads[len(theta):])
        b, _ = self.kd_sweep(fw, direct, with_weights=True, retain=False)
        b_flat = [g for block in b for g in block]
        if scale != 1.0:  # the parts are kept unscaled: the hypergradient and the virtual step need true values
            b_flat, e, a_flat, c_flat = ([None if g is None else g / scale for g in group]
                                         for group in (b_flat, e, a_flat, c_flat))
        # Everything below is the global (rank-averaged) value, so p, the hypergradient and the step agree on all ranks.
        _average_across_ranks([g for g in a_flat + b_flat + c_flat + e if g is not None])
        return Components(a=self._split(a_flat, self.block_params), b=self._split(b_flat, self.block_params),
                          c=self._split(c_flat, self.head_params), e=e, terms=self._terms(fw),
                          logits=fw["logits"].detach(), forward=fw["forward"], teacher_out=fw["teacher_out"],
                          batch=(targets, indices, epoch))

    def _terms(self, fw: dict[str, Any]) -> dict[str, Tensor]:
        terms = {"ce": self.weights.ce * fw["ce"].detach(), **{k: v.detach() for k, v in fw["kd"].items()}}
        terms.update({f"abl/local_ce/{name}": value.detach() for name, value in zip(self.block_names, fw["local"])})
        return terms

    def fused_gradients(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                        p: Tensor) -> tuple[list[tuple[Tensor, Tensor | None]], dict[str, Tensor], Tensor]:
        """The §1 update for a fixed p without forming a_l and b_l apart (same numbers as `combined`).

        The KD sweep requests no weight gradients, only the KD error at every block output; then one backward of
        p1 * alpha * (local CEs) + alpha * CE with the cotangents p2(l) * (KD error at h_l and at the spots inside
        block l) injected gives p1 a_l + p2 b_l for every block at once. This skips the weight-gradient kernels of
        a separate KD backward.
        """
        alpha = self.weights.ce
        last = self.num_blocks - 1
        scaler = self.precision.scaler
        scale = float(scaler.get_scale()) if scaler.is_enabled() else 1.0
        # The head learns from its unweighted CE; h_l receives it scaled by p1(l) * alpha (Eq. 8 against Eq. 7).
        # A tensor, not a list of floats: reading p on the host would wait for the device every step.
        head_scale = (p[:, 0] * alpha).detach() if self.options.aux_grad == "unweighted" else None
        _broadcast_buffers(self.student_module)
        fw = self.forward_parts(images, targets, indices, epoch, head_scale)
        forward = fw["forward"]
        theta = [q for params in self.block_params for q in params]
        phi = [q for params in self.head_params for q in params]
        direct, e = self.spot_gradients(fw, scale)
        _, at_h = self.kd_sweep(fw, direct, with_weights=False, retain=True)
        student_loss = alpha * fw["ce"]
        for l, value in enumerate(fw["local"]):
            student_loss = student_loss + (value if head_scale is not None else p[l, 0] * alpha * value)
        outputs, cotangents = [student_loss * scale], [torch.ones_like(student_loss)]
        weight = [p[l, 1] for l in range(last)] + [1.0]
        for l, g in enumerate(at_h):
            if g is not None:
                outputs.append(forward.block_outputs[l])
                cotangents.append(weight[l] * g)
        boundary = {id(h) for h in forward.block_outputs}
        for t, g, l in zip(fw["spots"], direct, fw["owner"]):
            if g is not None and id(t) not in boundary:  # a spot at a block output is already inside at_h
                outputs.append(t)
                cotangents.append(weight[l] * g)
        grads = torch.autograd.grad(outputs, theta + phi, cotangents, allow_unused=True)
        pairs = list(zip(theta + phi, grads)) + list(zip(self.distiller_params, e))
        if scale != 1.0:
            pairs = [(q, None if g is None else g / scale) for q, g in pairs]
        _average_across_ranks([g for _, g in pairs if g is not None])
        return pairs, self._terms(fw), fw["logits"].detach()

    def _spot_blocks(self, forward: BlockForward, spots: list[Tensor]) -> list[int]:
        """The block whose forward produced each spot tensor."""
        made_by: dict[int, int] = {}
        stage_block = {stage: l for l, units in enumerate(self.plan) for stage, _, ends in units if ends}
        for stage_index in range(len(self.student_module.stages)):
            for tensor in (forward.output.features[stage_index], forward.output.preacts[stage_index]):
                if tensor is not None:
                    made_by.setdefault(id(tensor), stage_block[stage_index])
        return [made_by[id(t)] for t in spots]

    @staticmethod
    def _split(flat: list, groups: list[list]) -> list[list]:
        """Cut a flat per-parameter list into the shape of `groups`."""
        out, offset = [], 0
        for params in groups:
            out.append(flat[offset:offset + len(params)])
            offset += len(params)
        return out

    def combined(self, parts: Components, p: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """(parameter, gradient) pairs of §1: p1 a + p2 b in non-last blocks, a + b in the last, c and e as they are."""
        pairs = []
        last = self.num_blocks - 1
        for l, params in enumerate(self.block_params):
            w1, w2 = (p[l, 0], p[l, 1]) if l < last else (1.0, 1.0)
            for param, a, b in zip(params, parts.a[l], parts.b[l]):
                if a is None and b is None:
                    grad = None
                elif b is None:
                    grad = w1 * a
                elif a is None:
                    grad = w2 * b
                else:
                    grad = w1 * a + w2 * b
                pairs.append((param, grad))
        for l, params in enumerate(self.head_params):
            scale = p[l, 0] * self.weights.ce if self.options.aux_grad == "weighted" else 1.0
            pairs.extend((param, None if c is None else scale * c) for param, c in zip(params, parts.c[l]))
        pairs.extend(zip(self.distiller_params, parts.e))
        return pairs

    def apply(self, pairs: list[tuple[Tensor, Tensor | None]]) -> None:
        """Assign the gradients and step the student's SGD (through the loss scaler under float16 AMP)."""
        optimizer = self.optimizers["main"]
        optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler
        scale = float(scaler.get_scale()) if scaler.is_enabled() else 1.0
        for param, grad in pairs:
            if grad is not None:
                # The scaler's step unscales and skips the step on inf/NaN, as after an ordinary scaled backward.
                param.grad = (grad * scale if scale != 1.0 else grad).to(param.dtype)
        self.precision.step(optimizer)

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """The fused §1 update with this step's p, one SGD step."""
        p = self.current_p()
        pairs, terms, logits = self.fused_gradients(images, targets, indices, epoch, p)
        self.apply(pairs)
        return self.step_output(terms, logits, p, targets)

    def step_output(self, terms: dict[str, Tensor], logits: Tensor, p: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Loss terms, p1 per block, loss = alpha CE + beta K (Eq. 1), and the correct count."""
        out = dict(terms)
        kd = [v for k, v in terms.items() if k != "ce" and not k.startswith("abl/")]
        out["loss"] = terms["ce"] + (torch.stack(kd).sum() if kd else 0.0)
        p1 = p[:, 0].detach().float()
        out.update({f"abl/p1/{name}": p1[l] for l, name in enumerate(self.block_names[:-1])})
        out["correct"] = (logits.argmax(dim=1) == targets).sum()
        return out


@register_strategy("abl")
class ABL(ABLBase):
    """Stage 2 (§7): p fixed at softmax(gamma*) from a search run (`gamma_from`), or given as `gamma` or `p1`."""

    # The stage that finds gamma* when none is given: pipelines (`adakd abl`, sweeps) run it first.
    search_strategy: ClassVar[str] = "abl-search"
    search_options: ClassVar[tuple[str, ...]] = ("gamma_from", "gamma", "p1")

    def initial_p(self) -> Tensor:
        opts = self.options
        given = [name for name in ("gamma_from", "gamma", "p1") if getattr(opts, name) is not None]
        if len(given) != 1:
            raise ValueError("abl needs exactly one of gamma_from (a finished abl-search run folder or its "
                             "gamma.json), gamma or p1; run stage 1 first with `adakd abl` (both stages) or "
                             f"strategy=abl-search, got {given or 'none'}")
        if opts.p1 is not None:
            return self.p_from_p1(list(opts.p1))
        gamma = torch.tensor(opts.gamma if opts.gamma is not None else read_gamma(opts.gamma_from),
                             dtype=self.meta_dtype)
        if tuple(gamma.shape) != (self.num_blocks - 1, 2):
            raise ValueError(f"gamma must have shape ({self.num_blocks - 1}, 2) for this student "
                             f"({self.num_blocks} blocks), got {tuple(gamma.shape)}")
        return gamma.softmax(dim=1)


def read_gamma(path: str | Path) -> list[list[float]]:
    """gamma [L - 1, 2] from a search run folder or its gamma.json."""
    path = Path(path)
    file = path / "gamma.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"gamma_from: {str(file)!r} does not exist; give the folder of an abl-search run (it "
                         "writes gamma.json after every epoch)")
    try:
        return json.loads(file.read_text())["gamma"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"gamma_from: {str(file)!r} is not a gamma.json written by abl-search ({err})") from None


@register_strategy("abl-fixed")
class ABLFixed(ABLBase):
    """Fixed ablation (Table 6) = Local of Table 5: p = (0.5, 0.5) in every non-last block (gamma = 0)."""

    def initial_p(self) -> Tensor:
        return torch.full((self.num_blocks - 1, 2), 0.5, dtype=self.meta_dtype)


@register_strategy("abl-no")
class ABLNo(ABLBase):
    """No ablation (Table 6): p = (1, 0), so the teacher error reaches only the last block."""

    def initial_p(self) -> Tensor:
        return self.p_from_p1([1.0] * (self.num_blocks - 1))


@register_strategy("abl-random")
class ABLRandom(ABLBase):
    """Random ablation (Table 6): p1 ~ U(0, 1) per block, drawn once from the run's seed (or every step)."""

    def initial_p(self) -> Tensor:
        # Drawn in float32 whatever the student's dtype: the same p1 (and RNG stream) in every precision.
        return self.p_from_p1(torch.rand(self.num_blocks - 1))

    def current_p(self) -> Tensor:
        if self.options.random_resample:
            self.p = self.p_from_p1(torch.rand(self.num_blocks - 1)).to(self.p.device)
        return self.p


@register_strategy("abl-global")
class ABLGlobal(ABLBase):
    """Global ablation (Table 5): standard KD backprop, student CE from the final layer, non-last blocks x 0.5."""

    uses_heads = False

    def initial_p(self) -> Tensor:
        return torch.full((self.num_blocks - 1, 2), 0.5, dtype=self.meta_dtype)

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """One ordinary backward of alpha CE + beta K, then the non-last blocks' gradients halved."""
        _broadcast_buffers(self.student_module)
        with self.precision.autocast():
            output = self.student_module(images, preact=self.student_preact)
            teacher_out = self.teacher(images, preact=self.teacher_preact)
            kd = self.kd_terms(output, teacher_out, targets, indices, epoch)
            ce = self.weights.ce * _ce(output.features[-1], targets)
        loss = ce + (torch.stack(list(kd.values())).sum() if kd else 0.0)
        optimizer = self.optimizers["main"]
        optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        params = [p for params in self.block_params for p in params] + self.distiller_params
        _average_across_ranks([p.grad for p in params if p.grad is not None])
        with torch.no_grad():
            for l, block in enumerate(self.block_params[:-1]):
                for param in block:
                    if param.grad is not None:
                        param.grad.mul_(self.p[l, 1])
        self.precision.step(optimizer)
        out = {"ce": ce.detach(), **{k: v.detach() for k, v in kd.items()}}
        out["loss"] = loss.detach()
        out["correct"] = (output.features[-1].detach().argmax(dim=1) == targets).sum()
        return out


@register_strategy("abl-search")
class ABLSearch(ABLBase):
    """Stage 1 (§6): warm start at gamma = 0, then alternating gamma (held-out split) and weight updates."""

    needs_validation: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opts = self.options
        self.gamma = torch.zeros(self.num_blocks - 1, 2, device=self.p.device, dtype=self.meta_dtype,
                                 requires_grad=True)
        self.meta_optimizer = torch.optim.Adam([self.gamma], lr=opts.meta_lr, betas=tuple(opts.meta_betas),
                                               weight_decay=opts.meta_weight_decay)
        self.meta_done = 0  # gamma updates so far (= validation batches consumed)
        self.stopped_early = False
        self.checkpoints_p1: list[tuple[int, list[float]]] = []  # (meta step, p1) at each log point
        self.records: list[dict[str, Any]] = []
        self.last_hyper: Tensor | None = None
        self.last_diff: Tensor | None = None
        # Lines the engine prints when the run starts: how the search was sized, and a warning if it is degenerate.
        self._notices: list[tuple[str, bool]] = [(describe_search(opts), False)]
        warning = search_warning(opts)
        if warning:
            self._notices.append((warning, True))

    def start_notices(self) -> list[tuple[str, bool]]:
        """How the search was sized, and a warning when it is degenerate."""
        return list(self._notices)

    def initial_p(self) -> Tensor:
        return torch.full((self.num_blocks - 1, 2), 0.5, dtype=self.meta_dtype)

    def current_p(self) -> Tensor:
        return self.gamma.detach().softmax(dim=1)

    @property
    def max_steps(self) -> int:
        """Iterations stage 1 needs at most (the engine runs enough epochs for them)."""
        return steps_budget(self.options)

    @property
    def validation_fraction(self) -> float:
        """Share of the training set held out for gamma (§6.1)."""
        return self.options.val_fraction

    @property
    def validation_batches_used(self) -> int:
        """Held-out batches consumed so far (one per gamma update)."""
        return self.meta_done

    def attach_validation(self, batches: Iterator) -> None:
        """The endless stream of validation batches (the engine positions it after `meta_done` batches)."""
        self.val_batches = batches

    def searching(self, step: int) -> bool:
        """Whether this 0-based global step updates gamma."""
        opts = self.options
        if self.stopped_early or self.meta_done >= opts.meta_steps or step < opts.warm_steps:
            return False
        return (step - opts.warm_steps) % opts.meta_every == 0

    def should_stop(self) -> bool:
        """True once the bilevel phase has run its meta steps or p has settled (§12 row 13)."""
        return self.stopped_early or self.meta_done >= self.options.meta_steps

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """§6.3: components on B_tr, then (meta steps) virtual step, L_val, hypergradient, gamma step; real step.

        Steps without a gamma update (warm start, meta_every > 1, after the search) take the fused step.
        """
        searching = self.searching(step)
        if not searching:
            out = super().training_step(images, targets, indices, epoch, step)
            if step < self.options.warm_steps and step % self.options.log_every == 0:
                self.record(step, epoch, "warm")
            return out
        if self.val_batches is None:
            raise RuntimeError("abl-search needs validation batches: the engine calls attach_validation")
        parts = self.components(images, targets, indices, epoch)
        val_images, val_targets, val_indices = next(self.val_batches)
        self.meta_step(parts, val_images, val_targets, val_indices, epoch)
        p = self.current_p()
        self.apply(self.combined(parts, p))
        # The last gamma update is always logged: a search shorter than log_every updates still has its curve.
        if self.meta_done % self.options.log_every == 0 or self.meta_done == self.options.meta_steps:
            self.record(step, epoch, "meta", parts)
        return self.step_output(parts.terms, parts.logits, p, targets)

    def meta_step(self, parts: Components, images: Tensor, targets: Tensor, indices: Tensor, epoch: int) -> None:
        """One gamma update by the hypergradient of §6.4 (or §6.6's finite differences)."""
        hyper, diff = self.hypergradient(parts, images, targets, indices, epoch)
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.gamma.grad = hyper
        if self.options.meta_grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([self.gamma], self.options.meta_grad_clip)
        self.meta_optimizer.step()
        self.meta_done += 1
        self.last_hyper, self.last_diff = hyper.detach(), diff.detach()

    def virtual_weights_for(self, parts: Components, p: Tensor) -> tuple[list[Tensor], list[Tensor], list[float]]:
        """(parameters, w' = their next SGD iterate under p, dw'/dg per parameter) for every trained parameter."""
        optimizer = self.optimizers["main"]
        lookup = {id(param): group for group in optimizer.param_groups for param in group["params"]}
        params, nexts, jacobians = [], [], []
        for param, grad in self.combined(parts, p):
            if grad is None:
                continue  # SGD skips a parameter without a gradient
            w_next, jac = sgd_next(param.detach(), grad, lookup[id(param)], optimizer.state.get(param, {}))
            params.append(param)
            nexts.append(w_next)
            jacobians.append(jac)
        return params, nexts, jacobians

    def validation_loss(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                        gamma: Tensor | None = None) -> Tensor:
        """L_val at the current weights on one validation batch (§6.5); BN follows `val_bn`."""
        opts = self.options
        alpha = self.weights.ce
        modules = [self.student_module, self.heads]
        modes = [(m, m.training) for mod in modules for m in mod.modules()]
        if opts.val_bn == "eval":
            for mod in modules:
                mod.eval()
        try:
            with self.precision.autocast():
                # Undetached: v is the gradient of L_val through the whole network.
                forward = forward_blocks(self.student_module, self.plan, images, self.student_preact)
                logits = forward.output.features[-1]
                ce = _ce(logits, targets)
                if opts.val_objective == "ce":
                    return ce  # §6.5: plain CE; alpha * CE would scale the hypergradient by alpha
                loss = alpha * ce
                teacher_out = self.teacher(images, preact=self.teacher_preact)
                kd = self.kd_terms(forward.output, teacher_out, targets, indices, epoch)
                kd_total = torch.stack(list(kd.values())).sum() if kd else torch.zeros((), device=images.device)
                loss = loss + kd_total
                if opts.val_objective == "composite":
                    p = (self.gamma if gamma is None else gamma).softmax(dim=1)
                    for l, (head, h) in enumerate(zip(self.heads, forward.block_outputs[:-1])):
                        local = _ce(head(h), targets)
                        loss = loss + p[l, 0] * alpha * local + p[l, 1] * kd_total
                return loss
        finally:
            for m, training in modes:
                m.training = training

    @contextlib.contextmanager
    def at_weights(self, params: list[Tensor], values: list[Tensor]) -> Iterator[None]:
        """Run the body with `params` set to `values`; weights and BatchNorm statistics restored bit for bit after."""
        with preserved([self.student_module, self.heads, self.distiller], params):
            with torch.no_grad():
                for param, value in zip(params, values):
                    param.copy_(value)
            yield

    def heads_follow_gamma(self) -> bool:
        """Whether w' of the auxiliary heads depends on gamma and L_val depends on the heads.

        With aux_grad=weighted the head update is p1 * alpha * c_l, and the composite L_val evaluates the heads at
        w'; then the hypergradient needs v_phi = dL_val/dphi' too (the other objectives never run the heads).
        """
        return self.options.aux_grad == "weighted" and self.options.val_objective == "composite"

    def validation_gradient(self, params: list[Tensor], nexts: list[Tensor], images: Tensor, targets: Tensor,
                            indices: Tensor, epoch: int) -> dict[int, Tensor | None]:
        """v = dL_val/dw' at w' for every weight whose update depends on gamma (by parameter id), plus the explicit
        dL_val/dgamma: the non-last blocks, and the heads when `heads_follow_gamma`.

        The weights are set to w' in place and restored bit for bit, BatchNorm statistics included (§13 item 8).
        """
        wanted_ids = {id(q) for block in self.block_params[:-1] for q in block}
        if self.heads_follow_gamma():
            wanted_ids |= {id(q) for head in self.head_params for q in head}
        wanted = [q for q in params if id(q) in wanted_ids]
        composite = self.options.val_objective == "composite"
        with self.at_weights(params, nexts):
            loss = self.validation_loss(images, targets, indices, epoch)
            grads = torch.autograd.grad(loss, wanted + ([self.gamma] if composite else []), allow_unused=True)
        v: dict[int, Tensor | None] = {id(q): g for q, g in zip(wanted, grads)}
        v["explicit"] = grads[-1] if composite else None  # type: ignore[index]
        return v

    @torch.no_grad()
    def validation_loss_at(self, parts: Components, gamma: Tensor, images: Tensor, targets: Tensor,
                           indices: Tensor, epoch: int = 1) -> float:
        """L_val(w'(gamma), gamma) as a number, for checking the hypergradient by finite differences."""
        params, nexts, _ = self.virtual_weights_for(parts, gamma.softmax(dim=1))
        with self.at_weights(params, nexts):
            return float(self.validation_loss(images, targets, indices, epoch, gamma=gamma))

    def hypergradient(self, parts: Components, images: Tensor, targets: Tensor, indices: Tensor,
                      epoch: int) -> tuple[Tensor, Tensor]:
        """(dL_val/dgamma [L - 1, 2], s1 - s2 per block) at w' = the virtual SGD step under the current p."""
        p = self.current_p()
        params, nexts, jacobians = self.virtual_weights_for(parts, p)
        v = self.validation_gradient(params, nexts, images, targets, indices, epoch)
        explicit = v.pop("explicit")  # type: ignore[call-overload]
        _average_across_ranks([g for g in v.values() if g is not None] + ([explicit] if explicit is not None else []))
        jac = {id(q): j for q, j in zip(params, jacobians)}
        last = self.num_blocks - 1
        s1 = torch.zeros(last, dtype=torch.float64, device=p.device)
        s2 = torch.zeros_like(s1)
        alpha = self.weights.ce
        if self.options.hypergrad == "exact":
            for l in range(last):
                for q, a, b in zip(self.block_params[l], parts.a[l], parts.b[l]):
                    g = v.get(id(q))
                    if g is None:
                        continue
                    # dw'/dg (SGD's lr, times a momentum factor under Nesterov) is folded in here.
                    if a is not None:
                        s1[l] += jac[id(q)] * (a.double() * g.double()).sum()
                    if b is not None:
                        s2[l] += jac[id(q)] * (b.double() * g.double()).sum()
                # aux_grad=weighted: g_phi_l = p1 alpha c_l enters w' like p1 a_l, so with v_phi = dL_val/dphi'_l
                # (non-zero only under the composite objective) dL_val/dgamma1 gains -lr p1 p2 alpha <c_l, v_phi>.
                for q, c in zip(self.head_params[l] if self.heads_follow_gamma() else [], parts.c[l]):
                    g = v.get(id(q))
                    if g is not None and c is not None:
                        s1[l] += jac[id(q)] * alpha * (c.double() * g.double()).sum()
        else:
            s1, s2 = self.finite_difference(parts, v, jac)
        p64 = p.double()
        weight = p64[:, 0] * p64[:, 1] * (s1 - s2)
        hyper = torch.stack([-weight, weight], dim=1).to(self.gamma.dtype)
        if explicit is not None:
            hyper = hyper + explicit
        return hyper, (s1 - s2).float()

    @torch.no_grad()
    def finite_difference(self, parts: Components, v: dict[int, Tensor | None],
                          jac: dict[int, float]) -> tuple[Tensor, Tensor]:
        """§6.6 block-wise central differences of the local and KD losses along v on the training batch (Eq. 10)."""
        targets, indices, epoch = parts.batch
        last = self.num_blocks - 1
        vectors = [g for g in v.values() if g is not None]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in vectors)) if vectors else torch.tensor(0.0)
        s1 = torch.zeros(last, dtype=torch.float64, device=self.p.device)
        s2 = torch.zeros_like(s1)
        if float(norm) == 0.0:
            return s1, s2
        xi = self.options.fd_xi / float(norm)
        alpha = self.weights.ce
        forward = parts.forward
        for l in range(last):
            # Head l moves with block l when its update is p1 alpha c_l (`heads_follow_gamma`): the local loss is
            # then differentiated along (v_theta, v_phi) together, which adds alpha <c_l, v_phi> to s1; K and s2
            # do not depend on the heads.
            heads = self.head_params[l] if self.heads_follow_gamma() else []
            params = [q for q in list(self.block_params[l]) + list(heads) if v.get(id(q)) is not None]
            if not params:
                continue
            # The step direction is dw'/dg * v; jac is per parameter (a scalar for SGD).
            values = {}
            with preserved([self.student_module, self.heads, self.distiller], params):
                for sign in (1.0, -1.0):
                    for q in params:
                        q.add_(sign * xi * jac[id(q)] * v[id(q)])
                    x = forward.block_inputs[l]
                    out = forward_blocks(self.student_module, self.plan, x, self.student_preact, start=l,
                                         cached=forward.output)
                    local = _ce(self.heads[l](out.block_outputs[0]), targets)
                    kd = self.kd_terms(out.output, parts.teacher_out, targets, indices, epoch)
                    kd_total = torch.stack(list(kd.values())).sum() if kd else torch.zeros(())
                    values[sign] = (local.double(), kd_total.double())
                    for q in params:
                        q.sub_(sign * xi * jac[id(q)] * v[id(q)])
            s1[l] = alpha * (values[1.0][0] - values[-1.0][0]) / (2 * xi)
            s2[l] = (values[1.0][1] - values[-1.0][1]) / (2 * xi)
        return s1, s2

    def record(self, step: int, epoch: int, phase: str, parts: Components | None = None) -> None:
        """One row of abl_gamma.csv (Fig. 3; with `parts`, Fig. 5's mean |a_l|, |b_l|) and the early-stopping check."""
        p = self.current_p().cpu()
        row: dict[str, Any] = {"step": step, "epoch": epoch, "phase": phase, "meta_step": self.meta_done}
        names = self.block_names[:-1]
        row.update({f"p1/{n}": float(p[l, 0]) for l, n in enumerate(names)})
        row.update({f"p2/{n}": float(p[l, 1]) for l, n in enumerate(names)})
        if self.last_hyper is not None:
            hyper, diff = self.last_hyper.cpu(), self.last_diff.cpu()
            row.update({f"hypergrad/{n}": float(hyper[l, 0]) for l, n in enumerate(names)})
            row.update({f"s1_minus_s2/{n}": float(diff[l]) for l, n in enumerate(names)})
        if parts is not None:
            for part in ("a", "b"):
                for name, grads in zip(self.block_names, getattr(parts, part)):
                    present = [g.abs().flatten() for g in grads if g is not None]
                    row[f"grad_{part}/{name}"] = float(torch.cat(present).mean()) if present else 0.0
        self.records.append(row)
        if phase == "meta":
            self.checkpoints_p1.append((self.meta_done, p[:, 0].tolist()))
            window = self.options.early_stop_window
            old = [p1 for done, p1 in self.checkpoints_p1 if done <= self.meta_done - window]
            if window and old:
                change = max(abs(x - y) for x, y in zip(old[-1], p[:, 0].tolist()))
                self.stopped_early = change < self.options.early_stop_delta

    def drain_records(self) -> dict[str, list[dict[str, Any]]]:
        """Rows logged since the last call, by file name."""
        rows, self.records = self.records, []
        return {"abl_gamma": rows}

    def artifacts(self) -> dict[str, Any]:
        """gamma.json: the current gamma and p, read by stage 2's `gamma_from`."""
        p = self.current_p().cpu()
        return {"gamma": {"gamma": self.gamma.detach().cpu().tolist(), "p1": p[:, 0].tolist(),
                          "blocks": self.block_names[:-1], "meta_steps": self.meta_done,
                          "stopped_early": self.stopped_early, "search": search_record(self.options)}}

    def state_dict(self) -> dict[str, Any]:
        """Adds gamma, the meta optimiser and the search counters."""
        state = super().state_dict()
        state["gamma"] = self.gamma.detach().cpu().clone()
        state["meta_optimizer"] = self.meta_optimizer.state_dict()
        state["meta_done"] = self.meta_done
        state["stopped_early"] = self.stopped_early
        state["checkpoints_p1"] = [[done, list(p1)] for done, p1 in self.checkpoints_p1]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the engine then positions the validation stream after `meta_done` batches."""
        super().load_state_dict(state)
        with torch.no_grad():
            self.gamma.copy_(state["gamma"].to(self.gamma.device))
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.meta_done = int(state["meta_done"])
        self.stopped_early = bool(state["stopped_early"])
        self.checkpoints_p1 = [(int(done), list(p1)) for done, p1 in state["checkpoints_p1"]]


def steps_budget(options: ABLOptions) -> int:
    """Iterations stage 1 needs at most: the warm start plus meta_steps updates every meta_every steps."""
    return options.warm_steps + options.meta_steps * options.meta_every


__all__ = ["ABL", "ABLOptions", "ABLSearch", "block_plan", "forward_blocks", "read_gamma", "sgd_next",
           "steps_budget"]
