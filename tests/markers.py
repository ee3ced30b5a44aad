"""Which cases of a large matrix the inner loop (`python -m pytest -m "not slow"`) keeps; CI runs them all."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import pytest


def slow_except(cases: Iterable[Any], keep: Sequence[str], ids: Sequence[str] | None = None) -> list:
    """`cases` as pytest params, each marked slow unless its id is in `keep` (a diagonal that still covers every axis).

    A case is a value, a tuple of values, or a `pytest.param` (its own id then names it). `keep` naming no case is a
    typo that would silently drop the matrix from the inner loop, so it fails the collection.
    """
    params = []
    for index, case in enumerate(cases):
        if isinstance(case, type(pytest.param(None))):
            values, marks, name = case.values, list(case.marks), case.id
        else:
            values = case if isinstance(case, tuple) else (case,)
            marks, name = [], ids[index] if ids is not None else "-".join(str(v) for v in values)
        if name not in keep:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(*values, marks=marks, id=name))
    unknown = set(keep) - {p.id for p in params}
    if unknown:
        raise ValueError(f"slow_except: no case named {sorted(unknown)}")
    return params
