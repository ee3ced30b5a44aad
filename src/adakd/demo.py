"""`adakd demo`: a teacher, the student alone and the student with KD on the embedded digits dataset."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence

from adakd.engine.config import resolve
from adakd.engine.trainer import Trainer

TEACHER, STUDENT = "resnet20", "resnet8"


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} ± {spread:4.2f}"


def run_demo(out_dir: str | Path = "runs", overrides: Sequence[str] = (), quiet: bool = False,
             seeds: int = 3) -> str:
    """Train teacher, student and student+KD for `seeds` seeds under one new folder; return the table."""
    root = Path(out_dir) / time.strftime("demo_%Y%m%d-%H%M%S")
    common = list(overrides) + (["log.progress=false"] if quiet else [])

    def fit(name: str, seed: int, task: str, extra: list[str]) -> dict:
        print(f"\n== {name}, seed {seed} ==", flush=True)
        config = resolve(["cifar100", "demo"], None, [f"task={task}", f"out_dir={root}", f"name={name}_seed{seed}",
                                                      f"seed={seed}", *extra, *common])
        return Trainer(config).fit()

    started = time.perf_counter()
    results: dict[str, list[dict]] = {"teacher": [], "student": [], "student_kd": []}
    for seed in range(seeds):
        results["teacher"].append(fit("teacher", seed, "train", [f"model.name={TEACHER}"]))
        results["student"].append(fit("student", seed, "train", [f"model.name={STUDENT}"]))
        teacher_weights = root / f"teacher_seed{seed}" / "last.pth"
        results["student_kd"].append(fit("student_kd", seed, "distill", [
            f"model.name={STUDENT}", f"teacher.name={TEACHER}", f"teacher.weights={teacher_weights}",
            "distill.method=kd"]))
    labels = {"teacher": f"teacher {TEACHER}", "student": f"student {STUDENT} alone",
              "student_kd": f"student {STUDENT} + KD"}
    first = results["teacher"][0]
    lines = [
        f"adakd demo: scikit-learn digits, {first['epochs']} epochs per run, {seeds} seed(s), "
        f"{time.perf_counter() - started:.0f} s in all",
        f"{'model':<24}{'params':>9}   {'top-1 last (mean ± std)':>24}   {'top-1 best':>15}",
    ]
    for key, runs in results.items():
        last, best = _mean_std([r["last_acc1"] for r in runs]), _mean_std([r["best_acc1"] for r in runs])
        lines.append(f"{labels[key]:<24}{runs[0]['params']:>9,}   {last:>23}%   {best:>14}%")
    lines.append(f"runs saved under {root}; 'last' is the number to compare, 'best' is selected on the test split")
    return "\n".join(lines)
