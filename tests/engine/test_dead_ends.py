"""Dead ends a first user hit (issue 18, items 6 and 8): a full disk, an out_dir that is a file, an image size no
machine holds, SIGTERM, stdout redirected to a file, and defaults for threads and loader workers that
oversubscribed a 2-core machine.

The runs go through `adakd.cli.main` in-process on the embedded digits; SIGTERM and buffering are checked on a
real `python -m adakd` process as well.
"""
from __future__ import annotations

import errno
import importlib.util
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from test_bad_input import fails, run_argv

from adakd.cli import main
from adakd.data import loader as data_loader
from adakd.engine import trainer as trainer_module
from adakd.engine.config import resolve
from adakd.engine.trainer import Trainer, auto_threads, check_image_size, idle_cores

REPO = Path(__file__).resolve().parents[2]


def one_error_line(capsys, code: int, expected_code: int, *fragments: str) -> str:
    """Assert the exit status and exactly one stderr line starting 'adakd: ' holding every fragment."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == expected_code, captured.err
    assert len(lines) == 1 and lines[0].startswith("adakd: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- a full disk -----------------------------------------------------------------------------------------------


def no_space(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))


@pytest.mark.parametrize("full_at", [".config.yaml.tmp", ".meta.json.tmp", ".metrics.csv.tmp"])
def test_a_full_disk_before_the_first_checkpoint_leaves_nothing_that_blocks_the_name(tmp_path, capsys, monkeypatch,
                                                                                     full_at):
    write_text = Path.write_text

    def half_written(self, text, *args, **kwargs):  # the disk fills up halfway through this file
        if self.name == full_at:
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise no_space(self)
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", half_written)
    one_error_line(capsys, main(run_argv(tmp_path)), 2, "adakd: error: no space left on device",
                   "Free space", "then run the same command again")
    run = tmp_path / "runs" / "run"
    assert not run.exists()  # neither the stale .config.yaml.tmp nor a folder without checkpoint stays behind
    monkeypatch.undo()
    assert main(run_argv(tmp_path)) == 0  # the same name starts once there is space


def test_a_stale_temporary_file_does_not_block_the_run_name(tmp_path):
    # What a full disk left before this fix: a run folder holding only the cut `.config.yaml.tmp`.
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / ".config.yaml.tmp").write_text("task: tra")
    assert main(run_argv(tmp_path)) == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


class FullDisk(io.RawIOBase):
    """A file whose disk fills up after `room` bytes (what torch.save meets on a full disk)."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise no_space()
        self.room -= len(data)
        return self.handle.write(data)


