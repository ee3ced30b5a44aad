"""Crash-proof runs: a training process killed with SIGKILL anywhere resumes with --resume to bitwise-equal weights.

Every run is its own OS process, killed for real with SIGKILL (no handler, no cleanup) at a chosen point: a
global training step (mid-epoch), or inside the checkpoint write of an epoch (before it, with the temporary file
half written, or right after the rename). The hooks live in `WRAPPER` below, a script that patches the engine in
the child and then calls `adakd.cli.main` exactly as `python -m adakd` does; the package carries no test hook.

Processes are forked by a small server (`SERVER`, a `python -c` subprocess talking over pipes) that has imported
torch, adakd and scikit-learn once, so a run costs its training rather than ~6 s of imports; each child is a fresh
fork of that pristine interpreter (which never trains), and nothing but the run directory on disk carries over
from a killed run to its resumption. One reference run and one error case go through a real `python -m adakd`.
"""
from __future__ import annotations

import csv
import json
import os
import select
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tiny_run import TINY_RUN, save_random_teacher

# many training processes, each killed and resumed; the inner loop `python -m pytest -m "not slow"` skips this file.
pytestmark = pytest.mark.slow

WRAPPER = r'''
import io, os, signal, sys
from pathlib import Path

log = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.dup2(log, 1)
os.dup2(log, 2)

import torch
import adakd.engine.checkpoint as checkpoint
import adakd.engine.trainer as trainer
from adakd.cli import main

torch.set_num_threads(1)  # the same in every run (the real-CLI reference gets OMP_NUM_THREADS=1)
kind, _, at = KILL.partition(":")


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if kind == "step":  # SIGKILL as global step `at` (0-based) begins
    run_epoch = trainer.train_one_epoch

    def train_one_epoch(strategy, *args, **kwargs):
        step_fn = strategy.training_step

        def training_step(images, targets, indices, epoch, step):
            if step == int(at):
                die()
            return step_fn(images, targets, indices, epoch, step)

        strategy.training_step = training_step
        try:
            return run_epoch(strategy, *args, **kwargs)
        finally:
            del strategy.training_step

    trainer.train_one_epoch = train_one_epoch
elif kind:  # before-save / mid-save / after-save: around the save of last.pth for epoch `at`
    save = trainer.save_atomic
    torch_save = torch.save

    def half_written(obj, f, *args, **kwargs):  # torch.save that dies with half of the bytes on disk
        buffer = io.BytesIO()
        torch_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        handle = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        die()

    def save_atomic(obj, path):
        hit = Path(path).name == "last.pth" and obj["epoch"] == int(at)
        if hit and kind == "before-save":
            die()
        if hit and kind == "mid-save":
            checkpoint.torch.save = half_written
        save(obj, path)
        if hit and kind == "after-save":
            die()

    trainer.save_atomic = save_atomic

sys.exit(main(ARGV))
'''

SERVER = r'''
import json, os, sys, traceback
import torch, sklearn.datasets, adakd.cli, adakd.engine.trainer  # what every run would import again

for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            exec(job["code"], {"__name__": "__main__", "ARGV": job["argv"], "KILL": job["kill"], "LOG": job["log"]})
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
'''

KILLED = -signal.SIGKILL  # the exit code of a process ended by SIGKILL
FAST = [*TINY_RUN, "data.train_size=96", "optim.epochs=3", "optim.milestones=[2]", "deterministic=true"]
STEPS_PER_EPOCH = 3  # 96 images / batch 32; ABL trains on ~48 (half held out) in batches of 16
DISTILL = ["teacher.name=resnet8"]
STRATEGIES = {
    "standard": ["train"],
    "kd": ["distill", *DISTILL, "method=kd"],
    "crd": ["distill", *DISTILL, "method=crd", "distill.args.num_negatives=32"],
    # SSKD: its teacher head's stage (in the checkpoint from epoch 1) and the rotated copies of every batch.
    "sskd": ["distill", *DISTILL, "method=sskd", "distill.args.pretrain_epochs=2"],
    "sakd": ["distill", *DISTILL, "method=kd", "strategy=sakd"],
    # 2 warm + 7 meta steps at 3 steps per epoch: the run length (3 epochs) comes from the step budget.
    "abl-search": ["distill", *DISTILL, "method=kd", "strategy=abl-search", "strategy.args.warm_steps=2",
                   "strategy.args.meta_steps=7", "strategy.args.log_every=1", "data.batch_size=16"],
}
# Fields of a checkpoint that legitimately differ between two runs: timings (in history) and paths (in config).
UNCOMPARED = {"history", "config", "adakd_version"}


class Launcher:
    """Runs the CLI in fresh processes forked by one `SERVER`; one run at a time."""

    def __init__(self) -> None:
        self.server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)

    def __call__(self, args: list[str], log: Path, kill: str = "") -> int:
        """Run `adakd ARGS` (output to `log`), SIGKILLed at `kill` if given; its exit code (-9: SIGKILL)."""
        job = {"code": WRAPPER, "argv": args, "kill": kill, "log": str(log)}
        self.server.stdin.write(json.dumps(job) + "\n")
        self.server.stdin.flush()
        if not select.select([self.server.stdout], [], [], 300)[0]:
            os.killpg(self.server.pid, signal.SIGKILL)
            pytest.fail(f"adakd {' '.join(args)} hung; see {log}")
        line = self.server.stdout.readline()
        assert line, "the fork server died"
        return int(line)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def launch():
    launcher = Launcher()
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("crash")
    save_random_teacher(path / "teacher.pth", seed=123)
    return path


