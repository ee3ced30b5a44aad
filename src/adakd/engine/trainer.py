"""Train one run: its lifecycle (fit, epochs, checkpoints, resume) around what engine/build.py builds, and the
machine-dependent settings of a run (threads, compile)."""
from __future__ import annotations

import datetime
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import adakd
from adakd import data as datasets
from adakd.engine import distributed
# build's names stay importable from here (sweeps, launchers, `adakd teachers verify` import them from the trainer).
from adakd.engine.build import (Run, build_distiller, build_model, build_run, check_names, load_data,  # noqa: F401
                                teacher_candidate, teacher_fetch_hint)
from adakd.engine.checkpoint import FORMAT, load_run_checkpoint, rng_state, save_atomic, set_rng_state
from adakd.engine.config import ConfigError, RunConfig, to_dict
from adakd.engine.loop import evaluate, top5_text, train_one_epoch
from adakd.engine.pretrain import pretrain
from adakd.rotations import RotatedCopies
from adakd.engine.optim import MultiStepSchedule, base_lr, build_optimizers, lr_at
from adakd.engine.resumable import clear_unfinished
from adakd.engine.runs import DiskFullError, RunDir, RunDirError, disk_full
from adakd.data.split import endless
from adakd.engine.preprocessing import with_pretrained_preprocessing
from adakd.strategies.base import Precision, Strategy


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch and Python; deterministic mode trades speed for bitwise-repeatable kernels."""
    random.seed(seed)
    torch.manual_seed(seed)
    # Weight decay drives momentum buffers into denormal floats, which slow x86 CPUs by up to 5x.
    torch.set_flush_denormal(True)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


# torch's own thread count when adakd was imported (one per physical core, or what the caller set before): `threads`
# left to auto never goes above it, so a script or test that chose its threads keeps them.
TORCH_THREADS = torch.get_num_threads()


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity), cut to its cgroup CPU quota (a container's --cpus)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = list(range(os.cpu_count() or 1))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = cpus[:max(1, math.ceil(int(quota) / int(period)))]
    except (OSError, ValueError):
        pass
    return cpus


def idle_cores(cpus: list[int], window_s: float = 0.2) -> float | None:
    """How many of `cpus` other processes leave idle, measured over `window_s` from /proc/stat (None elsewhere)."""

    def times() -> dict[str, list[int]]:
        rows = Path("/proc/stat").read_text().splitlines()
        return {r.split()[0]: [int(v) for v in r.split()[1:]] for r in rows if r.startswith("cpu") and r[3:4] != " "}

    try:
        before = times()
        time.sleep(window_s)  # this process sleeps meanwhile: only the others' load is counted
        after = times()
    except (OSError, ValueError):
        return None
    idle = 0.0
    for cpu in cpus:
        old, new = before.get(f"cpu{cpu}"), after.get(f"cpu{cpu}")
        if old is None or new is None:
            continue
        total = sum(new[:8]) - sum(old[:8])  # user nice system idle iowait irq softirq steal
        idle += (new[3] + new[4] - old[3] - old[4]) / total if total > 0 else 1.0
    return idle


def auto_threads() -> tuple[int, str]:
    """`threads` when the config leaves it null: the cores not busy at start, shared among the processes of a DDP
    run on this node, at least 1 and at most torch's default (TORCH_THREADS); with how it was chosen, for the log."""
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    ceiling = max(1, TORCH_THREADS // processes)
    if ceiling == 1:
        return 1, "auto: torch was set to 1 thread"
    cpus = usable_cores()
    idle = idle_cores(cpus)
    free = len(cpus) if idle is None else min(len(cpus), math.floor(idle + 0.2))
    threads = max(1, min(ceiling, free // processes))
    per = f" shared by {processes} processes" if processes > 1 else ""
    return threads, f"auto: {free} of {len(cpus)} cores idle at start{per}"


# Bytes a training step keeps for its backward pass per byte of its float input batch, a floor for every network:
# measured with saved-tensor hooks at 32-224 px, resnet8 keeps 53-66x, resnet20 139-172x, resnet18 111x,
# mobilenetv1 90x, wrn_16_2 189x; 32x keeps the estimate below what any zoo model needs.
ACTIVATION_BYTES_PER_INPUT_BYTE = 32


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what) of the memory a training batch lives in: the GPU's, else this machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"GPU memory on {device}"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory on this machine"
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None, "memory"


def check_image_size(config: RunConfig, device: torch.device, world_size: int) -> None:
    """Refuse a data.image_size whose training batch cannot fit, before any image is resized to it.

    The estimate is a floor (the batch's float input times ACTIVATION_BYTES_PER_INPUT_BYTE): a size it refuses
    would fail anyway, after minutes of resizing or with an allocation of tens of GB.
    """
    size = config.data.image_size
    if size is None:
        return
    info = datasets.dataset_info(config.data.name)  # without image_size: digits would resize to measure it
    channels = config.model.in_chans or info.get("channels") or 3
    batch = max(1, config.data.batch_size // world_size)
    input_bytes = batch * channels * size * size * 4
    need = input_bytes * ACTIVATION_BYTES_PER_INPUT_BYTE
    have, where = device_memory(device)
    if have is None or need <= have:
        return
    native = f" (the dataset's own size is {info['image_size']})" if info.get("image_size") else ""
    raise ConfigError(
        f"data.image_size={size}: a training batch of {batch} images of {channels} x {size} x {size} needs at least "
        f"{need / 2**30:.0f} GiB ({input_bytes / 2**30:.1f} GiB of input, about {ACTIVATION_BYTES_PER_INPUT_BYTE}x "
        f"that kept for the backward pass), more than the {have / 2**30:.0f} GiB of {where}; lower data.image_size"
        f"{native} or data.batch_size")


def default_run_name(config: RunConfig) -> str:
    """e.g. distill_resnet56-resnet20_kd_standard_seed0, or train_resnet56_seed0."""
    if config.task == "train":
        return f"train_{config.model.name}_{config.data.name}_seed{config.seed}"
    return (f"distill_{config.teacher.name}-{config.model.name}_{config.data.name}_{config.distill.method}"
            f"_{config.strategy.name}_seed{config.seed}")


def compile_options(device: torch.device) -> dict[str, Any]:
    """The torch.compile arguments of `compile=true` on `device`."""
    # Static shapes: an epoch's smaller tail batch gets a graph of its own instead of making every graph dynamic,
    # and only static graphs can be replayed as CUDA graphs, which remove the launch cost of small kernels (CUDA only).
    # fullgraph: a graph break would leave a slower patchwork, so such a part runs eagerly instead (see below).
    options: dict[str, Any] = {"dynamic": False, "fullgraph": True}
    if device.type == "cuda":
        options["mode"] = "reduce-overhead"
    return options


def compile_networks(strategy: Strategy, device: torch.device, note: Callable[[str], None]) -> list[str]:
    """Compile, in place, the forwards of the staged student and teacher that `strategy` drives; returns their names.

    Strategies call these views as modules (whole forwards, routing segments), so compiling the view's own
    `forward` reaches every such call, while parameters, `state_dict` keys and checkpoints stay those of eager
    runs. A view whose forward fails to compile runs eagerly from then on, with one `note`. A strategy that runs the
    student block by block outside the view's forward (detached blocks) gets only its teacher compiled.
    """
    import torch._dynamo  # late: only compiled runs pay for importing the compiler

    compiled = []
    for part, module in (("student", distributed.unwrap(strategy.student)), ("teacher", strategy.teacher)):
        if isinstance(module, nn.Module) and "forward" not in vars(module):
            module.forward = _eager_on_failure(module, torch.compile(module.forward, **compile_options(device)),
                                               part, note)
            compiled.append(part)
    # Every view, shape and mode (routing segments, the tail batch, eval) is one cache entry of the same code object;
    # torch's default of 8 would silently leave the rest eager. (torch < 2.6 names the limit cache_size_limit.)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    if device.type == "cuda":
        strategy.training_step = _marking_steps(strategy.training_step)
    return compiled


def _eager_on_failure(module: nn.Module, compiled: Callable, part: str, note: Callable[[str], None]) -> Callable:
    """`compiled`, or the module's eager forward for good once compiling fails (nothing has run by then)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:
            del module.forward  # the class's eager forward again
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            note(f"compile=true: the {part} runs eagerly, torch.compile failed on it ({reason[:200]})")
            return module.forward(*args, **kwargs)

    return forward


def _marking_steps(training_step: Callable) -> Callable:
    """`training_step` that first tells CUDA graphs a new step begins.

    A step may leave a compiled forward's backward unrun (a policy's backward may reach only what it needs), and
    CUDA-graph trees would then wait for it instead of reusing the last step's memory.
    """

    def step(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        torch.compiler.cudagraph_mark_step_begin()
        return training_step(*args, **kwargs)

    return step


class Trainer:
    """One run: `Trainer(config).fit()`; `Trainer.resume(run_dir).fit()` continues it exactly."""

    def __init__(self, config: RunConfig, run_dir: str | Path | None = None, checkpoint: dict | None = None):
        check_names(config)
        # data.mean / std / image_size left null take the pretrained weights' values; config.yaml records them.
        config, preprocessing_notes = with_pretrained_preprocessing(config)
        self.config = config
        run_path = Path(run_dir) if run_dir else Path(config.out_dir) / (config.name or default_run_name(config))
        if checkpoint is None:
            RunDir(run_path).check_new()  # fail before minutes of data loading, not after
        self.threads, self.threads_source = ((config.threads, "threads") if config.threads is not None
                                             else auto_threads())
        torch.set_num_threads(self.threads)
        self.dist = distributed.setup(config.device)
        seed_everything(config.seed, config.deterministic)
        device = self.dist.device
        check_image_size(config, device, self.dist.world_size)
        # A resumed run's student comes from its checkpoint, so only the teacher reads its start weights again.
        built = build_run(config, dist=self.dist,
                          start_weights=("student", "teacher") if checkpoint is None else ("teacher",))
        self.built: Run = built
        self.train_set, self.test_set, self.val_set, self.split = (built.train_set, built.test_set, built.val_set,
                                                                   built.split)
        self.input_shape, self.batch = built.input_shape, built.batch
        # Said once when the run starts (the run folder does not exist yet).
        self.setup_notes: list[str] = [*preprocessing_notes, *built.notes]
        self.student, self.teacher, self.distiller = built.student, built.teacher, built.distiller
        self.teacher_spots, self.teacher_is_trained = built.teacher_spots, built.teacher_is_trained
        self.strategy = built.strategy
        if config.compile:
            compile_networks(self.strategy, device, lambda text: self.say(text, warning=True))
        # The batch an optimiser step sees: accumulated micro-batches count (for scale_lr_with_batch).
        self.lr = base_lr(config.optim, config.data.batch_size * config.optim.accumulate)
        try:  # a component's optimiser refuses the optim settings it cannot run with before anything is written
            self.optimizers = build_optimizers(self.strategy.optimizer_specs(), config.optim, self.lr)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.schedule = MultiStepSchedule(config.optim, self.optimizers, self.lr)
        self.precision = Precision(device, config.amp)
        loader_args = dict(device=device, seed=config.seed, rank=self.dist.rank, world_size=self.dist.world_size,
                           num_workers=config.data.num_workers)
        self.train_loader = self.with_copies(datasets.make_loader(self.train_set, self.batch, train=True,
                                                 drop_last=self.single_sample_tail(self.train_set),
                                                 views=config.data.views, strong_aug=config.data.strong_aug,
                                                 **loader_args))
        self.test_loader = datasets.make_loader(
            self.test_set, max(1, config.data.test_batch_size // self.dist.world_size), train=False, **loader_args)
        # A strategy bounded in iterations (a search stage) runs as many epochs as they need.
        max_steps = self.strategy.max_steps
        self.epochs = math.ceil(max_steps / len(self.train_loader)) if max_steps else config.optim.epochs
        self.strategy.attach(self.optimizers, self.precision, total_steps=self.epochs * len(self.train_loader),
                             clip_grad_norm=config.optim.clip_grad_norm, accumulate=config.optim.accumulate)
        self.run = RunDir(run_path, enabled=self.dist.is_main, tensorboard=config.log.tensorboard)
        self.epoch, self.step, self.best = 0, 0, {"acc1": -1.0, "epoch": 0}
        # The values auto settings resolved to on this machine (config.yaml keeps null, so a resume re-resolves).
        self.runtime = {"threads": self.threads, "data.num_workers": self.train_loader.num_workers}
        if checkpoint is None:
            self.run.create(config, runtime=self.runtime)
        else:
            self._restore(checkpoint)
        self.saved_epoch = self.epoch  # the epoch last.pth holds (0: none yet)
        try:
            if checkpoint is None and self.split is not None:
                self.run.write_json("split", self.split)
            if checkpoint is not None and to_dict(config) != checkpoint["config"]:  # resumed with overrides
                self.run.update_config(config)
        except (OSError, RuntimeError) as err:
            if disk_full(err) is None:
                raise
            raise self._disk_full() from None
        if self.split is not None:
            # The held-out stream continues where the checkpoint left it: its position is the batches consumed.
            val_loader = self.with_copies(datasets.make_loader(
                self.val_set, self.batch, train=True, device=device, seed=(config.seed + 4099) % 65536,
                rank=self.dist.rank, world_size=self.dist.world_size, num_workers=config.data.num_workers,
                drop_last=self.single_sample_tail(self.val_set)))
            self.strategy.attach_validation(endless(val_loader, self.strategy.validation_batches_used))

    def with_copies(self, loader):
        """`loader` with the rotated copies of every batch when the distiller reads them (SSKD), else as it is."""
        if self.distiller is None or not self.distiller.rotated_copies:
            return loader
        height, width = self.input_shape[1:]
        if height != width:
            raise ConfigError(f"{self.config.distill.method} rotates every training image by 90 degrees, so it needs "
                              f"square images, not {height} x {width}: set data.image_size to one size")
        return RotatedCopies(loader)

    def single_sample_tail(self, dataset) -> bool:
        """Whether an epoch would end on a batch of one sample, which is then dropped.

        BatchNorm cannot normalise one sample on a 1 x 1 map in training (timm and torchvision models at CIFAR
        sizes reach 1 x 1), and a one-sample step is mostly noise; any other tail batch is kept, as the papers do.
        """
        per_rank = math.ceil(len(dataset) / self.dist.world_size)
        return per_rank % self.batch == 1 and per_rank > 1

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None) -> "Trainer":
        """Continue a run from its last checkpoint (overrides such as optim.epochs=300 may extend it)."""
        from adakd.engine.config import merge, parse_override, from_dict

        run_dir = Path(run_dir)
        path = run_dir / "last.pth"
        if not run_dir.is_dir():
            raise ConfigError(f"cannot resume {str(run_dir)!r}: no such folder; give the folder of a run")
        if not path.is_file():
            raise ConfigError(f"cannot resume {str(run_dir)!r}: it has no last.pth (nothing was checkpointed yet); "
                              "delete the folder and start the run again, or start it under another name=")
        state = load_run_checkpoint(path)
        for stale in run_dir.glob(".*.pth.*.tmp"):  # a save cut short by a crash; the checkpoint itself is intact
            stale.unlink(missing_ok=True)  # every rank resumes; another may have removed it first
        values = state["config"]
        for text in overrides or []:
            values = merge(values, parse_override(text))
        return cls(from_dict(values), run_dir=run_dir, checkpoint=state)

    def _restore(self, state: dict) -> None:
        self.student.model.load_state_dict(state["model"], strict=True)
        self.strategy.load_state_dict(state["strategy"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.schedule.load_state_dict(state["schedule"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], dict(state["best"])
        self.run.resume(state["history"], state.get("records", {}))
        set_rng_state(state["rng"])

    def _checkpoint(self, history: list[dict]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "adakd_version": adakd.__version__,
            "epoch": self.epoch,
            "step": self.step,
            # Under the CRD key name, so `load_weights` (and the CRD code) read the student directly.
            "model": self.student.model.state_dict(),
            "strategy": self.strategy.state_dict(),
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedule": self.schedule.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "rng": rng_state(),
            "best": dict(self.best),
            "history": history,
            "records": self.run.records,
            "config": to_dict(self.config),
        }

    def say(self, text: str, warning: bool = False) -> None:
        """Print a line (with log.progress, or always for a warning) and append it to the run's log.txt."""
        if not self.dist.is_main:
            return
        if warning:
            text = f"adakd: warning: {text}"
            print(text, file=sys.stderr, flush=True)
        elif self.config.log.progress:
            print(text, flush=True)
        self.run.log_line(text)

    def schedule_text(self) -> str:
        """The lr per epoch range, e.g. 'lr 0.05 (epochs 1-150), 0.005 (151-180), ...'."""
        spans: list[list[Any]] = []
        for epoch in range(1, self.epochs + 1):
            value = lr_at(self.config.optim, epoch, self.lr)
            if spans and spans[-1][0] == value:
                spans[-1][2] = epoch
            else:
                spans.append([value, epoch, epoch])
        parts = [f"{v:.4g} ({'epoch' if a == b else 'epochs'} {a}{'' if a == b else f'-{b}'})" for v, a, b in spans]
        milestones = ", ".join(map(str, self.config.optim.milestones)) or "none"
        return (f"lr schedule over {self.epochs} epochs: {', '.join(parts)} (optim.milestones {milestones}, "
                "scaled with optim.epochs unless given)")

    def evaluate_teacher(self) -> dict[str, float]:
        """The teacher's test accuracy, printed and saved; a loud warning when it scores near chance."""
        result = evaluate(self.teacher.model, self.test_loader, self.precision)
        chance = 100.0 / self.train_set.num_classes
        result["chance"] = chance
        self.say(f"teacher {self.config.teacher.name} on the {self.config.data.name} test split: top-1 "
                 f"{result['acc1']:.2f}%{top5_text(result.get('acc5'))}  (chance {chance:.2f}%)")
        if self.teacher_is_trained and result["acc1"] < 2 * chance:
            self.say(f"the teacher scores {result['acc1']:.2f}% top-1, near chance ({chance:.2f}%): it will teach "
                     "little. Check teacher.weights and teacher.name, and that data.name and data.image_size are "
                     "those the teacher was trained on", warning=True)
        self.run.write_json("teacher", result)
        return result

    def fit(self) -> dict[str, Any]:
        """Train until optim.epochs; checkpoint every epoch; return the last/best summary."""
        cfg = self.config
        progress = cfg.log.progress and self.dist.is_main
        self._fastest: tuple[int, float] | None = None  # (epoch, images/s) of the fastest epoch of this call
        self._warned_slow = False
        try:
            if self.epoch == 0:
                self.say(f"run {self.run.path}: {cfg.task} {cfg.model.name}"
                         + (f" under {cfg.teacher.name} ({cfg.distill.method}, {cfg.strategy.name})"
                            if cfg.task == "distill" else "") + f" on {cfg.data.name}, seed {cfg.seed}")
                for text in self.setup_notes:  # decisions taken while building the run, e.g. stages paired by size
                    self.say(text)
                if self.teacher is not None:
                    self.evaluate_teacher()
            else:
                self.say(f"run {self.run.path}: resumed after epoch {self.epoch}")
            self.say(self.schedule_text())
            for text, warning in self.strategy.start_notices():  # e.g. how a search stage was sized
                self.say(text, warning=warning)
            if self.epoch == 0 and self.distiller is not None and self.distiller.pretrain_epochs > 0:
                self._pretrain(progress)
            self.run.log_line(f"threads {self.threads} ({self.threads_source}), data.num_workers "
                              f"{self.runtime['data.num_workers']}")
            started, first_epoch = time.perf_counter(), self.epoch
            while self.epoch < self.epochs and not self.strategy.should_stop():
                epoch_start = time.perf_counter()
                epoch = self.epoch + 1
                lr = self.schedule.start_epoch(epoch)
                self.strategy.begin_epoch(epoch)  # per-epoch schedules of the strategy's components
                self.train_loader.set_epoch(epoch)
                row: dict[str, Any] = {"epoch": epoch, "lr": lr}
                for name, optimizer in self.optimizers.items():
                    if name != "main":
                        row[f"lr/{name}"] = optimizer.param_groups[0]["lr"]
                row.update(train_one_epoch(self.strategy, self.train_loader, epoch, cfg.log.interval, progress,
                                           first_step=self.step))
                self.step += len(self.train_loader)
                # The last epoch is always scored: it is the number a run reports.
                scored = epoch % cfg.log.eval_every == 0 or epoch == self.epochs or self.strategy.should_stop()
                test = evaluate(self.student.model, self.test_loader, self.precision) if scored else {}
                row.update({f"test/{k}": v for k, v in test.items()})
                if scored:
                    row.update({f"test/{k}": v for k, v in self.strategy.evaluate(self.test_loader).items()})
                self.epoch = epoch
                row["time/epoch_s"] = time.perf_counter() - epoch_start
                if scored and test["acc1"] > self.best["acc1"]:
                    self.best = {"acc1": test["acc1"], "acc5": test.get("acc5"), "epoch": epoch}
                self.run.log_epoch(row)
                for name, rows in self.strategy.drain_records().items():
                    self.run.add_records(name, rows)
                for name, value in self.strategy.artifacts().items():
                    self.run.write_json(name, value)
                if self.dist.is_main:
                    state = self._checkpoint(self.run.rows)
                    # best before last: last.pth is the commit point, so a kill between the two saves redoes the
                    # epoch on resume (rewriting best.pth) instead of leaving a best.pth older than last.pth's record.
                    if self.best["epoch"] == epoch:
                        save_atomic(state, self.run.best_checkpoint)
                    save_atomic(state, self.run.last_checkpoint)
                    self.saved_epoch = epoch
                    per_epoch = (time.perf_counter() - started) / (epoch - first_epoch)
                    eta = datetime.timedelta(seconds=round(per_epoch * (self.epochs - epoch)))
                    scores = (f"test top-1 {test['acc1']:.2f}%{top5_text(test.get('acc5'))}" if scored
                              else "not scored")
                    self.say(f"epoch {epoch}/{self.epochs}  loss {row['train/loss']:.4f}  "
                             f"train {row['train/acc1']:.2f}%  {scores}  ({row['train/images_per_s']:.0f} img/s, "
                             f"{row['time/epoch_s']:.1f} s/epoch, run ETA {eta})")
                self._watch_throughput(epoch, row)
                distributed.barrier()
            summary = self.summary()
            self.run.write_summary(summary)
            if self.run.rows:
                self.say(f"done: last epoch ({summary['epochs']}) top-1 {summary['last_acc1']:.2f}%, best epoch "
                         f"({summary['best_epoch']}) top-1 {summary['best_acc1']:.2f}%")
            return summary
        except (OSError, RuntimeError) as err:
            if disk_full(err) is None:
                raise
            raise self._disk_full() from None
        finally:
            self.run.close()

    def _disk_full(self) -> DiskFullError:
        """The one-line error of a full disk, naming what is kept; a run with no checkpoint yet is removed, so the
        same command can start it again once there is space."""
        problem = f"no space left on device while writing run {str(self.run.path)!r}"
        command = f"adakd {self.config.task} --resume {self.run.path}"
        if self.saved_epoch:
            return DiskFullError(problem, f"last.pth of epoch {self.saved_epoch} is kept", command)
        if self.run.enabled and self.run.path.is_dir():
            try:
                clear_unfinished(self.run.path)
            except (OSError, RunDirError):
                return DiskFullError(problem, f"nothing was checkpointed yet; delete {str(self.run.path)!r}", None)
        return DiskFullError(problem, "nothing was checkpointed yet, so the run folder was removed", None)

    def _watch_throughput(self, epoch: int, row: dict[str, Any]) -> None:
        """Warn once when an epoch of a second or more trains over 3x slower than the fastest so far: on CPU, other
        processes are then usually competing for this run's threads, which slows every thread of it down."""
        speed = row.get("train/images_per_s")
        if not speed or self.dist.device.type != "cpu" or self.threads == 1:  # one thread: none to give up
            return
        best = self._fastest
        if best is None or speed > best[1]:
            self._fastest = (epoch, speed)
        elif speed * 3 < best[1] and row["time/epoch_s"] >= 1.0 and not self._warned_slow:  # short epochs: noise
            self._warned_slow = True
            fewer = max(1, self.threads // 2)
            self.say(f"epoch {epoch} trained at {speed:.0f} img/s, {best[1] / speed:.1f}x slower than epoch {best[0]} "
                     f"({best[1]:.0f} img/s): other processes are probably using the cores of this run's "
                     f"threads={self.threads}. Stop it (Ctrl-C) and continue with fewer, e.g. `adakd "
                     f"{self.config.task} --resume {self.run.path} threads={fewer}`, or free the cores", warning=True)

    def _pretrain(self, progress: bool) -> None:
        """The distiller's own pre-training stage, on a loader with its own seed stream."""
        loader = self.with_copies(datasets.make_loader(
            self.train_set, self.batch, train=True, device=self.dist.device, seed=(self.config.seed + 32768) % 65536,
            rank=self.dist.rank, world_size=self.dist.world_size, num_workers=self.config.data.num_workers))
        history = pretrain(self.distiller, self.teacher, self.teacher_spots, loader, self.precision, progress,
                           student=self.student, student_spots=self.built.student_spots, run_lr=self.lr)
        if self.dist.is_main:
            self.run.write_pretrain(history)
            if progress:
                print(f"pre-training of {self.config.distill.method}: loss {history[0]:.4f} -> {history[-1]:.4f} "
                      f"over {len(history)} epochs", flush=True)

    def summary(self) -> dict[str, Any]:
        """Last-epoch and best-epoch test accuracy, labelled (the field mixes them up)."""
        last = self.run.rows[-1] if self.run.rows else {}
        return {
            "run_dir": str(self.run.path),
            "epochs": self.epoch,
            "last_acc1": last.get("test/acc1"),
            "last_acc5": last.get("test/acc5"),
            "best_acc1": self.best["acc1"],
            "best_acc5": self.best.get("acc5"),
            "best_epoch": self.best["epoch"],
            "params": sum(p.numel() for p in self.student.model.parameters()),
            **({"teacher_acc1": self.run.read_json("teacher", {}).get("acc1")} if self.teacher is not None else {}),
        }