def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    assert main(run_argv(tmp_path, "optim.epochs=3", name="reference")) == 0
    reference = json.loads((tmp_path / "runs" / "reference" / "summary.json").read_text())
    capsys.readouterr()
    torch_save = torch.save

    def save(obj, f, *args, **kwargs):  # the disk fills up during the checkpoint of epoch 2
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            return torch_save(obj, FullDisk(f, room=4096), *args, **kwargs)
        return torch_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "runs" / "run"
    line = one_error_line(capsys, main(run_argv(tmp_path, "optim.epochs=3")), 2, "no space left on device",
                          "last.pth of epoch 1 is kept", f"Free space, then continue with `adakd train --resume {run}`")
    assert "unexpected pos" not in line
    monkeypatch.undo()
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert main(["train", "--resume", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["last_acc1"] == reference["last_acc1"]


# --- out_dir that is a file ------------------------------------------------------------------------------------


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    fails(capsys, run_argv(tmp_path, f"out_dir={afile}"), f"{str(afile)!r} is a file, not a folder",
          "give out_dir= a folder")
    fails(capsys, run_argv(tmp_path, f"out_dir={tmp_path}", "name=notes.txt"), f"{str(afile)!r} is a file")
    assert afile.read_text() == "mine"


# --- an image size no machine holds ----------------------------------------------------------------------------


def test_an_absurd_image_size_is_refused_before_anything_is_allocated(tmp_path, capsys, monkeypatch):
    sixteen_gib = 16 * 2**30
    monkeypatch.setattr(trainer_module, "device_memory", lambda device: (sixteen_gib, "memory on this machine"))
    # run_argv's batch is 32: 32 x 3 x 4096 x 4096 x 4 bytes = 6 GiB of input, x32 for what backward keeps.
    fails(capsys, run_argv(tmp_path, "data.image_size=4096"),
          "data.image_size=4096: a training batch of 32 images of 3 x 4096 x 4096 needs at least 192 GiB (6.0 GiB "
          "of input", "more than the 16 GiB of memory on this machine",
          "lower data.image_size (the dataset's own size is 32) or data.batch_size")
    assert not (tmp_path / "runs").exists()
    config = resolve(["cifar100", "demo"], None, ["dataset=digits", "data.image_size=64"])
    check_image_size(config, torch.device("cpu"), world_size=1)  # 64 px: 48 MiB of input, far below 16 GiB


def test_a_dataset_that_cannot_be_resized_in_memory_is_one_line(tmp_path, capsys, monkeypatch):
    def allocate(*args, **kwargs):  # what torch's allocator raises for the 96 GB of digits at 4096 px
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 96636764160 bytes.")

    monkeypatch.setattr(trainer_module.datasets, "load_dataset", allocate)
    fails(capsys, run_argv(tmp_path, "data.image_size=512"), "data.image_size=512: the train split of digits",
          "does not fit in memory", "lower data.image_size")


# --- SIGTERM ---------------------------------------------------------------------------------------------------


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path, capsys, monkeypatch):
    def terminated(self):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # `timeout` signals the process, then its process group
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(Trainer, "fit", terminated)
    before = signal.getsignal(signal.SIGTERM)
    line = one_error_line(capsys, main(run_argv(tmp_path)), 143, "adakd: terminated (SIGTERM).")
    assert f"Continue with `adakd train --resume {tmp_path / 'runs' / 'run'}`" in line
    assert signal.getsignal(signal.SIGTERM) == before  # the handler lives only while main() runs


@pytest.mark.slow  # a separate process (or a real run) per check: CI runs it, the inner loop does not
def test_sigterm_on_a_real_process_keeps_the_last_epoch_and_resumes(tmp_path):
    run = tmp_path / "runs" / "run"
    argv = [sys.executable, "-m", "adakd", *run_argv(tmp_path, "optim.epochs=5000", "log.progress=true")]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in process.stdout:  # the run's lines arrive as printed: wait for its second epoch
            if line.startswith("epoch 2/"):
                break
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert "Traceback" not in err  # stderr also holds the progress bar's redraws
    assert [line for line in err.splitlines() if line.startswith("adakd")] == [
        f"adakd: terminated (SIGTERM). Continue with `adakd train --resume {run}` (it restarts the interrupted epoch "
        "from the last finished one; a run stopped before its first epoch ended must be started again)"]
    done = torch.load(run / "last.pth", weights_only=True)["epoch"]
    assert done >= 2
    assert main(["train", "--resume", str(run), f"optim.epochs={done + 1}", "log.progress=false"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == done + 1


# --- stdout redirected -----------------------------------------------------------------------------------------


@pytest.mark.slow  # a separate process (or a real run) per check: CI runs it, the inner loop does not
def test_stdout_redirected_to_a_pipe_gets_each_line_as_it_is_printed():
    # `adakd presets` prints its lines without flushing; the process then stays alive, as a long run would.
    code = "import time; from adakd.cli import main; main(['presets']); time.sleep(60)"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # as a user's shell has it
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=env)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 45)
        assert ready, "nothing reached the pipe while the process ran (stdout block-buffered)"
        assert process.stdout.readline().strip()
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


# --- threads ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("torch_threads, cores, idle, processes, expected", [
    (8, 8, 7.9, 1, 8),  # an idle machine: every core
    (8, 8, 3.1, 1, 3),  # 5 cores busy with other work: the 3 idle ones
    (2, 2, 1.0, 1, 1),  # the case: another process on one of 2 cores
    (8, 8, 0.0, 1, 1),  # all busy: still one thread
    (8, 8, 7.9, 2, 4),  # DDP with 2 processes on this node: cores / processes
    (8, 8, 3.1, 2, 1),
    (4, 8, 7.9, 1, 4),  # never above torch's own default (physical cores, or what the caller set)
])
def test_auto_threads_uses_the_cores_no_one_else_is_using(monkeypatch, torch_threads, cores, idle, processes,
                                                          expected):
    monkeypatch.setattr(trainer_module, "TORCH_THREADS", torch_threads)
    monkeypatch.setattr(trainer_module, "usable_cores", lambda: list(range(cores)))
    monkeypatch.setattr(trainer_module, "idle_cores", lambda cpus: idle)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert auto_threads()[0] == expected


def test_auto_threads_keeps_one_thread_when_torch_was_set_to_one(monkeypatch):
    monkeypatch.setattr(trainer_module, "TORCH_THREADS", 1)
    monkeypatch.setattr(trainer_module, "idle_cores", lambda cpus: pytest.fail("no need to measure"))
    assert auto_threads() == (1, "auto: torch was set to 1 thread")


