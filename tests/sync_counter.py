"""Count the ops that make the host wait for the device (a device->host sync on CUDA), on any device.

Usage: `with SyncCounter() as syncs: ...; assert syncs.count == 0, syncs.report()`. Importable from every test as
`from sync_counter import SyncCounter`: pytest's default (prepend) import mode puts the first folder without an
__init__.py above tests/conftest.py, i.e. tests/, on sys.path.

A TorchDispatchMode sees every aten op that reaches the dispatcher, on CPU tensors too, so a CPU test catches what
would stall a GPU: the op list below is the set whose CUDA kernels need a value (or a size) on the host. Ops called
inside another op's kernel are not seen, hence composite-but-syncing ops (nonzero-based bool indexing, unique,
bincount) are listed by their own names. Each hit keeps the innermost adakd source line that caused it.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import adakd

aten = torch.ops.aten


def _ops(*names: str) -> set:
    """The overloads named "packet.overload" that this torch build has (older builds lack some)."""
    found = set()
    for name in names:
        packet, overload = name.split(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            found.add(op)
    return found


# Always a sync: a scalar read by the host (item, int(), float(), bool(), tolist), data-dependent output sizes,
# or a host-side comparison.
ALWAYS = _ops(
    "_local_scalar_dense.default",
    "nonzero.default", "nonzero.out",
    "masked_select.default", "masked_select.out",
    "equal.default",
    "bincount.default",  # CUDA reads max() for the output length
    "_unique.default", "_unique2.default", "unique_dim.default", "unique_consecutive.default",
    "unique_dim_consecutive.default",
    "repeat_interleave.Tensor",  # the output length is the repeats' sum (when output_size is not given)
    # Decompositions that check convergence on the host inside their own kernel (`_linalg_check_errors` on `info`):
    # svd and eigh have no `_ex` form; composite ops (linalg.solve, inv, cholesky) call the check as an op of its own.
    "_linalg_svd.default", "_linalg_svd.U", "_linalg_eigh.default", "_linalg_eigh.eigenvalues",
    "_linalg_check_errors.default",
)

# Indexing syncs only when an index is boolean (converted to positions with nonzero on the device).
BOOL_INDEXED = _ops("index.Tensor", "index_put.default", "index_put_.default", "_index_put_impl_.default")

COPIES = {aten._to_copy.default, aten.copy_.default}


def _is_bool_index(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _host_device_copy(func, args, kwargs) -> bool:
    """A copy between the CPU and an accelerator that blocks the host: device->host always (tensor.cpu(), .to('cpu')),
    host->device unless non_blocking (CUDA then waits for the stream: torch.tensor(x, device='cuda'), .to('cuda'))."""
    if func is aten._to_copy.default:
        source, target = args[0].device, kwargs.get("device")
        if target is None:
            return False
        target = torch.device(target)
    else:  # copy_(destination, source)
        target, source = args[0].device, args[1].device
    if target.type == source.type:
        return False
    return source.type != "cpu" or not kwargs.get("non_blocking", args[2] if len(args) > 2 else False)


# adakd's own source folder: a frame belongs to adakd when its file lies under it. Matching "/adakd/" in the path
# took this helper (and every test) for adakd's source in a checkout folder named adakd.
PACKAGE_DIR = Path(adakd.__file__).resolve().parent


def _where() -> str:
    """The innermost frame in adakd's source (else the innermost outside torch and this file)."""
    frames = traceback.extract_stack()
    for frame in reversed(frames):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(PACKAGE_DIR):
            return f"{path.relative_to(PACKAGE_DIR.parent).as_posix()}:{frame.lineno}"
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and path.rsplit("/", 1)[-1] != "sync_counter.py":
            return f"{path.split('/')[-1]}:{frame.lineno}"
    return "?"


# Tensor methods that copy every element to the host without an aten op on CPU tensors (CPU `tolist` reads the
# storage directly), so only the Python-level torch-function hook sees them.
HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy}


class _HostReads(TorchFunctionMode):
    """The torch-function half of SyncCounter: counts HOST_READS, which dispatch never sees on CPU."""

    def __init__(self, counter: "SyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in HOST_READS:
            return func(*args, **kwargs)
        self.counter.hits.append((func.__name__, _where()))
        # On CUDA the read is a device-to-host copy that the dispatch half would count a second time.
        self.counter.inside_host_read += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.counter.inside_host_read -= 1


class SyncCounter(TorchDispatchMode):
    """Counts syncing ops while active; `hits` keeps (op name, source line) of each."""

    def __init__(self, host_resident=None) -> None:
        """`host_resident(tensor)` names tensors that live on the host even in a CUDA run (Adam's `step` counter
        unless capturable or fused): reading those is no sync, though on CPU nothing tells them apart."""
        super().__init__()
        self.hits: list[tuple[str, str]] = []
        self.host_resident = host_resident
        self.inside_host_read = 0
        self._host_reads = _HostReads(self)

    def __enter__(self):
        self._host_reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._host_reads.__exit__(*exc)

    @property
    def count(self) -> int:
        return len(self.hits)

    def reset(self) -> None:
        self.hits.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside_host_read and self._syncs(func, args, kwargs) and not self._on_host(func, args):
            self.hits.append((str(func.overloadpacket.__name__), _where()))
        return func(*args, **kwargs)

    def _on_host(self, func, args) -> bool:
        return (func is aten._local_scalar_dense.default and self.host_resident is not None
                and self.host_resident(args[0]))

    @staticmethod
    def _syncs(func, args, kwargs) -> bool:
        if func in ALWAYS:
            return True
        if func in BOOL_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(_is_bool_index(i) for i in indices if i is not None)
        if func in COPIES:
            return _host_device_copy(func, args, kwargs)
        return False

    def report(self) -> str:
        """Each distinct (op, line) with its count, most frequent first."""
        tally: dict[tuple[str, str], int] = {}
        for hit in self.hits:
            tally[hit] = tally.get(hit, 0) + 1
        lines = sorted(tally.items(), key=lambda item: -item[1])
        return "; ".join(f"{n}x {op} at {where}" for (op, where), n in lines) or "no sync"
