"""`adakd demo`: a teacher, the student alone and the student with KD on the embedded digits dataset."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from adakd.engine.config import resolve
from adakd.engine.trainer import Trainer

TEACHER, STUDENT = "resnet20", "resnet8"


def run_demo(out_dir: str | Path = "runs", overrides: Sequence[str] = (), quiet: bool = False) -> str:
    """Train the three runs under one new folder and return the results table."""
    root = Path(out_dir) / time.strftime("demo_%Y%m%d-%H%M%S")
    common = ["--", *overrides][1:]
    if quiet:
        common.append("log.progress=false")

    def fit(name: str, task: str, extra: list[str]) -> dict:
        print(f"\n== {name} ==", flush=True)
        config = resolve(["cifar100", "demo"], None, [f"task={task}", f"out_dir={root}", f"name={name}", *extra, *common])
        return Trainer(config).fit()

    started = time.perf_counter()
    teacher = fit("teacher", "train", [f"model.name={TEACHER}"])
    alone = fit("student", "train", [f"model.name={STUDENT}"])
    distilled = fit("student_kd", "distill", [f"model.name={STUDENT}", f"teacher.name={TEACHER}",
                                              f"teacher.weights={root / 'teacher' / 'last.pth'}", "distill.method=kd"])
    rows = [(f"teacher {TEACHER}", teacher), (f"student {STUDENT} alone", alone), (f"student {STUDENT} + KD", distilled)]
    lines = [
        f"adakd demo: scikit-learn digits, {teacher['epochs']} epochs each, {time.perf_counter() - started:.0f} s in all",
        f"{'model':<26}{'params':>9}{'top-1 last':>12}{'top-1 best':>12}",
    ]
    lines += [f"{label:<26}{r['params']:>9,}{r['last_acc1']:>11.2f}%{r['best_acc1']:>11.2f}%" for label, r in rows]
    lines.append(f"runs saved under {root}")
    return "\n".join(lines)
