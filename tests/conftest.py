"""Shared fixtures; an autouse guard makes any network connection fail loudly."""
from __future__ import annotations

import socket

import pytest
import torch

# One thread in every test process, whichever files are collected: the suite's timings (and a test's float32
# rounding) then do not depend on the core count, and a loaded 2-core machine is not oversubscribed.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests must never download: any network socket connection raises (local Unix sockets, which DataLoader
    workers use to pass tensors, stay allowed)."""
    connect = socket.socket.connect

    def refuse(*args, **kwargs):
        raise RuntimeError("a test tried to open a network connection; adakd never downloads")

    def connect_locally(self, *args, **kwargs):
        if self.family == getattr(socket, "AF_UNIX", None):
            return connect(self, *args, **kwargs)
        return refuse()

    monkeypatch.setattr(socket.socket, "connect", connect_locally)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same torch RNG state and leaves torch's global switches as it found them."""
    torch.manual_seed(0)
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)
