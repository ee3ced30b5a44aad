"""Run a sweep's cells: `local` (N processes at once, GPUs or CPU threads shared out) or `slurm` (submitit).

Both run each cell through `adakd.experiments.sweep.run_cell`, which skips a finished cell and resumes an interrupted
one; so a sweep that was killed, pre-empted or partly failed continues where it stopped when it is run again.
"""
from __future__ import annotations

import datetime
import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from adakd.experiments.sweep import Cell, Sweep, SweepError


@dataclass
class Progress:
    """Counts of the cells of one sweep call, shown as one live line."""

    total: int
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    done: int = 0
    failed: int = 0
    running: int = 0
    skipped: int = 0
    durations: list[float] = field(default_factory=list)
    jobs: int = 1
    _last: str = ""

    def line(self) -> str:
        """'sweep: 3/12 done, 2 running, 1 failed, 6 waiting, ETA 0:04:10'."""
        waiting = self.total - self.done - self.failed - self.running
        eta = "–"
        if self.durations:
            per_cell = sum(self.durations) / len(self.durations)
            eta = str(datetime.timedelta(seconds=round(per_cell * (waiting + self.running / 2) / max(1, self.jobs))))
        already = f" ({self.skipped} already done)" if self.skipped else ""
        return (f"sweep: {self.done}/{self.total} done{already}, {self.running} running, {self.failed} failed, "
                f"{waiting} waiting, ETA {eta}")

    def show(self, final: bool = False) -> None:
        """Redraw in place on a terminal; elsewhere print a line only when it changed."""
        text = self.line()
        if self.stream.isatty():
            self.stream.write("\r" + text.ljust(len(self._last)) + ("\n" if final else ""))
            self.stream.flush()
        elif text != self._last:
            print(text, file=self.stream, flush=True)
        self._last = text


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def runtime_overrides(cell: Cell, threads: int | None) -> list[str]:
    """How a launcher places a run: quiet progress (the run's log.txt keeps every line) and CPU threads."""
    out = ["log.progress=false"]
    if threads is not None and cell.config.get("threads") is None:
        out.append(f"threads={threads}")
    return out


def _order(sweep: Sweep, cells: list[Cell], retry_failed: bool) -> tuple[list[Cell], list[Cell], dict[str, str]]:
    """(cells to run, cells already done, failed cells not retried -> their error)."""
    todo, finished, failed = [], [], {}
    for cell in cells:
        state = sweep.state(cell)
        if state["state"] == "done":
            finished.append(cell)
        elif state["state"] == "failed" and not retry_failed:
            failed[cell.name] = state.get("error", "failed")
        else:
            todo.append(cell)
    return todo, finished, failed


class _Scheduler:
    """Start each cell once the cells it reads have finished; a failed dependency fails its dependants."""

    def __init__(self, sweep: Sweep, cells: list[Cell], retry_failed: bool, progress: Progress) -> None:
        self.sweep = sweep
        self.todo, finished, self.failed = _order(sweep, cells, retry_failed)
        self.done = {c.name for c in finished}
        self.progress = progress
        progress.done = progress.skipped = len(finished)
        progress.failed = len(self.failed)

    def ready(self) -> list[Cell]:
        """Cells whose dependencies are done; dependants of failed cells are failed too."""
        out = []
        for cell in list(self.todo):
            broken = [d for d in cell.after if d in self.failed]
            if broken:
                self.todo.remove(cell)
                self.finish(cell, False, f"not run: {broken[0]} failed", 0.0)
            elif all(d in self.done for d in cell.after):
                out.append(cell)
        return out

    def finish(self, cell: Cell, ok: bool, error: str, seconds: float) -> None:
        """Book a cell's end."""
        if ok:
            self.done.add(cell.name)
            self.progress.done += 1
            self.progress.durations.append(seconds)
        else:
            self.failed[cell.name] = error
            self.progress.failed += 1


