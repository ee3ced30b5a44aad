"""Every CUDA path on one GPU: images/s, peak memory and host syncs of the KD, AT, CRD, SAKD and ABL steps.

    python benchmarks/gpu.py [--batches 64,128] [--steps 30] [--warmup 5] [--budget 420] [--sync-mode warn|error]
    python benchmarks/gpu.py --smoke    # seconds on CPU: that it runs (the tests run it); CUDA paths are skipped

resnet56 -> resnet20 on random CIFAR-sized batches already on the GPU (no loader), built like benchmarks/distillers.py
(a calibrated random teacher, CRD's memory banks at CIFAR-100's 50,000 rows, SAKD distilling every sample). Every
step runs in bf16 autocast (the engine's default on CUDA) eager and compiled (`compile=true`: the engine's own
`compile_networks`, CUDA graphs) at each batch size; at the first batch size each step also runs in float32, in
float16 with loss scaling (adakd's Precision with its GradScaler), in bf16 with channels_last, and in bf16 under
DDP with one NCCL rank. Host syncs are counted with torch.cuda.set_sync_debug_mode over the timed steps only. Cases
run one after the other (peak memory is per case); a case that would start after --budget seconds is skipped, so the
whole script stays under 8 minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import adakd.models as M
from adakd.engine.build import build_strategy
from adakd.engine.config import OptimConfig
from adakd.engine.distributed import DistInfo
from adakd.engine.optim import build_optimizers
from adakd.engine.trainer import compile_networks
from adakd.strategies import Precision

sys.path.insert(0, str(Path(__file__).parent))
from distillers import calibrated, cifar_run  # noqa: E402  (the sibling benchmark's helpers)

# Step name -> (distiller, strategy). ABL's step is stage 2's (the fused step at a fixed p; abl-fixed's p = 0.5).
STEPS = {"KD": ("kd", "standard"), "AT": ("at", "standard"), "CRD": ("crd", "standard"), "SAKD": ("at", "sakd"),
         "ABL": ("at", "abl-fixed")}
CIFAR_IMAGES, EPOCHS = 50_000, 240
GOAL_MINUTES = 30.0
COMPILE_MARGIN = 120.0  # seconds of --budget a compiled case needs left (inductor's compile of both networks)


@dataclass(frozen=True)
class Setup:
    """One way of running a step."""

    name: str
    precision: str = "bf16"  # fp32 | bf16 | fp16 (float16 autocast with loss scaling)
    channels_last: bool = False
    compile: bool = False
    ddp: bool = False


EAGER, COMPILED = Setup("bf16"), Setup("bf16+compile", compile=True)
EXTRA = [Setup("fp32", precision="fp32"), Setup("fp16+scaler", precision="fp16"),
         Setup("bf16+channels_last", channels_last=True), Setup("bf16+nccl-ddp", ddp=True)]


def precision_for(path: Setup, device: torch.device) -> Precision:
    """adakd's Precision for the path; fp16 is forced, as the engine picks it only where bf16 is missing."""
    precision = Precision(device, enabled=path.precision != "fp32")
    if path.precision == "fp16" and precision.enabled:
        precision.dtype = torch.float16
        precision.scaler = torch.amp.GradScaler("cuda", enabled=True)
    return precision


