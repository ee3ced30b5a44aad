"""`adakd demo`: the shipped grid `demo` (teacher, student alone, KD, KD+SAKD, KD+ABL on the embedded digits)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from adakd.experiments.launch import cpu_count, prepare, run_sweep

# Wall time measured with `python benchmarks/demo_time.py` on 2 idle CPU cores (README: the demo): 146 s.
MEASURED_SECONDS = 150


def run_demo(out_dir: str | Path = "runs", overrides: Sequence[str] = (), quiet: bool = False,
             seeds: int = 3, jobs: int | None = None) -> tuple[str, int]:
    """Run the demo grid under a new folder of `out_dir`, `jobs` cells at once; return its table and how many
    runs failed."""
    import io

    root = Path(out_dir) / time.strftime("demo_%Y%m%d-%H%M%S")
    started = time.perf_counter()
    jobs = jobs or max(1, min(cpu_count(), 6))
    if not quiet:  # what runs, before the progress line starts
        print(describe_demo(root, list(overrides), seeds, jobs), flush=True)
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


def describe_demo(root: Path, overrides: list[str], seeds: int, jobs: int) -> str:
    """Lines naming the demo's networks, images, epochs, run count and expected time, from its planned cells."""
    from adakd import models
    from adakd.engine.config import from_dict
    from adakd.engine.build import load_data

    _, cells, _, _ = prepare("demo", overrides, root, seeds=seeds)
    teacher = next(c for c in cells if c.role == "teacher")
    student = next(c for c in cells if c.role == "cell")
    images = len(load_data(from_dict(teacher.config), "train"))
    tested = len(load_data(from_dict(student.config), "test"))

    def network(cell) -> str:
        name = cell.config["model"]["name"]
        size = sum(p.numel() for p in models.create(name, num_classes=10).parameters()) / 1e6
        return f"{name} ({size:.2f} M parameters)"

    size = student.config["data"]["image_size"]
    strategies = sorted({c.coords.get("strategy", "") for c in cells if c.role == "cell"},
                        key=["standard", "sakd", "abl"].index)
    taught = ", ".join({"standard": "KD", "sakd": "KD+SAKD", "abl": "KD+ABL"}[s] for s in strategies)
    return "\n".join([
        f"adakd demo: scikit-learn's handwritten digits at {size}x{size} px (inside the package, nothing downloaded)",
        f"  teacher  {network(teacher)}: {'all ' if teacher.config['data']['train_size'] is None else ''}"
        f"{images:,} training images, {teacher.config['optim']['epochs']} epochs",
        f"  student  {network(student)}: {student.config['data']['train_size']} of those images, "
        f"{student.config['optim']['epochs']} epochs; alone, and under the teacher with {taught}",
        f"  {seeds} seed(s), {len(cells)} runs, {jobs} at a time, all tested on the {tested} test images; about "
        f"{MEASURED_SECONDS} s on 2 idle CPU cores",
    ])
