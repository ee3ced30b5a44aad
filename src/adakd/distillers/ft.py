"""FT: Kim, Park and Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer" (NeurIPS 2018)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.distillers.at import attention_map
from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.connectors import pool_to_common_size, require_maps
from adakd.distillers.registry import register_distiller


def ft_loss(student_factor: Tensor, teacher_factor: Tensor) -> Tensor:
    """Per-sample factor transfer: mean over positions of |phi(F_s) - phi(F_t)|, phi(x) = normalise(mean_c x^2).

    F_s = translator(f_s), F_t = paraphraser encoder(f_t). Follows HobbitLong/RepDistiller:distiller_zoo/FT.py
    (p1 = 2, p2 = 1, larger map adaptive-average-pooled to the smaller); its mean over batch and positions equals
    the batch mean of these values. Departure from the paper (shared with RepDistiller): the paper compares the
    L2-normalised, vectorised factors themselves; here, as in RepDistiller, phi is their normalised channel energy
    (AT's map).
    """
    dtype = torch.promote_types(student_factor.dtype, torch.float32)
    student_factor, teacher_factor = pool_to_common_size(student_factor.to(dtype), teacher_factor.to(dtype))
    return (attention_map(student_factor, 2) - attention_map(teacher_factor, 2)).abs().mean(1)


def _conv_stack(channels: list[int], batch_norm: bool, transposed: bool = False) -> nn.Sequential:
    """3x3 stride-1 convolutions through `channels`, each followed by (BN and) LeakyReLU(0.1)."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out) if batch_norm else nn.Identity(),
                   nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Teacher-side auto-encoder C -> C -> kC -> kC -> kC -> C -> C, without BN (RepDistiller's default)."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor_channels, factor_channels], batch_norm=False)
        self.decoder = _conv_stack([factor_channels, factor_channels, channels, channels], batch_norm=False,
                                   transposed=True)

    def forward(self, teacher_feat: Tensor) -> Tensor:
        """The reconstruction of `teacher_feat` (pre-training objective)."""
        return self.decoder(self.encoder(teacher_feat))


EMPTY_SELECTION = ("zero", "unmasked")


@dataclass(frozen=True)
class FTConfig:
    """FT hyper-parameters: paraphrase rate k, the paraphraser's pre-training stage, the empty-selection rule."""

    rate: float = 0.5
    pretrain_epochs: int = 30
    pretrain_lr: float = 0.01
    # specs/sakd.md §8.4 switch `ft_empty_selection`: the term when a mask selects no sample of the batch.
    # "zero": exactly 0, like every per-sample loss. "unmasked": the full-batch, unmasked loss, as the SAKD code's
    # train.py keeps it (its masked value overwrites the unmasked one only when a sample is selected); the
    # sakd-faithful preset sets it.
    empty_selection: str = "zero"

    def __post_init__(self) -> None:
        if self.empty_selection not in EMPTY_SELECTION:
            raise ValueError(f"ft empty_selection must be one of {EMPTY_SELECTION}, not {self.empty_selection!r}")


@register_distiller("ft", tags=("classic",))
class FT(Distiller):
    """Factor transfer at f_{L-2}; weights CE 1, FT 200; the paraphraser is pre-trained, then frozen."""

    name = "ft"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=200.0, spots=(-3,))
    config_class = FTConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: FTConfig = FTConfig(), context=None) -> None:
        super().__init__(spot_names)
        require_maps("ft", spot_names, student_shapes, teacher_shapes)
        factor_channels = [int(t[0] * config.rate) for t in teacher_shapes]
        if min(factor_channels) < 1:
            raise ValueError(f"ft rate {config.rate} leaves no factor channels for teacher shapes {teacher_shapes}")
        self.paraphrasers = nn.ModuleList(Paraphraser(t[0], k) for t, k in zip(teacher_shapes, factor_channels))
        self.translators = nn.ModuleList(
            _conv_stack([s[0], s[0], k, k], batch_norm=True) for s, k in zip(student_shapes, factor_channels))
        self.pretrain_epochs = config.pretrain_epochs
        self.pretrain_lr = config.pretrain_lr
        self.unmasked_when_empty = config.empty_selection == "unmasked"

    def pretrain_parameters(self) -> list[nn.Parameter]:
        """The paraphrasers, trained as auto-encoders of the teacher features before distillation."""
        return list(self.paraphrasers.parameters())

    def pretrain_loss(self, teacher_feats: list[Tensor]) -> Tensor:
        """Reconstruction MSE of each teacher feature through its paraphraser, summed over spots."""
        return sum(F.mse_loss(p(t.detach()), t.detach()) for p, t in zip(self.paraphrasers, teacher_feats))

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        out = {}
        for spot, translator, paraphraser, s, t, m in zip(
                self.spot_names, self.translators, self.paraphrasers, student_feats, teacher_feats, masks):
            # The paraphraser is frozen after pre-training; a jointly trained teacher still learns through it.
            with torch.no_grad() if self.detach_teacher else contextlib.nullcontext():
                teacher_factor = paraphraser.encoder(self.teacher_input(t))
            per_sample = ft_loss(translator(s), teacher_factor)
            term = masked_mean(per_sample, m)
            if m is not None and self.unmasked_when_empty:
                # On the device: no host sync. torch.where sends the gradient to the chosen value only.
                term = torch.where(m.sum() > 0, term, per_sample.mean())
            out[f"ft/{spot}"] = term
        return out
