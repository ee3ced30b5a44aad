"""Images/s of the standard training step per distiller, resnet56 -> resnet20, batch 64, CIFAR-sized input.

    python benchmarks/distillers.py [--steps 10] [--batch 64] [--methods kd,at,...] [--device cpu]

Every method is timed in the same process as plain KD and reported as a ratio to it (KD is timed first and last;
the reported KD figure is their mean, and their spread says how steady the machine was). Synchronises only at the
measurement boundaries.
"""
from __future__ import annotations

import argparse
import time

import torch

import adakd.distillers as D
import adakd.models as M
from adakd.strategies import LossWeights, Precision, get


def step_seconds(method: str, args, device: torch.device) -> float:
    """Mean wall time of one standard-strategy step (forward, backward, SGD) after warm-up."""
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
    weights = LossWeights(ce=defaults.ce_weight, method=defaults.method_weight)
    strategy = get("standard")(student, teacher, distiller, weights, s_spots, t_spots)
    groups = strategy.param_groups()
    strategy.attach({"main": torch.optim.SGD(groups["main"], lr=0.01, momentum=0.9)}, Precision(device, False))
    strategy.train(True)
    images = torch.randn(args.batch, 3, 32, 32, device=device)
    targets = torch.randint(0, 100, (args.batch,), device=device)
    indices = torch.randint(0, num_data, (args.batch,), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        strategy.training_step(images, targets, indices, epoch=30)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        strategy.training_step(images, targets, indices, epoch=30)
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
    args = parser.parse_args()
    device = torch.device(args.device)
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


if __name__ == "__main__":
    main()
