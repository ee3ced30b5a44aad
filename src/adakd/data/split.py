"""A held-out split of a training set (ABL's gamma search) and an endless, resumable stream of its batches."""
from __future__ import annotations

from typing import Iterator

import torch

from adakd.data.arrays import ArrayDataset


def stratified_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices), sorted; each class gives round(fraction * its count) to the held-out part."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for label in torch.unique(targets):
        members = torch.nonzero(targets == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = int(round(fraction * len(members)))
        held.append(members[:count])
        train.append(members[count:])
    train_idx, held_idx = torch.cat(train).sort().values, torch.cat(held).sort().values
    if len(train_idx) == 0 or len(held_idx) == 0:
        raise ValueError(f"a split of {len(targets)} samples with fraction {fraction} leaves one part empty")
    return train_idx, held_idx


def subset(dataset, indices: torch.Tensor):
    """The samples at `indices`; batches keep reporting their index in `dataset`."""
    if isinstance(dataset, ArrayDataset):
        return dataset.subset(indices)
    part = torch.utils.data.Subset(dataset, indices.tolist())
    part.targets = torch.as_tensor(dataset.targets)[indices]  # what the engine and distillers read
    part.classes = getattr(dataset, "classes", None)
    part.num_classes = dataset.num_classes
    return part


def endless(loader, start_batch: int = 0) -> Iterator:
    """Batches of `loader` forever, reshuffled each pass (pass k replays epoch k), starting after `start_batch`.

    The position is a pure function of the number of batches consumed, so a resumed run continues the stream.
    """
    per_pass = len(loader)
    if per_pass == 0:
        raise ValueError("the held-out split is smaller than one batch")
    cycle, skip = divmod(start_batch, per_pass)
    while True:
        loader.set_epoch(cycle + 1)
        for batch in loader:
            if skip:
                skip -= 1
                continue
            yield batch
        cycle += 1
