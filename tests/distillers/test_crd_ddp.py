"""CRD's masked memory update under a 2-process gloo group (issue 13): no row counts are exchanged, every rank
ends with the same banks, and they are the banks one process gets from the two batches side by side."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adakd.distillers.base import DistillContext
from adakd.distillers.crd import CRD, CRDConfig

# two processes in a gloo group; the inner loop `python -m pytest -m "not slow"` skips this file.
pytestmark = pytest.mark.slow

TARGETS = torch.tensor([0, 1, 2, 0, 1, 0, 2, 1])
CONFIG = CRDConfig(feat_dim=4, num_negatives=3, temperature=0.5, momentum=0.5)
NEGATIVES = torch.tensor([[1, 2, 4], [0, 2, 3], [0, 1, 3]])
INDICES = torch.tensor([[0, 6, 4], [5, 3, 7]])  # per rank
MASKS = torch.tensor([[1.0, 0, 1], [0.0, 0, 1]])


def make() -> CRD:
    torch.manual_seed(0)
    crd = CRD(["pooled"], [(5,)], [(6,)], CONFIG, DistillContext(3, TARGETS)).double()
    crd.sample_negatives = lambda targets: NEGATIVES[targets]
    return crd


def features():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, generator=g, dtype=torch.float64)


def worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        crd = make()
        student, teacher = features()
        idx = INDICES[rank]
        crd([student[rank]], [teacher[rank]], TARGETS[idx], masks=[MASKS[rank]], indices=idx)
        torch.save({k: v for k, v in crd.state_dict().items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_write_every_ranks_selected_rows_and_agree(tmp_path):
    mp.spawn(worker, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # One process, both batches side by side.
    single = make()
    initial = copy.deepcopy(single.memory_student)
    student, teacher = features()
    idx = INDICES.flatten()
    single([student.flatten(0, 1)], [teacher.flatten(0, 1)], TARGETS[idx], masks=[MASKS.flatten()], indices=idx)
    for key in ("memory_student", "memory_teacher"):
        assert torch.allclose(states[0][key], single.state_dict()[key], rtol=0, atol=1e-14), key
    unselected = idx[MASKS.flatten() == 0]
    assert torch.equal(states[0]["memory_student"][unselected], initial[unselected])
    assert not torch.equal(states[0]["memory_student"][idx[MASKS.flatten() == 1]], initial[idx[MASKS.flatten() == 1]])
