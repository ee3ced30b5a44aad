"""SSKD: Xu, Liu, Li and Loy, "Knowledge Distillation Meets Self-Supervision" (ECCV 2020)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.rotations import ROTATIONS, upright_targets
from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.registry import register_distiller


DROPPED = -1e4  # the scaled similarity of a column a mask drops


def projection_head(dim: int) -> nn.Sequential:
    """The self-supervision head on the pooled vector: Linear(d, d), ReLU, Linear(d, d) (SSKD's `proj_head`)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


def contrastive_similarity(reps: Tensor) -> Tensor:
    """(3B, B) cosine similarity of every rotated copy's representation (rows) with every upright one's (columns),
    for a rotated batch of 4B representations laid out [upright; 90; 180; 270]."""
    batch = reps.shape[0] // ROTATIONS
    reps = F.normalize(reps.to(torch.promote_types(reps.dtype, torch.float32)), dim=1, eps=1e-8)
    return reps[batch:] @ reps[:batch].T


def copy_owner(rows: int, batch: int, device: torch.device) -> Tensor:
    """The upright column each rotated row belongs to: row r is a copy of image r mod B."""
    return torch.arange(rows, device=device) % batch


def rank_of(scores: Tensor, correct: Tensor, columns: Tensor | None = None) -> Tensor:
    """Per row, how many (selected) columns score strictly above the row's correct one: 0 = ranked first."""
    above = scores > scores.gather(1, correct[:, None])
    if columns is not None:
        above = above & columns[None, :]
    return above.sum(1)


def reference_row_order(rows: int, batch: int, device: torch.device) -> Tensor:
    """Each rotated row's place in the reference's interleaved layout (image, then rotation): row r of the block
    layout is rotation r // B + 1 of image r mod B."""
    r = torch.arange(rows, device=device)
    return (r % batch) * (ROTATIONS - 1) + r // batch


def kept_by_rank(rank: Tensor, active: Tensor, ratio: float, tie_order: Tensor | None = None) -> Tensor:
    """SSKD's error-level ranking, with static shapes: among the active rows, every row ranked first plus the
    floor(ratio * wrong) wrong rows of lowest rank, as the reference's argsort of the ranks and
    `index[:correct_num + int(wrong_num * ratio)]`; equal ranks go in `tie_order` (default: row order), where the
    reference's unstable argsort leaves them unspecified. No count leaves the device."""
    rows = rank.shape[0]
    wrong = (active & (rank > 0)).sum()
    keep_count = active.sum() - wrong + torch.floor(wrong.double() * ratio).long()
    tie = torch.arange(rows, device=rank.device) if tie_order is None else tie_order
    last = torch.full_like(rank, torch.iinfo(rank.dtype).max)  # inactive rows sort after every active one
    order = torch.argsort(torch.where(active, rank * rows + tie, last), stable=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    return active & (position < keep_count)


def kl_rows(student: Tensor, teacher: Tensor, temperature: float, columns: Tensor | None = None) -> Tensor:
    """Per row T^2 KL(softmax(t / T) || softmax(s / T)), over the selected `columns` only when given."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dtype) / temperature, teacher.to(dtype) / temperature
    if columns is not None:
        # A dropped column leaves both softmaxes: exp(-1e4) is an exact 0 in float32 and float64, and a finite
        # floor (not -inf) keeps 0 * log-ratio at 0 and the dropped entries' gradient at exactly 0.
        s, t = torch.where(columns[None, :], s, DROPPED), torch.where(columns[None, :], t, DROPPED)
    log_q, log_p = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1) * temperature ** 2


def kept_mean(values: Tensor, kept: Tensor, active: Tensor) -> Tensor:
    """The mean over the kept rows (the reference's batchmean on its selection) times the active share of the rows;
    no kept row gives an exact zero."""
    weights = kept.to(values.dtype)
    share = active.sum().to(values.dtype) / active.shape[0]
    return (values * weights).sum() / weights.sum().clamp(min=1) * share


@dataclass(frozen=True)
class SSKDConfig:
    """SSKD hyper-parameters: xuguodong03/SSKD student.py defaults (CIFAR-100)."""

    kd_temperature: float = 4.0
    tf_temperature: float = 4.0
    ss_temperature: float = 0.5
    kd_weight: float = 0.9
    tf_weight: float = 2.7
    ss_weight: float = 10.0
    tf_ratio: float = 1.0  # share of the wrongly ranked rotated copies kept for the transformation term
    ss_ratio: float = 0.75  # ... for the self-supervision term
    pretrain_epochs: int = 60  # the teacher's head: --t-epoch 60
    pretrain_lr: float = 0.05  # --t-lr
    pretrain_milestones: tuple[int, ...] = (30, 45)  # --t-milestones, gamma 0.1

    def __post_init__(self) -> None:
        for name in ("kd_temperature", "tf_temperature", "ss_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sskd {name} must be > 0, not {getattr(self, name)}")
        for name in ("tf_ratio", "ss_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"sskd {name} must be in [0, 1], not {getattr(self, name)}")
        if self.pretrain_epochs < 1:
            raise ValueError(f"sskd pretrain_epochs must be >= 1 (the teacher's head must be trained), "
                             f"not {self.pretrain_epochs}")


@register_distiller("sskd")
class SSKD(Distiller):
    """Self-supervised KD: each training image comes with its copies rotated by 90, 180 and 270 degrees; a teacher
    head trained to find each copy's upright image teaches the student's head its similarities.

    Follows xuguodong03/SSKD student.py (482dddec), as torchdistill refactors it (`AuxSSKDLoss`, `SSKDLoss`). Batches
    are [upright; 90; 180; 270] (4B images, `adakd.rotations`; the loader adds the copies for this method), the
    copies labelled UNLABELLED so the strategy's CE reads the upright quarter (the reference's `loss1`). Spots: the
    pooled vector (its `projection_head`) and the logits. Before distillation, `pretrain_epochs` epochs train the
    teacher's head alone (backbone frozen in eval mode, SGD lr 0.05, momentum 0.9, wd 5e-4, x0.1 at 30 and 45) on
    the cross-entropy of `contrastive_similarity` (3B x B, no temperature) against each copy's upright image; then it
    is frozen. The student's head trains with the student. The terms, with rows the rotated copies:
      "sskd/logits" = 0.9 KD_4(upright) + 2.7 TF_4(copies kept by the teacher's rank of the true class, ratio 1.0)
      "sskd/pooled" = 10 SS_0.5(similarity rows kept by the teacher's rank of the upright image, ratio 0.75)
    each T^2 KL(teacher || student) averaged over its kept rows; CE 0.1 (the strategy's).

    Departures: the copies share the upright image's crop and flip (the reference crops each rotation on its own);
    equal ranks in the error-level ranking go in the reference's row order, image then rotation (its unstable
    argsort leaves them unspecified); the block layout [upright; 90; 180; 270] replaces its interleaved one.

    ImageNet (torchdistill's rrpr2020 sskd-resnet18_from_resnet34.yaml): CE 1.0 and a 30-epoch head stage at lr 0.1,
    x0.1 at 10 and 20, i.e. `distill.ce_weight=1 distill.args.pretrain_epochs=30 distill.args.pretrain_lr=0.1
    distill.args.pretrain_milestones=[10,20]`.

    Under DDP each rank adds the copies of its own share of the batch, so the SS rows compare a rank's copies with
    that rank's upright images (a relational batch of B / ranks, as any per-rank run of the reference), and a run on
    2 ranks is not the 1-process run to float precision (tests/engine/test_ddp_equality.py has no SSKD row).

    Under a SAKD mask / ABL weights (per image of the 4B): KD is per upright image (`masked_mean`); TF is per copy,
    its ranking over the selected copies; SS is relational: rows are the selected copies whose upright image is
    selected at the pooled spot, columns the selected upright images, each term times the selected share of rows.
    """

    name = "sskd"
    defaults = DistillerDefaults(ce_weight=0.1, method_weight=1.0, spots=(-2, -1))
    config_class = SSKDConfig
    rotated_copies = True

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: SSKDConfig = SSKDConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        if list(spot_names) != ["pooled", "logits"]:
            raise ValueError(f"sskd reads the pooled vector and the logits, in that order (distill.spots=[-2, -1]), "
                             f"not {list(spot_names)}")
        if tuple(student_shapes[1]) != tuple(teacher_shapes[1]):
            raise ValueError(f"sskd needs logit vectors of equal size; student {tuple(student_shapes[1])} vs teacher "
                             f"{tuple(teacher_shapes[1])}")
        if int(getattr(context, "views", 1) or 1) != 1:
            raise ValueError("sskd brings its own rotated copies of each image: set data.views=1")
        self.config = config
        self.student_head = projection_head(int(student_shapes[0][0]))
        self.teacher_head = projection_head(int(teacher_shapes[0][0]))
        self.pretrain_epochs = config.pretrain_epochs
        self.pretrain_lr = config.pretrain_lr
        self.pretrain_milestones = config.pretrain_milestones

    def pretrain_parameters(self) -> list[nn.Parameter]:
        """The teacher's head: trained in the stage, then frozen."""
        return list(self.teacher_head.parameters())

    def pretrain_loss(self, teacher_feats: list[Tensor], student_feats: list[Tensor] | None = None) -> Tensor:
        """CE of each rotated copy's similarity row against its upright image (`AuxSSKDLoss`)."""
        pooled = teacher_feats[0].detach()
        similarity = contrastive_similarity(self.teacher_head(pooled))
        return F.cross_entropy(similarity, copy_owner(similarity.shape[0], similarity.shape[1], pooled.device))

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        (s_pooled, s_logits), (t_pooled, t_logits) = student_feats, teacher_feats
        t_pooled, t_logits = self.teacher_input(t_pooled), self.teacher_input(t_logits)
        n = s_logits.shape[0]
        batch = n // ROTATIONS
        if n != batch * ROTATIONS or batch == 0:
            raise ValueError(f"sskd needs batches of 4B rotated images, got {n}")
        pooled_mask, logits_mask = masks if masks is not None else (None, None)
        cfg = self.config
        # KD on the upright images.
        kd = masked_mean(kl_rows(s_logits[:batch], t_logits[:batch], cfg.kd_temperature),
                         None if logits_mask is None else logits_mask[:batch])
        # TF on the rotated copies, those the teacher ranks the true class of well enough.
        classes = upright_targets(targets)[batch:]
        copies = torch.ones(n - batch, dtype=torch.bool, device=s_logits.device)
        if logits_mask is not None:
            copies = logits_mask[batch:] > 0.5
        t_copies = t_logits[batch:].detach()
        tie = reference_row_order(n - batch, batch, s_logits.device)
        tf_kept = kept_by_rank(rank_of(t_copies, classes), copies, cfg.tf_ratio, tie)
        tf = kept_mean(kl_rows(s_logits[batch:], t_logits[batch:], cfg.tf_temperature), tf_kept, copies)
        # SS on the similarity rows, those the teacher ranks the upright image of well enough.
        columns = torch.ones(batch, dtype=torch.bool, device=s_logits.device)
        rows = torch.ones(n - batch, dtype=torch.bool, device=s_logits.device)
        owner = copy_owner(n - batch, batch, s_logits.device)
        if pooled_mask is not None:
            columns = pooled_mask[:batch] > 0.5
            rows = (pooled_mask[batch:] > 0.5) & columns[owner]
        s_similarity = contrastive_similarity(self.student_head(s_pooled))
        with torch.no_grad():
            t_similarity = contrastive_similarity(self.teacher_head(t_pooled))
        ss_kept = kept_by_rank(rank_of(t_similarity, owner, None if pooled_mask is None else columns), rows,
                               cfg.ss_ratio, tie)
        ss = kept_mean(kl_rows(s_similarity, t_similarity, cfg.ss_temperature,
                               None if pooled_mask is None else columns), ss_kept, rows)
        pooled_name, logits_name = self.spot_names
        return {f"sskd/{pooled_name}": cfg.ss_weight * ss,
                f"sskd/{logits_name}": cfg.kd_weight * kd + cfg.tf_weight * tf}
