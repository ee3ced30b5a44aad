"""What every distiller shares: per-spot inputs, optional per-sample masks, named per-spot terms."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import Tensor, nn

from adakd.options import build_options


# Spot keywords resolved per network by `resolve_spots`: every body stage (f1 .. fn), as AT, NST and VID use.
BODY_STAGES = "stages"


@dataclass(frozen=True)
class DistillerDefaults:
    """Weights the field uses with a method when it runs alone (recipes.md §4) and its default spots.

    Spots are stage indices of the staged view [stem, stage1..stageN, pool, head]: 2 = f2 (FitNets' hint),
    -1 = logits, -2 = pooled vector, -3 = last body stage f_{L-2} (SP, FT); the keyword "stages" means every body
    stage f1..fN.
    """

    ce_weight: float = 1.0
    method_weight: float = 1.0
    spots: tuple[int | str, ...] = (-1,)


@dataclass(frozen=True)
class DistillContext:
    """Facts about the training data a distiller may need (CRD: dataset size and every label; MLKD: the views)."""

    num_classes: int
    train_targets: Tensor  # int64 label of every training sample, indexed by dataset index
    # Views per training image (data.views): 2 means each batch is [weak; strong], 2B images, targets repeated.
    views: int = 1


def resolve_spots(spots: Sequence[int | str], num_stages: int) -> list[int]:
    """Expand spot keywords and negative indices into non-negative stage indices of one network."""
    out: list[int] = []
    for spot in spots:
        if spot == BODY_STAGES:
            out.extend(range(1, num_stages - 2))
        elif isinstance(spot, int) and -num_stages <= spot < num_stages:
            out.append(spot % num_stages)
        else:
            raise ValueError(f"spot {spot!r} is not a stage index in [-{num_stages}, {num_stages}) nor 'stages'")
    return out


def require_equal_logits(method: str, spot_names: Sequence[str], student_shapes, teacher_shapes) -> None:
    """Refuse anything but logit vectors of equal size at every spot (the logit distillers' one shape rule)."""
    for spot, s, t in zip(spot_names, student_shapes, teacher_shapes):
        if s != t or len(s) != 1:
            raise ValueError(f"{method} needs logit vectors of equal size at {spot!r}; student {s} vs teacher {t}")


def per_class(temperature: Tensor | float) -> Tensor | float:
    """A temperature ready to divide [B, C] logits: one per sample ([B], a learned per-instance temperature) as
    [B, 1]; a float or a scalar tensor as it is (so the float path stays bit-identical)."""
    if isinstance(temperature, Tensor) and temperature.dim() == 1:
        return temperature.unsqueeze(1)
    return temperature


def masked_mean(per_sample: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the whole batch with masked-out samples contributing exactly zero."""
    if mask is None:
        return per_sample.mean()
    return (per_sample * mask.to(per_sample.dtype)).sum() / per_sample.shape[0]


class Distiller(nn.Module):
    """Base class: subclasses implement `forward` returning {"<name>/<spot>": scalar loss}.

    A distiller never runs the teacher, never picks spots or samples and never applies the CE/KD balance
    weights; its trainable parts (regressors, embeddings, memory banks) are submodules built from the
    measured feature shapes it is given.
    """

    name: str = "base"
    defaults = DistillerDefaults()
    config_class: type = object  # the method's frozen hyper-parameter dataclass
    student_preact = False  # True: the strategy hands over pre-activation student features
    teacher_preact = False
    # True: the loss is defined only on true pre-activations (AB, OFD), so a network staged automatically from its
    # traced forward (no pre-activation outputs) is refused; False: its stage outputs stand in (ReviewKD).
    preacts_required = False
    # Teacher features are constants to every loss. A strategy that trains the teacher jointly (SAKD's
    # trainable-teacher ablation, specs/sakd.md §11) sets this to False on its distiller instance; every distiller
    # reads teacher tensors through `teacher_input` (KD passes the flag to kd_loss), so its terms then reach it too.
    detach_teacher: bool = True
    # True when the method softens logits with a temperature of its own that a step may replace by a learned one
    # (CTKD's learned temperature): its forward reads `temperature_at(configured)`, set by `using_temperature`.
    learned_temperature: ClassVar[bool] = False
    _step_temperature: Tensor | float | None = None

    def __init__(self, spot_names: Sequence[str]) -> None:
        super().__init__()
        self.spot_names = list(spot_names)

    def temperature_at(self, configured: float) -> Tensor | float:
        """The temperature of this forward: the one a step set with `using_temperature`, else `configured`."""
        return configured if self._step_temperature is None else self._step_temperature

    @contextlib.contextmanager
    def using_temperature(self, temperature: Tensor | float) -> Iterator[None]:
        """Forwards inside use `temperature` (a float, a scalar tensor or one per sample, [B]) for the method's own."""
        if not self.learned_temperature:
            raise ValueError(f"{self.name} has no temperature a learned one could replace")
        self._step_temperature = temperature
        try:
            yield
        finally:
            self._step_temperature = None

    def teacher_input(self, teacher_feat: Tensor) -> Tensor:
        """A teacher feature as the loss sees it: detached, unless `detach_teacher` is False."""
        return teacher_feat.detach() if self.detach_teacher else teacher_feat

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the student (same optimiser); excludes pre-trained, then frozen, parts."""
        frozen = {id(p) for p in self.pretrain_parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    # Optional pre-training stage (FT's paraphraser): the engine runs `pretrain_epochs` epochs of SGD on
    # `pretrain_loss(teacher_feats)` over `pretrain_parameters()` before distillation, then never updates them.
    pretrain_epochs: int = 0
    pretrain_lr: float | None = 0.01  # None: the run's own learning rate (the CRD benchmark's init stage)
    # True: the stage also runs the student and trains its parameters with `pretrain_parameters()` on
    # `pretrain_loss(teacher_feats, student_feats)` (AB's and FSP's initialisation); the student keeps learning after.
    pretrain_trains_student: ClassVar[bool] = False
    # Epochs after which the stage's learning rate drops by 10x (SSKD's teacher head: 30 and 45); none for most.
    pretrain_milestones: tuple[int, ...] = ()
    # True: every training batch comes with its rotated copies, [x; x90; x180; x270] (adakd.rotations, SSKD); the
    # engine's loaders add them, both for the pre-training stage and for distillation.
    rotated_copies: ClassVar[bool] = False

    def pretrain_parameters(self) -> list[nn.Parameter]:
        """Parameters of the pre-training stage (empty for most methods)."""
        return []

    def pretrain_loss(self, teacher_feats: list[Tensor], student_feats: list[Tensor] | None = None) -> Tensor:
        """The pre-training objective on teacher features at this distiller's spots (and the student's, for a
        distiller with `pretrain_trains_student`: by default the sum of its own unmasked terms, as the CRD
        benchmark's AB and FSP initialisation stages train)."""
        if not self.pretrain_trains_student:
            raise NotImplementedError(f"{self.name} has no pre-training stage")
        if student_feats is None:
            raise ValueError(f"{self.name}'s pre-training needs the student's features")
        return torch.stack(list(self.forward(student_feats, teacher_feats, None).values())).sum()

    def read_networks(self, student: nn.Module, teacher: nn.Module, student_spots: list[int],
                      teacher_spots: list[int]) -> None:
        """Read fixed facts of the two staged networks once, when `create` builds the distiller (OFD: the teacher's
        BatchNorm margins); most methods need none."""

    def term_names(self) -> list[str]:
        """The metric names this distiller returns, one per spot."""
        return [f"{self.name}/{spot}" for spot in self.spot_names]

    def forward(
        self,
        student_feats: list[Tensor],
        teacher_feats: list[Tensor],
        targets: Tensor,
        masks: list[Tensor | None] | None = None,
        indices: Tensor | None = None,
        epoch: int = 1,
    ) -> dict[str, Tensor]:
        raise NotImplementedError


def spot_name(stage_names: Sequence[str], index: int) -> str:
    """A readable name for a stage index: stem, stage2, pooled, logits."""
    name = stage_names[index]
    return {"pool": "pooled", "head": "logits"}.get(name, name)


def build_config(cls: type, args: dict[str, Any], where: str) -> Any:
    """A distiller's hyper-parameter dataclass from `args` through the one options resolver (adakd.options): unknown
    keys and values of the wrong type raise OptionsError (a ValueError) naming `where`.<key>."""
    return build_options(cls, args, where, noun="config key")


def zero_like_loss(reference: Tensor) -> Tensor:
    """A zero that keeps the autograd graph attached to `reference` (no NaN, no dropped graph)."""
    return reference.sum() * 0.0 if reference.requires_grad else torch.zeros((), device=reference.device)


def selection_weights(mask: Tensor, like: Tensor) -> Tensor:
    """The selected samples (mask > 0.5) as 0/1 weights in the loss precision of `like` (float32 under AMP)."""
    return (mask > 0.5).to(torch.promote_types(like.dtype, torch.float32))


def relational_term(loss_fn, student: Tensor, teacher: Tensor, mask: Tensor | None, min_samples: int = 2) -> Tensor:
    """A batch-relational loss on the selected sub-batch, scaled by its share of the batch (sakd.md §8).

    With no mask this is exactly `loss_fn(student, teacher)`. With one, `loss_fn(student, teacher, weights=w)` must
    equal the loss of the sub-batch w == 1 (pairs weighted by w_i w_j, normalisers counting selected samples) while
    keeping the whole batch: the shapes stay static, so nothing waits for the device to count the selection
    (boolean indexing would sync every step). Fewer than `min_samples` selected samples give exactly zero;
    `loss_fn` keeps its unused value finite there, so the zero's backward is zero, never a NaN.
    """
    if mask is None:
        return loss_fn(student, teacher)
    weights = selection_weights(mask, student)
    count = weights.sum()
    value = loss_fn(student, teacher, weights=weights) * (count / student.shape[0])
    return torch.where(count >= min_samples, value, torch.zeros_like(value))
