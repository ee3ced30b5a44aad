"""ABL's cost against the standard KD step, resnet56 -> resnet20, batch 64, 32x32, measured side by side.

    python benchmarks/abl.py [--methods kd,at,fitnets] [--steps 5] [--rounds 3] [--pipeline]
    python benchmarks/abl.py --smoke    # seconds: that it runs (the tests run it)

Per method: the standard step, the ABL step (stage 2 and warm start: §3 routing at fixed p) and the bilevel step
(stage 1: the ABL step plus virtual step, validation forward/backward and the gamma update), timed round-robin,
best round kept. The whole-pipeline ratio is then the spec's formula with these times: (N_warm x ABL + N_meta x
bilevel + N_stage2 x ABL) / (N_stage2 x KD) for the CIFAR-100 defaults. `--pipeline` also times the real
`adakd abl` against `adakd distill` (standard KD) end to end on the embedded digits.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

from adakd.engine.config import OptimConfig
from adakd.engine.optim import build_optimizers
from adakd.strategies import Precision

sys.path.insert(0, str(Path(__file__).parent))
from distillers import best_of, calibrated, cifar_run  # noqa: E402  (the sibling benchmark's helpers)

WARM, META, STAGE2 = 40_000, 10_000, 240 * 782  # specs/abl.md §10: CIFAR-100 iteration counts


def build_step(method: str, strategy_name: str, args, device: torch.device):
    """A ready strategy on a fixed batch; returns a function running one training step."""
    torch.manual_seed(0)
    options = {"warm_steps": 0, "meta_steps": 10**9} if strategy_name == "abl-search" else {}
    run = cifar_run(method, strategy_name, device, options=options)
    calibrated(run.teacher.model, args.batch)
    strategy = run.strategy
    strategy.attach(build_optimizers(strategy.param_groups(), OptimConfig(), 0.05), Precision(device, False), 1000)
    strategy.train(True)

    def batch():
        return (torch.randn(args.batch, 3, 32, 32, device=device),
                torch.randint(0, 100, (args.batch,), device=device),
                torch.randint(0, 50_000, (args.batch,), device=device))

    train_batch = batch()
    if strategy_name == "abl-search":
        strategy.attach_validation(itertools.repeat(batch()))
    counter = itertools.count()

    def step() -> None:
        strategy.training_step(*train_batch, 30, next(counter))

    return step


def time_pipeline(args) -> tuple[float, float]:
    """Wall seconds of `adakd abl` and of `adakd distill` (standard KD) on the digits, in fresh folders."""
    from adakd.cli import main

    with tempfile.TemporaryDirectory() as root:
        common = ["--preset", "demo", f"out_dir={root}", "log.progress=false", "log.tensorboard=false",
                  "data.image_size=16", "data.train_size=null", "model.name=resnet8", "optim.epochs=4",
                  "optim.milestones=[]"]
        assert main(["train", *common, "name=teacher", "model.name=resnet20"]) == 0
        teacher = ["teacher.name=resnet20", f"teacher.weights={root}/teacher/last.pth"]
        start = time.perf_counter()
        assert main(["distill", *common, *teacher, "name=kd"]) == 0
        kd = time.perf_counter() - start
        # Stage 1 sized like the spec's CIFAR ratio: warm + meta = (40k + 10k) / 187.7k of stage 2's iterations.
        steps = 4 * 45  # stage 2: 4 epochs of 1,437 / 32 batches
        warm, meta = round(steps * WARM / STAGE2), round(steps * META / STAGE2)
        start = time.perf_counter()
        assert main(["abl", *common, *teacher, "name=abl", f"strategy.args.warm_steps={warm}",
                     f"strategy.args.meta_steps={meta}"]) == 0
        return time.perf_counter() - start, kd


def main() -> None:
    """Time standard, ABL and bilevel steps per method and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="kd,at,fitnets")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pipeline", action="store_true", help="also time `adakd abl` end to end on the digits")
    parser.add_argument("--smoke", action="store_true", help="KD only, batch 4, 2 steps on CPU: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds, args.warmup, args.batch, args.methods, args.device = 1, 1, 1, 4, "kd", "cpu"
    device = torch.device(args.device)
    torch.set_flush_denormal(True)
    print(f"resnet56 -> resnet20, batch {args.batch}, {device}, {torch.get_num_threads()} threads; best of "
          f"{args.rounds} round-robin rounds of {args.steps} steps")
    names = ("standard", "abl-fixed", "abl-search")
    steps = {(m, n): build_step(m, n, args, device) for m in args.methods.split(",") for n in names}
    best = best_of(steps, args, device)
    print(f"{'method':<10}{'KD ms':>8}{'ABL ms':>9}{'x KD':>7}{'bilevel ms':>12}{'x KD':>7}{'pipeline x KD':>15}")
    for method in args.methods.split(","):
        kd, abl, bilevel = (best[(method, n)] for n in names)
        pipeline = (WARM * abl + META * bilevel + STAGE2 * abl) / (STAGE2 * kd)
        print(f"{method:<10}{1000 * kd:>8.1f}{1000 * abl:>9.1f}{abl / kd:>7.2f}{1000 * bilevel:>12.1f}"
              f"{bilevel / kd:>7.2f}{pipeline:>15.2f}")
    print("targets: ABL step <= 1.3x, bilevel step <= 2.5x the standard step")
    if args.pipeline:
        abl_s, kd_s = time_pipeline(args)
        print(f"digits, resnet20 -> resnet8, 4 epochs: adakd abl {abl_s:.1f} s, adakd distill (KD) {kd_s:.1f} s, "
              f"ratio {abl_s / kd_s:.2f}")


if __name__ == "__main__":
    main()