def build(step_name: str, batch: int, path: Setup, device: torch.device, teacher_state: dict, notes: list[str]):
    """A ready strategy on one fixed batch; returns a function running one training step."""
    method, strategy_name = STEPS[step_name]
    torch.manual_seed(0)
    memory_format = torch.channels_last if path.channels_last else torch.contiguous_format
    # As benchmarks/distillers.py: SAKD starts distilling every sample, the worst case for the step time.
    options = {"homo": True, "policy_bias_init": 10.0} if strategy_name == "sakd" else {}
    run = cifar_run(method, strategy_name, device, kl_weight=1.0 if strategy_name == "sakd" else 0.0,
                    options=options, channels_last=path.channels_last, parts=("student", "teacher", "distiller"))
    run.teacher.model.load_state_dict(teacher_state)
    student = run.student
    wrapped = student
    if path.ddp:  # one process in its own group: build_run wraps only a run of several processes
        wrapped = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index])
    strategy = build_strategy(run.config, run, wrapped, DistInfo(rank=0, world_size=1, local_rank=0, device=device))
    if path.compile:
        compile_networks(strategy, device, lambda text: notes.append(f"{step_name} {batch} {path.name}: {text}"))
    strategy.attach(build_optimizers(strategy.param_groups(), OptimConfig(), 0.05), precision_for(path, device),
                    total_steps=1000)
    strategy.train(True)
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, 100, (batch,), device=device)
    indices = torch.randint(0, CIFAR_IMAGES, (batch,), device=device)
    counter = iter(range(10**9))

    def step() -> None:
        strategy.training_step(images, targets, indices, 30, next(counter))

    return step


@contextlib.contextmanager
def counted_syncs(device: torch.device, mode: str):
    """Record the host-sync warnings (mode "warn") or fail at the first sync (mode "error") inside the block."""
    if device.type != "cuda":
        yield None
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode(0)


def sync_report(caught) -> tuple[int | None, list[str]]:
    """(number of host-sync warnings, their distinct source lines)."""
    if caught is None:
        return None, []
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return len(syncs), sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})


def adakd_frame(err: BaseException) -> str:
    """The innermost adakd source line of an exception's traceback (where a step synchronised or failed)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "adakd" in f.filename]
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


def measure(step_name: str, batch: int, path: Setup, device: torch.device, args, teacher_state: dict,
            notes: list[str]) -> dict:
    """Build, warm up and time one case; every number is about the timed steps only."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step = build(step_name, batch, path, device, teacher_state, notes)
    for _ in range(args.warmup):  # compiling and CUDA-graph recording happen here
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with counted_syncs(device, args.sync_mode) as caught:
        for _ in range(args.steps):
            step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    syncs, where = sync_report(caught)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"seconds": seconds, "peak": peak, "syncs": None if syncs is None else syncs / args.steps, "where": where}


def projected_minutes(batch: int, seconds: float) -> float:
    """240 epochs x ceil(50,000 / batch) steps x the step time, in minutes (training steps only)."""
    return EPOCHS * math.ceil(CIFAR_IMAGES / batch) * seconds / 60