@pytest.mark.skipif(not Path("/proc/stat").is_file() or not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_idle_cores_sees_a_busy_core():
    cpu = sorted(os.sched_getaffinity(0))[0]
    busy = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        time.sleep(0.5)  # let it start spinning
        assert idle_cores([cpu], window_s=0.5) < 0.5
    finally:
        busy.kill()
        busy.wait()


def test_auto_settings_are_resolved_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "TORCH_THREADS", 2)
    monkeypatch.setattr(trainer_module, "usable_cores", lambda: [0, 1])
    monkeypatch.setattr(trainer_module, "idle_cores", lambda cpus: 2.0)
    chosen: list[int] = []  # recorded, not applied: 2 threads on this shared 2-core machine would crawl
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    assert main(run_argv(tmp_path, name="auto")) == 0
    assert main(run_argv(tmp_path, "threads=1", "data.num_workers=3", name="given")) == 0
    assert chosen == [2, 1]
    auto, given = (tmp_path / "runs" / "auto", tmp_path / "runs" / "given")
    # config.yaml keeps what was asked (null: auto, resolved again on resume); meta.json what it resolved to.
    assert "threads: null" in (auto / "config.yaml").read_text()
    assert json.loads((auto / "meta.json").read_text())["runtime"] == {"threads": 2, "data.num_workers": 0}
    assert "threads 2 (auto: 2 of 2 cores idle at start), data.num_workers 0" in (auto / "log.txt").read_text()
    # The digits are held in memory and batched on the device: no loader workers, whatever was given.
    assert json.loads((given / "meta.json").read_text())["runtime"] == {"threads": 1, "data.num_workers": 0}
    assert "threads 1 (threads), data.num_workers 0" in (given / "log.txt").read_text()


@pytest.mark.parametrize("speeds, warned", [
    ([1000, 1000, 100, 100], True),  # epochs 3 and 4 ten times slower: one warning, at epoch 3
    pytest.param([1000, 400, 400, 400], False,  # 2.5x slower: within what a shared machine does anyway
                 marks=pytest.mark.slow),  # a second real run: CI checks the silence, the inner loop the warning
])
def test_an_epoch_that_collapses_warns_once_naming_threads(tmp_path, capsys, monkeypatch, speeds, warned):
    train_one_epoch = trainer_module.train_one_epoch

    def measured(strategy, loader, epoch, *args, **kwargs):  # the throughput loop.py measures, fixed per epoch
        row = train_one_epoch(strategy, loader, epoch, *args, **kwargs)
        if speeds[epoch - 1] < max(speeds):
            time.sleep(1.0)  # a collapsed epoch lasts a second or more (shorter ones are timing noise)
        return {**row, "train/images_per_s": float(speeds[epoch - 1])}

    monkeypatch.setattr(trainer_module, "train_one_epoch", measured)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the run believes it has 2 threads; it uses 1
    assert main(run_argv(tmp_path, f"optim.epochs={len(speeds)}", "threads=2")) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("adakd: warning:")]
    if not warned:
        assert lines == []
        return
    assert lines == [
        "adakd: warning: epoch 3 trained at 100 img/s, 10.0x slower than epoch 1 (1000 img/s): other processes are "
        "probably using the cores of this run's threads=2. Stop it (Ctrl-C) and continue with fewer, e.g. `adakd "
        f"train --resume {tmp_path / 'runs' / 'run'} threads=1`, or free the cores"]


# --- loader workers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cores, processes, expected", [(2, 1, 1), (1, 1, 0), (16, 1, 4), (8, 4, 1), (8, 8, 0)])
def test_auto_num_workers_never_exceeds_the_cores(monkeypatch, cores, processes, expected):
    monkeypatch.setattr(data_loader.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert data_loader.auto_num_workers() == expected


@pytest.mark.slow  # a separate process (or a real run) per check: CI runs it, the inner loop does not
def test_the_readme_example_runs_without_loader_warnings(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("readme_test", REPO / "tests" / "test_readme_example.py")
    readme_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_test)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        readme_test.test_readme_example_distils_a_users_model_on_a_users_dataset(tmp_path, monkeypatch, capsys)
    assert not [str(w.message) for w in caught if "worker" in str(w.message)]
    workers = json.loads((tmp_path / "runs" / "s" / "meta.json").read_text())["runtime"]["data.num_workers"]
    assert workers == data_loader.auto_num_workers() <= max(0, len(os.sched_getaffinity(0)) - 1)
