"""Held-out subsets keep their parent's sample ids, for in-memory and folder datasets alike."""
from __future__ import annotations

import torch

from adakd import data
from adakd.data import imagenet
from adakd.data.split import stratified_split, subset


def test_array_subset_batches_report_parent_indices():
    dataset = data.load_dataset("synthetic", "train")
    train_idx, held_idx = stratified_split(dataset.targets, 0.25, seed=0)
    part = subset(dataset, held_idx)
    assert len(part) == len(held_idx) and torch.equal(part.targets, dataset.targets[held_idx])
    loader = data.make_loader(part, 16, train=True, device=torch.device("cpu"))
    seen = torch.cat([indices for _, _, indices in loader])
    assert sorted(seen.tolist()) == held_idx.tolist()
    image, target, index = part[3]
    assert index == int(held_idx[3]) and target == int(dataset.targets[held_idx[3]])
    nested = part.subset(torch.tensor([0, 2]))
    assert nested.ids.tolist() == [int(held_idx[0]), int(held_idx[2])]


def test_folder_subset_keeps_indices_targets_and_classes(imagenet_root):
    dataset = imagenet.load("train", imagenet_root)
    part = subset(dataset, torch.tensor([1, 4]))
    assert len(part) == 2 and part.num_classes == dataset.num_classes
    assert part.targets.tolist() == [int(dataset.targets[1]), int(dataset.targets[4])]
    assert [part[k][2] for k in range(2)] == [1, 4]
