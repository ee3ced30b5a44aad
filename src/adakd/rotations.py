"""Rotated copies of every training batch for self-supervision by rotation (SSKD): [x; x90; x180; x270]. On the
ground floor: the loader (engine) makes the copies, the distiller (SSKD) reads their layout."""
from __future__ import annotations

from typing import Any, Iterator

import torch

# The label of a rotated copy: PyTorch's ignore_index, so the class cross-entropy (mean reduction) reads the upright
# quarter only, as SSKD's `F.cross_entropy(output[nor_index], target)`, and no copy counts toward accuracy.
UNLABELLED = -100
ROTATIONS = 4  # 0, 90, 180 and 270 degrees


def rotate_copies(images: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of B images as 4B: the upright batch, then it rotated by 90, 180 and 270 degrees (counter-clockwise,
    as np.rot90), each block in the batch's order; targets UNLABELLED for the copies; ids repeated."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotated copies need square images, not {tuple(images.shape[-2:])}")
    rotated = [images] + [torch.rot90(images, k, dims=(-2, -1)) for k in range(1, ROTATIONS)]
    copies = torch.full((targets.shape[0] * (ROTATIONS - 1),), UNLABELLED, dtype=targets.dtype, device=targets.device)
    return torch.cat(rotated), torch.cat([targets, copies]), ids.repeat(ROTATIONS)


def upright_targets(targets: torch.Tensor) -> torch.Tensor:
    """The class of every image of a rotated batch (4B): the upright quarter's targets, repeated per block."""
    batch = targets.shape[0] // ROTATIONS
    return targets[:batch].repeat(ROTATIONS)


class RotatedCopies:
    """A training loader whose every batch comes with its rotated copies (`rotate_copies`); deterministic, so the
    wrapped loader's order and augmentation (and a resume's replay) are unchanged."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:  # set_epoch, num_workers, ... of the wrapped loader
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, targets, ids in self.loader:
            yield rotate_copies(images, targets, ids)