def argv(root: Path, strategy: str, name: str, *extra: str) -> list[str]:
    task, *overrides = STRATEGIES[strategy]
    if task == "distill":
        overrides.append(f"teacher.weights={root / 'teacher.pth'}")
    return [task, *FAST, *overrides, *extra, f"out_dir={root}", f"name={name}", "--preset", "demo"]


def cli(args: list[str]) -> subprocess.CompletedProcess:
    """A real `python -m adakd ...`."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "adakd", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def load(path: Path) -> dict:
    """A checkpoint must load safely (weights_only) and be a complete run checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {"model", "strategy", "optimizers", "rng", "epoch"} <= set(state), path
    return state


def flat(value, prefix=""):
    if isinstance(value, dict):
        for key in value:
            yield from flat(value[key], f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from flat(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def assert_same_state(expected: dict, actual: dict) -> None:
    """Bitwise: model, strategy (policy, gamma, memory banks...), optimisers, schedule, every RNG, counters."""
    a = dict(flat({k: v for k, v in expected.items() if k not in UNCOMPARED}))
    b = dict(flat({k: v for k, v in actual.items() if k not in UNCOMPARED}))
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def rows(path: Path, drop=("train/images_per_s", "time/epoch_s")) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(open(path))]


@pytest.fixture(scope="module")
def references(root):
    """Uninterrupted runs, started in the background while the interrupted ones run (standard: the real CLI)."""
    launch = Launcher()  # its own server: the references run beside the interrupted runs

    def reference(strategy: str) -> Path:
        name = f"reference-{strategy}"
        if strategy == "standard":
            done = cli(argv(root, strategy, name))
            assert done.returncode == 0, done.stderr
        else:
            assert launch(argv(root, strategy, name), root / f"{name}.log") == 0
        return root / name

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield {s: pool.submit(reference, s) for s in STRATEGIES}
    launch.close()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_killed_anywhere_resumes_bitwise(launch, root, references, strategy):
    """One run killed three times in a row, each resumption killed at the next point, then finished."""
    run = root / f"killed-{strategy}"
    log = root / f"killed-{strategy}.log"
    resume = [STRATEGIES[strategy][0], "--resume", str(run)]
    mid_epoch_2 = STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2

    # 1. Mid-epoch 2: the checkpoint of epoch 1 is what is left.
    assert launch(argv(root, strategy, run.name), log, kill=f"step:{mid_epoch_2}") == KILLED
    assert load(run / "last.pth")["epoch"] == 1

    # 2. While epoch 2's checkpoint is half written: last.pth is still epoch 1's, intact.
    assert launch(resume, log, kill="mid-save:2") == KILLED
    assert load(run / "last.pth")["epoch"] == 1
    partial = list(run.glob(".last.pth.*.tmp"))
    assert partial, "the kill did not land inside the checkpoint write"
    with pytest.raises(Exception):
        torch.load(partial[0], map_location="cpu", weights_only=True)

    # 3. Right after epoch 2's checkpoint was renamed into place.
    assert launch(resume, log, kill="after-save:2") == KILLED
    assert load(run / "last.pth")["epoch"] == 2

    # 4. Resumed to the end without a kill.
    assert launch(resume, log) == 0, log.read_text()[-3000:]
    reference = references[strategy].result()
    final, expected = load(run / "last.pth"), load(reference / "last.pth")
    assert final["epoch"] == 3
    assert_same_state(expected, final)
    assert_same_state(load(reference / "best.pth"), load(run / "best.pth"))
    metrics = rows(run / "metrics.csv")
    assert [r["epoch"] for r in metrics] == ["1", "2", "3"]  # each epoch exactly once
    assert metrics == rows(reference / "metrics.csv")  # and with the same losses and accuracies, to the digit
    if strategy == "abl-search":
        assert rows(run / "abl_gamma.csv") == rows(reference / "abl_gamma.csv")
        assert (run / "gamma.json").read_text() == (reference / "gamma.json").read_text()


@pytest.mark.parametrize("kill", ["step:1", "before-save:1", "mid-save:1"])
def test_killed_before_the_first_checkpoint_cannot_resume(launch, root, kill):
    """No checkpoint yet (killed in epoch 1, or before or inside its first save): --resume says so and exits 2."""
    name = f"early-{kill.replace(':', '-')}"
    run = root / name
    assert launch(argv(root, "standard", name, "optim.epochs=1"), root / f"{name}.log", kill=kill) == KILLED
    assert not (run / "last.pth").exists()
    if kill == "mid-save:1":  # through a real `python -m adakd`
        done = cli(["train", "--resume", str(run)])
        code, err = done.returncode, done.stderr
    else:
        log = root / f"{name}-resume.log"
        code = launch(["train", "--resume", str(run)], log)
        err = log.read_text()
    assert code == 2
    assert "adakd: error: cannot resume" in err and "no last.pth" in err and "Traceback" not in err


def test_kill_after_the_last_rename_keeps_best_consistent(launch, root):
    """Killed right after the final epoch's last.pth is in place: the resumed run still leaves a best.pth."""
    name = "after-final-save"
    run = root / name
    log = root / f"{name}.log"
    assert launch(argv(root, "standard", name, "optim.epochs=1"), log, kill="after-save:1") == KILLED
    assert launch(["train", "--resume", str(run)], log) == 0, log.read_text()[-3000:]
    last, best = load(run / "last.pth"), load(run / "best.pth")
    assert last["best"]["epoch"] == best["epoch"] == 1
    assert_same_state(last, best)
