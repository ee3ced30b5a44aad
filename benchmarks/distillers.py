"""Images/s of the training step per distiller and per strategy, resnet56 -> resnet20, batch 64, 32x32 input.

    python benchmarks/distillers.py [--steps 10] [--batch 64] [--methods kd,at,...] [--device cpu]
    python benchmarks/distillers.py --strategies standard,sakd,sakd-faithful --methods at,crd

Without --strategies every method runs under the standard strategy and is reported as a ratio to plain KD, timed in
the same process (KD is timed first and last; the reported KD figure is their mean, and their spread says how steady
the machine was). With --strategies each method runs under each strategy and is reported as a ratio to the standard
step of the same method. Synchronises only at the measurement boundaries.
"""
from __future__ import annotations

import argparse
import time

import torch

import adakd.distillers as D
import adakd.models as M
from adakd.engine.config import OptimConfig
from adakd.engine.optim import build_optimizers
from adakd.strategies import LossWeights, Precision, get


def step_seconds(method: str, args, device: torch.device, strategy_name: str = "standard") -> float:
    """Mean wall time of one training step (every forward, backward and optimiser step) after warm-up."""
    torch.manual_seed(0)
    student = M.staged(M.create("resnet20", num_classes=100)).to(device)
    teacher = M.frozen(M.create("resnet56", num_classes=100)).to(device)
    num_data = 50_000  # CIFAR-100's training set: CRD's memory banks at their real size
    context = D.DistillContext(num_classes=100, train_targets=torch.arange(num_data) % 100)
    distiller, s_spots, t_spots = D.create(method, student, teacher, (3, 32, 32), context=context)
    distiller.to(device)
    for param in distiller.pretrain_parameters():
        param.requires_grad_(False)
    defaults = type(distiller).defaults
    weights = LossWeights(ce=defaults.ce_weight, method=defaults.method_weight,
                          kl=0.0 if strategy_name == "standard" else 1.0)  # SAKD runs add the KL term
    strategy = get(strategy_name)(student, teacher, distiller, weights, s_spots, t_spots)
    optimizers = build_optimizers(strategy.param_groups(), OptimConfig(), 0.05)
    strategy.attach(optimizers, Precision(device, False), total_steps=1000)
    strategy.train(True)
    images = torch.randn(args.batch, 3, 32, 32, device=device)
    targets = torch.randint(0, 100, (args.batch,), device=device)
    indices = torch.randint(0, num_data, (args.batch,), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for step in range(args.warmup):
        strategy.training_step(images, targets, indices, 30, step)
    sync()
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        strategy.training_step(images, targets, indices, 30, step)
    sync()
    return (time.perf_counter() - start) / args.steps


def main() -> None:
    """Time every method and print images/s and the cost ratio to KD."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", default=",".join(D.available()))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strategies", default=None, help="compare strategies, e.g. standard,sakd,sakd-faithful")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_flush_denormal(True)  # as the engine does
    if args.strategies:
        compare_strategies(args, device)
        return
    methods = [m for m in args.methods.split(",") if m != "kd"]
    kd_first = step_seconds("kd", args, device)
    results = {m: step_seconds(m, args, device) for m in methods}
    kd_last = step_seconds("kd", args, device)
    kd = (kd_first + kd_last) / 2
    print(f"standard step, resnet56 -> resnet20, batch {args.batch}, {device}, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'method':<10}{'ms/step':>10}{'images/s':>10}{'x KD':>8}")
    print(f"{'kd':<10}{1000 * kd:>10.1f}{args.batch / kd:>10.0f}{1.0:>8.2f}   (first {1000 * kd_first:.1f}, "
          f"last {1000 * kd_last:.1f} ms)")
    for method, seconds in results.items():
        print(f"{method:<10}{1000 * seconds:>10.1f}{args.batch / seconds:>10.0f}{seconds / kd:>8.2f}")


def compare_strategies(args, device: torch.device) -> None:
    """Each method under each strategy; ratio to the standard step of the same method."""
    names = args.strategies.split(",")
    print(f"training step per strategy, resnet56 -> resnet20, batch {args.batch}, {device}, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'method':<10}{'strategy':<16}{'ms/step':>10}{'images/s':>10}{'x standard':>12}")
    for method in args.methods.split(","):
        base = step_seconds(method, args, device, "standard")
        for name in names:
            seconds = base if name == "standard" else step_seconds(method, args, device, name)
            print(f"{method:<10}{name:<16}{1000 * seconds:>10.1f}{args.batch / seconds:>10.0f}{seconds / base:>12.2f}")


if __name__ == "__main__":
    main()