def run_local(sweep: Sweep, cells: list[Cell], jobs: int = 1, retry_failed: bool = False,
              progress: Progress | None = None, gpus_per_cell: int = 1) -> dict[str, str]:
    """Run the cells as subprocesses, `jobs` at once; return failed cell -> error line.

    With GPUs each cell gets `gpus_per_cell` of them (under torchrun when more than one); on CPU the cores are
    shared out as `threads` per cell.
    """
    gpus = _visible_gpus()
    per_cell = max(1, gpus_per_cell)
    if gpus and per_cell > len(gpus):
        raise SweepError(f"gpus_per_cell={per_cell} but only {len(gpus)} GPU(s) are visible")
    if gpus:
        jobs = min(jobs, max(1, len(gpus) // per_cell))
    threads = None if gpus else max(1, cpu_count() // max(1, jobs))
    progress = progress or Progress(len(cells))
    progress.jobs = jobs
    scheduler = _Scheduler(sweep, cells, retry_failed, progress)
    running: dict[str, tuple[subprocess.Popen, Cell, float, list[str], TextIO]] = {}
    free_gpus = list(gpus)
    try:
        while True:
            for cell in scheduler.ready():
                if len(running) >= jobs:
                    break
                if cell.name in running:
                    continue
                devices = [free_gpus.pop(0) for _ in range(per_cell)] if gpus else []
                scheduler.todo.remove(cell)
                process, log = _start(sweep, cell, devices, threads)
                running[cell.name] = (process, cell, time.perf_counter(), devices, log)
            progress.running = len(running)
            progress.show()
            if not running and not scheduler.ready():
                break
            time.sleep(0.2)
            for name, (process, cell, started, devices, log) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[name]
                free_gpus += devices
                ok = process.returncode == 0 and sweep.state(cell)["state"] == "done"
                error = "" if ok else sweep.state(cell).get("error") or f"exit code {process.returncode}"
                scheduler.finish(cell, ok, error, time.perf_counter() - started)
    except KeyboardInterrupt:
        for process, *_ in running.values():
            process.terminate()
        for process, *_ in running.values():
            process.wait()
        raise
    progress.running = 0
    progress.show(final=True)
    return scheduler.failed


def _visible_gpus() -> list[str]:
    """CUDA device indices this process may hand out, [] on a CPU machine."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # pragma: no cover - a broken CUDA install runs on CPU
        count = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


def _start(sweep: Sweep, cell: Cell, devices: list[str], threads: int | None) -> tuple[subprocess.Popen, TextIO]:
    """Launch `python -m adakd.experiments.sweep ROOT CELL` (under torchrun for a multi-GPU cell), output to its log."""
    runtime = runtime_overrides(cell, threads)
    command = [sys.executable, "-m", "adakd.experiments.sweep", str(sweep.root), cell.name, *runtime]
    if len(devices) > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(devices)}",
                   "-m", "adakd.experiments.sweep", str(sweep.root), cell.name, *runtime]
    env = dict(os.environ)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    log = open(sweep.log_file(cell.name), "a")
    log.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
    log.flush()
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log


def run_submitit(sweep: Sweep, cells: list[Cell], jobs: int = 1, retry_failed: bool = False,
                 parameters: dict[str, Any] | None = None, progress: Progress | None = None,
                 poll_s: float = 2.0) -> dict[str, str]:
    """Submit the cells as job arrays through submitit, dependencies first, and wait for them."""
    from adakd.experiments.slurm import executor_for, submit

    progress = progress or Progress(len(cells))
    progress.jobs = jobs
    scheduler = _Scheduler(sweep, cells, retry_failed, progress)
    executor = executor_for(sweep, dict(parameters or {}), jobs)
    while True:
        wave = scheduler.ready()
        if not wave:
            break
        for cell in wave:
            scheduler.todo.remove(cell)
        submitted = submit(executor, sweep, wave)
        started = time.perf_counter()
        pending = dict(zip([c.name for c in wave], zip(wave, submitted)))
        while pending:
            progress.running = len(pending)
            progress.show()
            for name, (cell, job) in list(pending.items()):
                if not job.done():
                    continue
                del pending[name]
                ok = sweep.state(cell)["state"] == "done"
                error = ""
                if not ok:
                    error = sweep.state(cell).get("error") or _job_error(job)
                scheduler.finish(cell, ok, error, time.perf_counter() - started)
            if pending:
                time.sleep(poll_s)
    progress.running = 0
    progress.show(final=True)
    return scheduler.failed


def _job_error(job: Any) -> str:
    """The exception of a finished submitit job, as one line."""
    try:
        job.result()
    except Exception as err:  # submitit wraps the job's own error
        return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return "finished without a result"


LAUNCHERS: dict[str, Callable[..., dict[str, str]]] = {"local": run_local, "slurm": run_submitit}



def _preflight(cells: list[Cell]) -> None:
    """Open the test split of every distinct dataset once and load every teacher file the sweep does not train into
    its network, so a wrong data.root or --teacher fails before any cell starts."""
    from adakd.engine.config import ConfigError, from_dict
    from adakd.engine.build import build_model, load_data, teacher_candidate
    from adakd.models.checkpoint import CheckpointError

    datasets: list[tuple[dict[str, Any], Any]] = []
    checked: list[Any] = []
    for cell in cells:
        data = cell.config["data"]
        opened = next((d for seen, d in datasets if seen == data), None)
        if opened is None:
            opened = load_data(from_dict(cell.config), "test")
            datasets.append((data, opened))
        teacher = cell.config.get("teacher") or {}
        if cell.kind == "train" or cell.teacher_cell is not None or not (
                teacher.get("weights") or teacher_candidate(teacher.get("name", ""), opened.num_classes)):
            continue  # trained alone, taught by a teacher the sweep trains first, or a scratch teacher
        key = (teacher, data)
        if key in checked:
            continue
        checked.append(key)
        config = from_dict(cell.config)
        path = config.teacher.weights or teacher_candidate(config.teacher.name, opened.num_classes)
        try:
            build_model(config.teacher, opened.num_classes, "teacher", in_chans=opened[0][0].shape[0])
        except (CheckpointError, ConfigError, OSError) as err:
            raise SweepError(f"teacher {config.teacher.name} ({path}), needed by cell {cell.name}: {err}; fix "
                             f"--teacher {config.teacher.name}=PATH (nothing was run)") from None


def prepare(grid: str, overrides: list[str], out: str | Path | None, teachers: dict[str, str] | None = None,
            seeds: int | None = None, check_teachers: bool = True) -> tuple[Sweep, list[Cell], str, dict[str, Any]]:
    """(sweep folder, planned cells, grid label, grid) for a grid, or for a sweep folder given to continue.

    `seeds` replaces the grid's seeds (0..seeds-1).
    """
    from adakd.experiments.sweep import load_grid, plan

    folder = Path(grid)
    if (folder / "sweep.yaml").is_file():  # continue a sweep with what it was started with
        if overrides or teachers or (out is not None and Path(out) != folder):
            raise SweepError(f"{grid} is a sweep folder: it is continued with the grid, overrides and teachers it "
                             "was started with; give no KEY=VALUE, --teacher or --out")
        manifest = Sweep(folder).load()
        label, source = manifest["grid"], manifest["source"]
        overrides, teachers, root = list(manifest["overrides"]), dict(manifest["teachers"]), folder.resolve()
    else:
        label, source = load_grid(grid)
        if seeds is not None:
            if seeds < 1:
                raise SweepError(f"--seeds must be >= 1, got {seeds}")
            source = {**source, "seeds": seeds}
        root = Path(out) if out is not None else Path("runs") / f"sweep-{label}"
        # Cells may run from another directory (slurm jobs): every path a plan holds is absolute.
        root = root.resolve()
        teachers = {name: str(Path(path).resolve()) for name, path in (teachers or {}).items()}
    return Sweep(root), plan(source, label, root, overrides, teachers, check_teachers), label, {
        "source": source, "overrides": list(overrides), "teachers": dict(teachers or {})}


def dry_run_text(sweep: Sweep, cells: list[Cell]) -> str:
    """Every cell with its kind and state, and the counts; nothing is written."""
    kinds = {"teacher": 0, "student": 0, "train": 0, "distill": 0, "pipeline": 0}
    lines = []
    for cell in cells:
        key = cell.role if cell.role != "cell" else cell.kind
        kinds[key] += 1
        after = f"  (after {', '.join(cell.after)})" if cell.after else ""
        state = sweep.state(cell)["state"] if sweep.manifest.is_file() else "pending"
        lines.append(f"{cell.name:<60} {key:<8} {state}{after}")
    counts = ", ".join(f"{n} {k}" for k, n in kinds.items() if n)
    lines.append(f"{len(cells)} cells ({counts}) in {sweep.root}; nothing was run (--dry-run)")
    return "\n".join(lines)


def trained_teacher_notes(sweep: Sweep, cells: list[Cell]) -> list[str]:
    """One line per teacher the sweep will train although it is published: the command that fetches it instead."""
    from adakd.models.teachers import PUBLISHED

    notes = []
    for cell in cells:
        name = cell.config.get("model", {}).get("name", "")
        dataset = cell.config.get("data", {}).get("name")
        if (cell.role == "teacher" and name in PUBLISHED and PUBLISHED[name].dataset == dataset
                and sweep.state(cell)["state"] != "done"):
            notes.append(f"sweep: teacher {name} is trained first (cell {cell.name}); to use the published one "
                         f"instead, run `adakd teachers fetch {name}` and start the sweep again")
    return notes


def run_sweep(grid: str, overrides: list[str], out: str | Path | None = None, jobs: int = 1,
              launcher: str = "local", dry_run: bool = False, retry_failed: bool = False,
              teachers: dict[str, str] | None = None, slurm: dict[str, Any] | None = None,
              watch: Callable[[str, Path], None] | None = None, stream: TextIO | None = None,
              seeds: int | None = None, progress: bool = True, wait: bool = False) -> tuple[dict, Path]:
    """Plan, validate and run a sweep; print its table; return (failed cell -> error, sweep folder).

    One sweep process per folder: another live one makes this one stop with the holder named, or wait (`wait`).
    """
    from adakd.experiments.sweep_lock import SweepLock
    from adakd.experiments.sweep_report import format_table

    stream = stream or sys.stdout
    sweep, cells, label, given = prepare(grid, overrides, out, teachers, seeds, check_teachers=not dry_run)
    run = launcher_for(launcher)
    if dry_run:
        print(dry_run_text(sweep, cells), file=stream)
        missing = [name for name, value in (given["source"].get("teachers") or {}).items()
                   if value == "required" and name not in given["teachers"]]
        if missing:
            print("to run it, give " + " ".join(f"--teacher {name}=PATH" for name in missing), file=stream)
        for note in trained_teacher_notes(sweep, cells):
            print(note, file=stream)
        return {}, sweep.root
    for note in trained_teacher_notes(sweep, cells):
        print(note, file=sys.stderr)
    sweep.check_unchanged(cells)
    if launcher == "slurm":  # before the sweep folder is written: a missing extra leaves nothing behind
        from adakd.experiments.slurm import require_submitit

        require_submitit()
    if any(sweep.state(c)["state"] != "done" for c in cells):
        _preflight(cells)
    with SweepLock(sweep.root, wait=wait, on_wait=lambda text: print(text, file=sys.stderr)):
        return _run_locked(sweep, cells, label, given, run, launcher, jobs, retry_failed, slurm, watch, stream,
                           progress, format_table)


def _run_locked(sweep: Sweep, cells: list[Cell], label: str, given: dict[str, Any], run: Callable[..., dict[str, str]],
                launcher: str, jobs: int, retry_failed: bool, slurm: dict[str, Any] | None,
                watch: Callable[[str, Path], None] | None, stream: TextIO, progress: bool,
                format_table: Callable[[Path], str]) -> tuple[dict, Path]:
    """run_sweep's part under the folder's lock: write the plan, restart fixed failures, run, report."""
    # Checked again under the lock: a sweep this one waited for may have started cells meanwhile.
    for name in sweep.check_unchanged(cells):
        moved = sweep.set_aside(name)
        print(f"cell {name} failed with another config; its config changed, so it starts again (the failed run "
              f"was moved to {moved})", file=stream)
    for cell in cells:  # a truncated last.pth cannot be resumed: --retry-failed restarts the cell from epoch 1
        if retry_failed and sweep.state(cell).get("restart"):
            moved = sweep.set_aside(cell.name)
            print(f"cell {cell.name}: its last.pth could not be read, so it restarts from epoch 1 (the old run was "
                  f"moved to {moved})", file=stream)
    sweep.write_plan(label, given["source"], given["overrides"], given["teachers"], cells)
    if watch is not None:
        watch("sweep", sweep.root)
    gpus = int(given["source"].get("gpus_per_cell", 1) or 1)
    line = Progress(len(cells), stream=sys.stderr if progress else io.StringIO())
    if launcher == "slurm":
        settings = {**(given["source"].get("slurm") or {}), **(slurm or {})}
        if gpus > 1:
            settings.setdefault("gpus_per_node", gpus)
        failed = run(sweep, cells, jobs, retry_failed, settings, progress=line)
    else:
        failed = run(sweep, cells, jobs, retry_failed, progress=line, gpus_per_cell=gpus)
    print(format_table(sweep.root), file=stream)
    if failed:
        print(f"\n{len(failed)} cell(s) failed:", file=stream)
        for name, error in failed.items():
            print(f"  {name}: {error}  (log: {sweep.log_file(name)})", file=stream)
        print(f"rerun `adakd sweep {sweep.root}` to continue (add --retry-failed to run the failed cells again; a "
              "cell whose last.pth cannot be read then restarts from epoch 1, its old folder kept under failed/)",
              file=stream)
    return failed, sweep.root


def launcher_for(name: str) -> Callable[..., dict[str, str]]:
    """The launcher function of a name."""
    if name not in LAUNCHERS:
        raise SweepError(f"unknown launcher {name!r}; use one of {', '.join(LAUNCHERS)}")
    return LAUNCHERS[name]


def describe_grids() -> str:
    """Every shipped grid with its cell count and description."""
    from adakd.experiments.sweep import grid_names, load_grid, plan

    lines = []
    for name in grid_names():
        label, source = load_grid(name)
        cells = plan(source, label, Path("runs") / f"sweep-{name}", check_teachers=False)
        grid_cells = sum(1 for c in cells if c.role == "cell")
        lines.append(f"{name:<17} {len(cells):>5} runs ({grid_cells} grid cells)  {source.get('description', '')}")
    lines.append("\nrun one with `adakd sweep NAME data.root=PATH ...`; `--dry-run` lists its cells")
    return "\n".join(lines)