@contextlib.contextmanager
def one_rank_group(device: torch.device):
    """torch.distributed with world size 1 over NCCL, rendezvous through a FileStore (nothing leaves the host)."""
    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(str(Path(folder) / "store"), 1)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def release(compiled: bool) -> None:
    """Free the last case's memory (and its compiled graphs and CUDA-graph pools) before the next one."""
    if compiled:
        import torch._dynamo as dynamo

        dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    """Run every case and print the table, the host-sync report and the 240-epoch goal."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,128")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, CUDA-graph capture)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which no new case starts (a compiled one: 120 s before)")
    parser.add_argument("--sync-mode", choices=("warn", "error"), default="warn",
                        help="warn: count host syncs; error: stop a case at its first sync and say where")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="batch 4, 2 steps per case on CPU: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.steps, args.warmup, args.device = "4", 1, 1, "cpu"
    started = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("CUDA is not available: run with --smoke (CPU) or on a GPU machine")
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.set_flush_denormal(True)  # as the engine does
    batches = [int(b) for b in args.batches.split(",")]
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"resnet56 -> resnet20, random 32x32 batches already on {device} ({where}), torch {torch.__version__}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per case; SAKD = sakd with AT, ABL = abl-fixed with AT")
    print(f"host syncs: torch.cuda.set_sync_debug_mode({args.sync_mode!r}) over the timed steps; projected "
          f"{EPOCHS}-epoch CIFAR-100 time = {EPOCHS} x ceil({CIFAR_IMAGES:,} / batch) x ms/step (training steps "
          "only: no data loading, no evaluation)")
    teacher_state = calibrated(M.create("resnet56", num_classes=100), min(64, batches[0])).state_dict()

    cases = [(s, b, EAGER if cuda else Setup("fp32", precision="fp32")) for b in batches for s in STEPS]
    cases += [(s, batches[0], COMPILED) for s in STEPS]
    cases += [(s, batches[0], p) for p in EXTRA for s in STEPS]
    cases += [(s, b, COMPILED) for b in batches[1:] for s in STEPS]
    cases = list(dict.fromkeys(cases))  # on CPU the main rows are already the fp32 ones
    print(f"{'step':<6}{'batch':>6}  {'path':<20}{'ms/step':>9}{'images/s':>10}{'peak MiB':>10}{'syncs/step':>12}"
          f"{'240 epochs':>13}")
    results: dict[tuple, dict] = {}
    notes: list[str] = []
    sync_lines: dict[str, list[str]] = {}
    group = contextlib.ExitStack()
    skipped: set[Setup] = set()
    for step_name, batch, path in cases:
        label = f"{step_name:<6}{batch:>6}  {path.name:<20}"
        needs_cuda = path.precision != "fp32" or path.channels_last or path.compile or path.ddp
        if needs_cuda and not cuda:
            if path not in skipped:  # one line per path, not per step
                print(f"{'all':<6}{batch:>6}  {path.name:<20}skipped: no CUDA", flush=True)
                skipped.add(path)
            continue
        # A compiled case may spend a minute or two compiling first, so it needs that much budget left.
        if time.perf_counter() - started > args.budget - (COMPILE_MARGIN if path.compile else 0):
            print(f"{label}skipped: time budget (--budget {args.budget:.0f} s)", flush=True)
            continue
        if path.ddp and not dist.is_initialized():
            group.enter_context(one_rank_group(device))
        elif not path.ddp and dist.is_initialized():
            group.close()  # the other cases run without a process group, as a single-GPU run does
        try:
            result = measure(step_name, batch, path, device, args, teacher_state, notes)
        except Exception as err:  # a path that fails is reported, and the others still run
            text = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"{label}failed: {type(err).__name__}{adakd_frame(err)}: {text[:150]}", flush=True)
            continue
        finally:
            release(path.compile)
        results[(step_name, batch, path.name)] = result
        syncs = "-" if result["syncs"] is None else f"{result['syncs']:.1f}"
        peak = "-" if result["peak"] is None else f"{result['peak']:.0f}"
        minutes = projected_minutes(batch, result["seconds"])
        print(f"{label}{1000 * result['seconds']:>9.2f}{batch / result['seconds']:>10.0f}{peak:>10}{syncs:>12}"
              f"{minutes:>9.1f} min", flush=True)
        if result["where"]:
            sync_lines[f"{step_name} {batch} {path.name}"] = result["where"]
    group.close()
    for case, lines in sync_lines.items():
        print(f"host syncs in {case}: {', '.join(lines)}")
    for note in notes:
        print(f"note: {note}")
    goal_ms = GOAL_MINUTES * 60 / (EPOCHS * math.ceil(CIFAR_IMAGES / 64)) * 1000
    kd = {name: r["seconds"] for (s, b, name), r in results.items() if s == "KD" and b == 64}
    if kd:
        name, seconds = min(kd.items(), key=lambda item: item[1])
        verdict = "met" if 1000 * seconds <= goal_ms else "not met"
        best = f"best KD at batch 64: {1000 * seconds:.2f} ms/step ({name}), {projected_minutes(64, seconds):.1f} min"
    else:
        verdict, best = "not measured", "no KD case at batch 64 ran"
    print(f"goal: a {EPOCHS}-epoch CIFAR-100 KD run under {GOAL_MINUTES:.0f} minutes, i.e. <= {goal_ms:.1f} ms a step "
          f"at batch 64; {best}: {verdict}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
