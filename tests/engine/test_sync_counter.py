"""The host-sync counter of tests/sync_counter.py (issue 13) counts what stalls a GPU and nothing else."""
from __future__ import annotations

import torch

from sync_counter import SyncCounter


def test_counts_scalar_reads_and_data_dependent_shapes():
    x = torch.randn(5, 3)
    mask = x[:, 0] > 0
    with SyncCounter() as syncs:
        x.sum().item()
        x[mask]
    assert [op for op, _ in syncs.hits] == ["_local_scalar_dense", "index"]
    with SyncCounter() as syncs:
        int(mask.sum()), float(x.max()), bool(mask.any())
        x.tolist()
        mask.nonzero()
        torch.masked_select(x, mask[:, None])
        torch.unique(mask)
        torch.equal(x, x)
        x[mask] = 0.0
    assert syncs.count == 9, syncs.report()
    assert all(where.startswith("test_sync_counter.py:") for _, where in syncs.hits), syncs.report()


def test_does_not_count_static_shape_work():
    x = torch.randn(5, 3, requires_grad=True)
    mask = x[:, 0] > 0
    with SyncCounter() as syncs:
        y = x @ x.t()
        z = torch.where(mask[:, None], y, 0.0).sum() / mask.sum().clamp(min=1)
        x[torch.tensor([0, 2])].sum()  # integer indexing needs no count
        z.backward()
    assert syncs.count == 0, syncs.report()


def test_decompositions_that_check_convergence_on_the_host_count():
    # svd and eigh check `info` inside their kernels; linalg.solve calls the check as an op; the _ex forms never do.
    a = torch.randn(4, 4) + 4 * torch.eye(4)
    for syncing in (lambda: torch.linalg.svd(a), lambda: torch.linalg.eigh(a @ a.T), lambda: torch.linalg.solve(a, a)):
        with SyncCounter() as syncs:
            syncing()
        assert syncs.count == 1, syncs.report()
    with SyncCounter() as syncs:
        torch.linalg.solve_ex(a, a)
        torch.linalg.inv_ex(a)
    assert syncs.count == 0, syncs.report()


def test_host_resident_tensors_are_not_counted():
    step = torch.tensor(3.0)
    with SyncCounter(host_resident=lambda t: t is step) as syncs:
        step.item()
        torch.tensor(1.0).item()
    assert syncs.count == 1


def test_attributes_syncs_to_the_caller_in_a_checkout_folder_named_adakd(tmp_path):
    """A clone into a folder named `adakd` (the README's `git clone ... adakd`) puts this helper under `/adakd/`:
    the counter must still name the caller, not its own frame (issue 18, item 2)."""
    import importlib.util
    import shutil
    from pathlib import Path

    import sync_counter

    copy = tmp_path / "adakd" / "tests" / "sync_counter.py"
    copy.parent.mkdir(parents=True)
    shutil.copy(sync_counter.__file__, copy)
    spec = importlib.util.spec_from_file_location("sync_counter_in_adakd_folder", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.SyncCounter() as syncs:
        torch.randn(3).sum().item()
    assert [where.split(":")[0] for _, where in syncs.hits] == [Path(__file__).name], syncs.report()
