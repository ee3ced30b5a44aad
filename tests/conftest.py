"""Shared fixtures; an autouse guard makes any network connection fail loudly."""
from __future__ import annotations

import os
import socket

import pytest
import torch

# One thread in every test process, whichever files are collected: the suite's timings (and a test's float32
# rounding) then do not depend on the core count, and a loaded 2-core machine is not oversubscribed.
torch.set_num_threads(1)


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _is_loopback(address: object) -> bool:
    """Whether a socket address (host, port[, ...]) names this machine's loopback interface."""
    return isinstance(address, tuple) and bool(address) and str(address[0]) in LOOPBACK


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never reach the internet: any connection except to the loopback interface raises. A server a test
    starts on 127.0.0.1 (tests/http_server.py) stands in for a download site; local Unix sockets, which DataLoader
    workers use to pass tensors, stay allowed."""
    connect = socket.socket.connect
    create_connection = socket.create_connection

    def refuse(address: object) -> None:
        raise RuntimeError(f"a test tried to open a network connection to {address!r}; tests may only reach a "
                           "server on 127.0.0.1 that they start themselves")

    def connect_locally(self, address, *args, **kwargs):
        if self.family == getattr(socket, "AF_UNIX", None) or _is_loopback(address):
            return connect(self, address, *args, **kwargs)
        return refuse(address)

    def create_local_connection(address, *args, **kwargs):
        if _is_loopback(address):
            return create_connection(address, *args, **kwargs)
        return refuse(address)

    monkeypatch.setattr(socket.socket, "connect", connect_locally)
    monkeypatch.setattr(socket, "create_connection", create_local_connection)


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path_factory):
    """adakd's per-user cache (downloaded datasets, fetched teachers) is a fresh folder in every test, so no test
    reads or fills the developer's ~/.cache/adakd."""
    monkeypatch.setenv("ADAKD_CACHE", str(tmp_path_factory.mktemp("adakd-cache")))
    for name in ("ADAKD_DATA", "ADAKD_TEACHERS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same torch RNG state and leaves torch's global switches as it found them."""
    torch.manual_seed(0)
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def file_server(monkeypatch):
    """A download site on 127.0.0.1 (tests/http_server.py): put files in `.files`, then fetch `.url(path)`."""
    from http_server import FileServer  # tests/ is on sys.path (pytest prepends the conftest folder)

    # A proxy configured on the machine must not be asked for the loopback site.
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost,::1")
    with FileServer() as server:
        yield server


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache read offline; huggingface_hub reads its constants at import, so they are
    patched as well as the environment (which a subprocess would read)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def random_teacher(tmp_path):
    """Writes a randomly initialised zoo teacher's checkpoint: `random_teacher(name="resnet8", path=None,
    num_classes=10, seed=None, epoch=None)` returns its path (default tmp_path / "<name>_teacher.pth")."""
    from tiny_run import save_random_teacher  # tests/ is on sys.path

    def write(name: str = "resnet8", path=None, num_classes: int = 10, *, seed=None, epoch=None):
        target = tmp_path / f"{name}_teacher.pth" if path is None else path
        return save_random_teacher(target, name, num_classes, seed=seed, epoch=epoch)

    return write


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    """No dataset folder from the developer's environment: every ADAKD_DATA* variable (ADAKD_DATA, and
    ADAKD_DATA_<NAME> for each dataset, present or future) is unset, so a test reads only the folders it names."""
    for name in [key for key in os.environ if key.startswith("ADAKD_DATA")]:
        monkeypatch.delenv(name)
