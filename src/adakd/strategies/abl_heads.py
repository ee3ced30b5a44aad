"""ABL's auxiliary heads: the small classifiers that turn a block output into the local student error.

[A] §4.1 (Aux3, the default) and App. A.3 (Aux1, Aux2, Aux4); the details [A] leaves out follow the ABL
specification §4 (shared/specs/abl.md): stride, BN and width from SEDONA's light decoder (mjpyeon/sedona:decoder.py),
Aux2's layout from DGL's "mlp-sr" head (eugenium/DGL:auxiliary_nets_study/models.py).

For a block output C x S x S and width W (`width`, default C):
- aux1: global avg-pool -> Linear(C -> classes).
- aux2: avg-pool to ceil(S/4) -> 3 x [Conv1x1(-> W) + BN + ReLU] -> avg-pool to p = min(ceil(S/4), 2) -> flatten
  (W p^2 features) -> 3 x [Linear + BN1d + ReLU] -> Linear(-> classes).
- aux3: Conv1x1(C -> W) + BN + ReLU -> depthwise Conv3x3(stride 2, pad 1) + BN + ReLU -> global avg-pool ->
  Linear(W -> classes).
- aux4: aux3's two convs -> inverted residual (expand 4, stride 1, identity added) -> global avg-pool -> Linear.

`final_dim` (the spec's `aux_final_dim`; 512 reproduces SEDONA's decoder) inserts Conv1x1(-> final_dim) + BN + ReLU
just before the head's last pooling. Every conv and hidden Linear is followed by BN, so none has a bias.

Block outputs share storage with the detached copies ABL's sweep hands to the heads (spec §2 rule 3), so no head
modifies its input: each starts with a conv or a pooling that writes a new tensor, and the in-place ReLUs only
ever act on a BN output the head made itself.

A block output that is already a vector ([B, C], a layout whose non-last block ends in pooling) accepts only aux1,
which is then a bare Linear(C -> classes); the other kinds are convolutional and raise a ValueError.

A transformer block's output is a token map [B, N, C]; [A] has no head for it, so adakd uses the token analogue
of each kind: aux1 is LayerNorm -> mean over tokens -> Linear(C -> classes), and aux2-aux4 (convolutional, with no
token form) become LayerNorm -> per-token Linear(C -> W) + GELU -> mean over tokens -> Linear(W -> classes), the
smallest head with a hidden layer as Aux3 has.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from adakd.models.cifar.mobilenetv2 import InvertedResidual
from adakd.models.layers import kaiming_init
from adakd.modes import eval_mode

AUX_KINDS = ("aux1", "aux2", "aux3", "aux4")


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                  groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _linear_bn_relu(in_features: int, out_features: int) -> list[nn.Module]:
    return [nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features), nn.ReLU(inplace=True)]


def _expansion(channels: int, final_dim: int | None) -> tuple[list[nn.Module], int]:
    """The optional 1x1 expansion before the last pooling, and the channel count after it."""
    if final_dim is None:
        return [], channels
    return _conv_bn_relu(channels, final_dim), final_dim


def _check_args(kind: str, in_shape: tuple[int, ...], num_classes: int, width: int | None,
                final_dim: int | None) -> None:
    if kind not in AUX_KINDS:
        raise ValueError(f"unknown auxiliary head {kind!r}; choose one of {', '.join(AUX_KINDS)}")
    if len(in_shape) not in (1, 2, 3) or any(int(size) < 1 for size in in_shape):
        raise ValueError(f"in_shape must be a block output without the batch, (C, H, W), tokens (N, C) or (C,); "
                         f"got {in_shape}")
    for label, value in (("num_classes", num_classes), ("width", width), ("final_dim", final_dim)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{label} must be a positive integer, got {value}")
    if kind == "aux1" and width is not None:
        raise ValueError("aux1 has no hidden layer, so width does not apply; leave it unset or pick aux2-aux4")
    if len(in_shape) == 2 and final_dim is not None:
        raise ValueError(f"final_dim adds a 1x1 conv, but the block output is a token map of shape {in_shape}; "
                         "leave it unset for this model")
    if len(in_shape) == 1:
        if kind != "aux1":
            raise ValueError(f"{kind} is convolutional but the block output is a vector of shape {in_shape}; "
                             "use aux1 (a Linear head) for this model")
        if final_dim is not None:
            raise ValueError(f"final_dim adds a 1x1 conv, but the block output is a vector of shape {in_shape}; "
                             "leave it unset for this model")


def build_aux_head(kind: str, in_shape: tuple[int, ...], num_classes: int, width: int | None = None,
                   final_dim: int | None = None) -> nn.Module:
    """The auxiliary head `kind` for a block output of shape `in_shape` (no batch): logits [B, num_classes].

    Args:
        kind: one of `AUX_KINDS`.
        in_shape: the block output without the batch, (C, H, W), or (C,) for a pooled output (aux1 only).
        num_classes: classifier outputs.
        width: channels of the hidden convs (aux2-aux4); default C.
        final_dim: channels of an optional 1x1 expansion before the last pooling; default none.
    """
    _check_args(kind, in_shape, num_classes, width, final_dim)
    if len(in_shape) == 2:
        return _token_head(kind, in_shape[1], num_classes, width)
    channels = in_shape[0]
    if len(in_shape) == 1:
        layers: list[nn.Module] = [nn.Linear(channels, num_classes)]
    elif kind == "aux1":
        expand, out_channels = _expansion(channels, final_dim)
        layers = [*expand, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(out_channels, num_classes)]
    elif kind == "aux2":
        hidden = width or channels
        first_pool = tuple(math.ceil(size / 4) for size in in_shape[1:])
        second_pool = tuple(min(size, 2) for size in first_pool)
        expand, out_channels = _expansion(hidden, final_dim)
        features = out_channels * math.prod(second_pool)
        layers = [
            nn.AdaptiveAvgPool2d(first_pool),
            *_conv_bn_relu(channels, hidden),
            *_conv_bn_relu(hidden, hidden),
            *_conv_bn_relu(hidden, hidden),
            *expand,
            nn.AdaptiveAvgPool2d(second_pool),
            nn.Flatten(1),
            *_linear_bn_relu(features, features),
            *_linear_bn_relu(features, features),
            *_linear_bn_relu(features, features),
            nn.Linear(features, num_classes),
        ]
    else:
        hidden = width or channels
        layers = [
            *_conv_bn_relu(channels, hidden),
            *_conv_bn_relu(hidden, hidden, kernel_size=3, stride=2, groups=hidden),
        ]
        if kind == "aux4":
            # Expansion 4 and stride 1 are adakd's choices ([A] gives neither): a MobileNetV2 unit kept small.
            layers.append(InvertedResidual(hidden, hidden, stride=1, expansion=4))
        expand, out_channels = _expansion(hidden, final_dim)
        layers += [*expand, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(out_channels, num_classes)]
    head = nn.Sequential(*layers)
    kaiming_init(head)
    return head


class TokenMean(nn.Module):
    """Mean over the tokens of a [B, N, C] map (cls token included, as a plain average)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def _token_head(kind: str, channels: int, num_classes: int, width: int | None) -> nn.Module:
    """The token-map head of `kind` (see the module docstring)."""
    if kind == "aux1":
        return nn.Sequential(nn.LayerNorm(channels), TokenMean(), nn.Linear(channels, num_classes))
    hidden = width or channels
    return nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, hidden), nn.GELU(), TokenMean(),
                         nn.Linear(hidden, num_classes))


def build_aux_heads(kind: str, block_shapes: Sequence[tuple[int, ...]], num_classes: int, width: int | None = None,
                    final_dim: int | None = None) -> nn.ModuleList:
    """One head per non-last block: `block_shapes` are the outputs of blocks 1..L-1 (the last block has its own FC)."""
    return nn.ModuleList(build_aux_head(kind, tuple(shape), num_classes, width, final_dim) for shape in block_shapes)


@torch.no_grad()
def measure_block_shapes(blocks: Sequence[nn.Module], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Output shapes (no batch) of every block but the last, measured by running a dummy input through them in eval."""
    param = next(p for block in blocks for p in block.parameters())
    x = torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
    shapes = []
    with eval_mode(*blocks):
        for block in blocks[:-1]:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
    return shapes
