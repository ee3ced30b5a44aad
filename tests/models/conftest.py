"""Shared guards for the model tests."""
from __future__ import annotations

import socket

import pytest


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any connection attempt fail loudly, so a test that would download weights cannot pass."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tests must not open network connections; build models with weights=None")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
