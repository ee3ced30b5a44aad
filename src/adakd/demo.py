"""`adakd demo`: the shipped grid `demo` (teacher, student alone, KD, KD+SAKD, KD+ABL on the embedded digits)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from adakd.engine.launch import cpu_count, run_sweep


def run_demo(out_dir: str | Path = "runs", overrides: Sequence[str] = (), quiet: bool = False,
             seeds: int = 3, jobs: int | None = None) -> tuple[str, int]:
    """Run the demo grid under a new folder of `out_dir`, `jobs` cells at once; return its table and how many
    runs failed."""
    import io

    root = Path(out_dir) / time.strftime("demo_%Y%m%d-%H%M%S")
    started = time.perf_counter()
    jobs = jobs or max(1, min(cpu_count(), 6))
    output = io.StringIO()
    failed, _ = run_sweep("demo", list(overrides), out=root, jobs=jobs, seeds=seeds, stream=output,
                          progress=not quiet)
    table = output.getvalue().rstrip()
    head = (f"adakd demo: scikit-learn digits, {seeds} seed(s), {jobs} run(s) at once, "
            f"{time.perf_counter() - started:.0f} s in all")
    tail = (f"runs saved under {root}; 'last' is the number to compare. `adakd table {root} --metric best` shows "
            f"the best epochs, `adakd plot {root}` draws the Δ")
    if failed:
        tail += f"\n{len(failed)} run(s) failed: see the logs under {root / 'logs'}"
    return "\n".join([head, table, tail]), len(failed)
