"""CRD: Tian, Krishnan and Isola, "Contrastive Representation Distillation" (ICLR 2020)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.distillers.base import Distiller, DistillerDefaults, selection_weights
from adakd.distillers.registry import register_distiller
from adakd.ranks import is_distributed, world_size

NCE_EPS = 1e-7


def gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Concatenate each tensor's rows from every rank, in rank order.

    Every rank holds the same number of rows: the whole batch, with a mask as 0/1 weights beside it, and the
    loader gives every rank equal batches (DistributedSampler pads the epoch). So no row counts are exchanged,
    which would take a host sync each step. Under DDP every rank then writes every rank's new memory rows, so the
    banks stay identical everywhere.
    """
    if not is_distributed():
        return tensors
    world = world_size()
    gathered = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        gathered.append(torch.cat(parts))
    return tuple(gathered)


def crd_nce_loss(probs: Tensor, n_data: int) -> Tensor:
    """Per-sample NCE loss of normalised scores `probs` [B, 1 + K] (column 0: the positive).

    loss_b = -[log(P_pos / (P_pos + K P_n + eps)) + sum_neg log(K P_n / (P_neg + K P_n + eps))], P_n = 1 / N_data,
    eps = 1e-7: Eq. 18 of the paper as HobbitLong/RepDistiller:crd/criterion.py (ContrastLoss) computes it; the
    batch mean of these values is that code's loss.
    """
    noise = (probs.shape[1] - 1) / n_data
    positive, negatives = probs[:, 0], probs[:, 1:]
    log_positive = torch.log(positive / (positive + noise + NCE_EPS))
    log_negatives = torch.log(noise / (negatives + noise + NCE_EPS)).sum(dim=1)
    return -(log_positive + log_negatives)


def prefer_row_scoring(memory: Tensor, contrast: Tensor) -> bool:
    """Whether scoring all N bank rows beats gathering the B x (1 + K) contrast rows (True when N < B(1 + K)).

    Gathering copies B(1 + K) rows of D floats (537 MB per bank at B = 64, K = 16384) and reads them back in a
    memory-bound batched mat-vec, forward and backward; row scoring reads the N rows (and one snapshot copy) in a
    dense matmul that reuses each row for all B anchors. Both costs grow with the rows they touch, so the one
    touching fewer rows wins: CIFAR's 50,000 rows at any batch, ImageNet's 1.28M from B of about 80.
    """
    return memory.shape[0] < contrast.numel()


def momentum_update(rows: Tensor, embeddings: Tensor, momentum: float) -> Tensor:
    """New memory rows: L2-normalise(momentum * rows + (1 - momentum) * embeddings)."""
    return F.normalize(rows * momentum + embeddings * (1.0 - momentum), dim=1)


@dataclass(frozen=True)
class CRDConfig:
    """CRD hyper-parameters (RepDistiller's CIFAR-100 values)."""

    feat_dim: int = 128
    num_negatives: int = 16384
    temperature: float = 0.07
    momentum: float = 0.5


