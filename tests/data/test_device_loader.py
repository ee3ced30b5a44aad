"""make_loader on ArrayDatasets: coverage, exact replay per (seed, epoch), ranks, crop/flip content, normalisation."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from torchvision.transforms import functional as TF

from adakd.data import ArrayDataset, load_dataset, make_loader
from adakd.data.loader import epoch_seed

CPU = torch.device("cpu")


def _dataset(n: int = 37, augment: str = "crop_flip", size: int = 8, padding: int = 2) -> ArrayDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)  # unique content
    return ArrayDataset(images, torch.arange(n) % 5, classes=list("abcde"), mean=(0.4, 0.5, 0.6),
                        std=(0.2, 0.25, 0.3), augment=augment, crop_padding=padding)


def _normalise(ds: ArrayDataset, images: torch.Tensor) -> torch.Tensor:
    return TF.normalize(images.to(torch.float32) / 255.0, ds.mean, ds.std)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Multiply-add normalisation differs from torchvision's divide-subtract-divide in the last float bits only;
    # distinct uint8 pixels differ by more than 0.01 after normalising, so 1e-5 cannot confuse two crops.
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0)


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_each_epoch_covers_the_dataset_once() -> None:
    loader = make_loader(_dataset(), 8, train=True, device=CPU, seed=1)
    assert len(loader) == 5
    for epoch in range(3):
        batches = _epoch(loader, epoch)
        assert [len(b[2]) for b in batches] == [8, 8, 8, 8, 5]
        assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(37))
    dropped = make_loader(_dataset(), 8, train=True, device=CPU, drop_last=True)
    assert len(dropped) == 4 and [len(b[2]) for b in dropped] == [8] * 4


def test_same_seed_and_epoch_replay_exactly() -> None:
    first = _epoch(make_loader(_dataset(), 8, train=True, device=CPU, seed=4), 2)
    again = _epoch(make_loader(_dataset(), 8, train=True, device=CPU, seed=4), 2)
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_epoch = _epoch(make_loader(_dataset(), 8, train=True, device=CPU, seed=4), 3)
    other_seed = _epoch(make_loader(_dataset(), 8, train=True, device=CPU, seed=5), 2)
    assert not torch.equal(first[0][2], other_epoch[0][2]) and not torch.equal(first[0][2], other_seed[0][2])


def test_two_ranks_cover_all_indices_like_distributed_sampler() -> None:
    ds = _dataset()
    orders = []
    for rank in (0, 1):
        loader = make_loader(ds, 4, train=True, device=CPU, seed=3, rank=rank, world_size=2)
        order = torch.cat([b[2] for b in _epoch(loader, 5)])
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3 << 16)
        sampler.set_epoch(5)
        assert order.tolist() == list(sampler) and len(loader) == 5  # 19 samples per rank
        orders.append(order)
    assert len(orders[0]) == len(orders[1]) == 19 and set(torch.cat(orders).tolist()) == set(range(37))
    assert epoch_seed(0, 1) != epoch_seed(1, 0) and epoch_seed(65535, 65535) < 2**32
    with pytest.raises(ValueError, match="65536"):
        make_loader(ds, 4, train=True, device=CPU).set_epoch(1 << 16)


def test_test_loader_is_ordered_unaugmented_and_unpadded() -> None:
    ds = _dataset()
    ranks = [make_loader(ds, 8, train=False, device=CPU, rank=r, world_size=2) for r in (0, 1)]
    orders = [torch.cat([b[2] for b in loader]).tolist() for loader in ranks]
    assert orders == [list(range(0, 37, 2)), list(range(1, 37, 2))]
    images, targets, index = next(iter(ranks[1]))
    assert _same(images, _normalise(ds, ds.images[index])) and torch.equal(targets, ds.targets[index])


def test_normalisation_and_items_match_dataset() -> None:
    ds = load_dataset("synthetic", "test", size=20)
    images, targets, index = next(iter(make_loader(ds, 20, train=False, device=CPU)))
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    torch.testing.assert_close(images, (ds.images.double() / 255 - mean.double()) / std.double(),
                               atol=1e-6, rtol=0, check_dtype=False)
    assert images.dtype == torch.float32
    for k in (0, 7, 19):
        item, target, i = ds[int(index[k])]
        assert i == int(index[k]) and target == int(targets[k])
        torch.testing.assert_close(item, images[k])


def _candidates(ds: ArrayDataset, i: int, flips: bool) -> list[tuple[int, int, bool, torch.Tensor]]:
    """Every crop (and flip) of sample i that RandomCrop(padding) + RandomHorizontalFlip could produce."""
    pad, size = ds.crop_padding, ds.images.shape[-1]
    padded = F.pad(ds.images[i], (pad,) * 4)
    out = []
    for dy, dx, flip in itertools.product(range(2 * pad + 1), range(2 * pad + 1), (False, True) if flips else (False,)):
        crop = padded[:, dy:dy + size, dx:dx + size]
        out.append((dy, dx, flip, _normalise(ds, torch.flip(crop, dims=[-1]) if flip else crop)))
    return out


@pytest.mark.parametrize("augment", ["crop_flip", "crop"])
def test_crop_and_flip_are_shifted_copies(augment: str) -> None:
    ds = _dataset(augment=augment)
    seen = set()
    for images, _, index in _epoch(make_loader(ds, 16, train=True, device=CPU, seed=2), 1):
        assert images.shape == (len(index), 3, 8, 8)
        for image, i in zip(images, index.tolist()):
            matches = [(dy, dx, f) for dy, dx, f, c in _candidates(ds, i, augment == "crop_flip") if _same(c, image)]
            assert len(matches) == 1, f"sample {i} is no crop of its source"
            seen.add(matches[0])
    assert len({(dy, dx) for dy, dx, _ in seen}) > 5  # offsets really vary
    assert {f for _, _, f in seen} == ({False, True} if augment == "crop_flip" else {False})


def test_flip_reproduces_torch_flip() -> None:
    ds = _dataset(augment="flip")
    loader = make_loader(ds, 37, train=True, device=CPU, seed=0)
    _, _, cols = loader.plan()
    flipped = cols[:, 0] == 7  # the plan reads column 7 first exactly for the mirrored samples
    images, _, index = next(iter(loader))
    expected = torch.where(flipped.view(-1, 1, 1, 1), torch.flip(ds.images[index], dims=[-1]), ds.images[index])
    assert 0 < int(flipped.sum()) < 37
    assert _same(images, _normalise(ds, expected))