@register_distiller("crd", tags=("classic",))
class CRD(Distiller):
    """Contrastive distillation of the pooled vector against two memory banks of past embeddings.

    Departures from RepDistiller: negatives are drawn on the device from other classes WITH replacement (the
    reference draws without replacement unless a class has fewer than K negatives), and with a mask the loss,
    the normalisers and the memory update use only the selected samples, scaled by n/B (sakd.md §8.3). The mask
    enters as 0/1 weights on the whole batch (static shapes: no host sync to size a sub-batch), so negatives are
    drawn for every row, selected or not: the values equal the sub-batch's for the same negatives, but the random
    stream differs from drawing for the selected rows only.
    """

    name = "crd"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=0.8, spots=(-2,))
    config_class = CRDConfig
    # Scoring form for every call: None picks the cheaper by shape (prefer_row_scoring); True / False force row
    # scoring / gathering (tests, benchmarks of the old form).
    score_by_rows: bool | None = None

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: CRDConfig = CRDConfig(), context=None):
        super().__init__(spot_names)
        if len(spot_names) != 1:
            raise ValueError(f"crd distills one spot (its memory banks hold one embedding); got {list(spot_names)}")
        targets = None if context is None else context.train_targets
        if targets is None or targets.numel() == 0:
            raise ValueError("crd needs the training labels: pass a DistillContext with train_targets")
        counts = torch.bincount(targets, minlength=max(context.num_classes, int(targets.max()) + 1))
        if int(counts.max()) == targets.numel():
            raise ValueError("crd needs negatives from other classes, but every training sample has one class")
        self.config = config
        self.n_data = targets.numel()
        self.embed_student = nn.Linear(math.prod(student_shapes[0]), config.feat_dim)
        self.embed_teacher = nn.Linear(math.prod(teacher_shapes[0]), config.feat_dim)
        bound = 1.0 / math.sqrt(config.feat_dim / 3)
        for bank in ("memory_student", "memory_teacher"):
            self.register_buffer(bank, (torch.rand(self.n_data, config.feat_dim) * 2 - 1) * bound)
        # Negative values mean "not set yet": the first batch fixes them, and checkpoints carry them.
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        # Dataset indices grouped by class: class c owns order[start[c] : start[c] + count[c]].
        self.register_buffer("order", torch.argsort(targets, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    def sample_negatives(self, targets: Tensor) -> Tensor:
        """K dataset indices per anchor, uniform over samples of other classes (with replacement)."""
        count, start = self.class_count[targets, None], self.class_start[targets, None]
        shape = (targets.shape[0], self.config.num_negatives)
        # Modulo of a 62-bit draw: integer-exact, with a bias below 1e-12 for any dataset size.
        rank = torch.randint(0, 2**62, shape, device=targets.device) % (self.n_data - count)
        return self.order[rank + count * (rank >= start)]

    def _scores(self, memory: Tensor, contrast: Tensor, anchor: Tensor, by_rows: bool | None = None) -> Tensor:
        """exp(<memory[contrast], anchor> / T) [B, 1 + K], scoring every bank row or gathering (None: the cheaper)."""
        if by_rows is None:
            by_rows = self.score_by_rows if self.score_by_rows is not None else prefer_row_scoring(memory, contrast)
        # exp(1 / 0.07) overflows float16, so the scores stay in the memory's precision under AMP.
        with torch.autocast(anchor.device.type, enabled=False):
            if by_rows:
                # The matmul saves its operand for backward, and write_memory updates the bank in place before the
                # caller's backward: score a snapshot so that update can neither corrupt the gradient nor trip
                # autograd's version check. The snapshot copies N rows; the gather below copies B(1 + K).
                bank = memory.clone() if torch.is_grad_enabled() and anchor.requires_grad else memory
                logits = (anchor @ bank.T).gather(1, contrast)
            else:
                rows = memory[contrast]  # a copy: the in-place memory update cannot reach the autograd graph
                logits = torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2)
            return torch.exp(logits / self.config.temperature)

    def _normalised(self, scores: Tensor, z: Tensor, weights: Tensor | None = None) -> Tensor:
        # torch.where keeps the "first batch" test on the device (no host sync); dividing by the fresh tensor,
        # not the buffer, lets a second forward run before the first backward.
        if weights is None:
            current = torch.where(z < 0, scores.detach().mean() * self.n_data, z)
            z.copy_(current)
            return scores / current
        # The first batch that selects something fixes z from its selected rows' mean score.
        selected = weights.sum()
        mean = (scores.detach() * weights[:, None]).sum() / (selected * scores.shape[1]).clamp(min=1)
        current = torch.where((z < 0) & (selected > 0), mean * self.n_data, z)
        z.copy_(current)
        # Still unset (nothing selected yet): divide by 1 so that the weighted-out rows stay finite.
        return scores / torch.where(current > 0, current, torch.ones_like(current))

    def contrast(self, student: Tensor, teacher: Tensor, targets: Tensor, indices: Tensor,
                 weights: Tensor | None = None, pending: list | None = None) -> Tensor:
        """CRD on one batch: student-anchored + teacher-anchored NCE, then the memory update (or, given `pending`,
        its arguments appended there, for a caller that writes later).

        `weights` (0/1 per sample): the loss of the selected samples (the sub-batch's mean times n/B, i.e. their sum
        over B), the normalisers from them, and only their memory rows updated.
        """
        dtype = self.memory_student.dtype
        v_s = F.normalize(self.embed_student(student.flatten(1)).to(dtype), dim=1)
        v_t = F.normalize(self.embed_teacher(self.teacher_input(teacher).flatten(1)).to(dtype), dim=1)
        contrast = torch.cat([indices[:, None], self.sample_negatives(targets)], dim=1)
        student_probs = self._normalised(self._scores(self.memory_teacher, contrast, v_s), self.z_student, weights)
        teacher_probs = self._normalised(self._scores(self.memory_student, contrast, v_t), self.z_teacher, weights)
        student_nce, teacher_nce = crd_nce_loss(student_probs, self.n_data), crd_nce_loss(teacher_probs, self.n_data)
        if weights is None:
            loss = student_nce.mean() + teacher_nce.mean()
        else:
            batch = student.shape[0]
            loss = (student_nce * weights).sum() / batch + (teacher_nce * weights).sum() / batch
        if pending is None:
            self.write_memory(indices, v_s.detach(), v_t.detach(), weights)
        else:
            pending.append((indices, v_s.detach(), v_t.detach(), weights))
        return loss

    @torch.no_grad()
    def write_memory(self, indices: Tensor, v_s: Tensor, v_t: Tensor, weights: Tensor | None = None) -> None:
        """Momentum-update the rows at `indices` (only those with weight 1); under DDP every rank writes every
        rank's rows.

        Called on every rank every step with its whole batch, because it holds collectives. Unselected rows are
        written back unchanged rather than left out: the write keeps a static shape, so no host sync. (A dataset
        index appears at most once per step across ranks, as the samplers give it; were it repeated, which copy
        lands would be unspecified, as it already was for two selected copies.) The normalisers, fixed by each
        rank's first batch, are made equal too (the largest one; an unset -1 never wins over a set value).
        """
        if weights is None:
            indices, v_s, v_t = gather_rows(indices, v_s, v_t)
        else:
            indices, v_s, v_t, weights = gather_rows(indices, v_s, v_t, weights)
        momentum = self.config.momentum
        for memory, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            rows = memory[indices]
            new = momentum_update(rows, v, momentum)
            if weights is not None:
                new = torch.where(weights[:, None] > 0, new, rows)
            memory.index_copy_(0, indices, new)
        if is_distributed():
            z = torch.stack([self.z_student, self.z_teacher])
            dist.all_reduce(z, op=dist.ReduceOp.MAX)
            self.z_student.copy_(z[0])
            self.z_teacher.copy_(z[1])

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        if indices is None:
            raise ValueError("CRD needs dataset indices: pass indices= (the batch's positions in the training set)")
        mask = (masks or [None])[0]
        weights = None if mask is None else selection_weights(mask, self.memory_student)
        term = self.contrast(student_feats[0], teacher_feats[0], targets, indices, weights)
        return {f"crd/{self.spot_names[0]}": term}
