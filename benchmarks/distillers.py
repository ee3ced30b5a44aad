"""Images/s of the training step per distiller and per strategy, resnet56 -> resnet20, batch 64, 32x32 input.

    python benchmarks/distillers.py [--steps 10] [--batch 64] [--methods kd,at,...] [--device cpu]
    python benchmarks/distillers.py --strategies standard,sakd,sakd-faithful --methods at,crd
    python benchmarks/distillers.py --methods kd,kd+ls,kd+ctkd,kd+dot   # +COMPONENT adds one, +ls standardises
    python benchmarks/distillers.py --smoke    # seconds: that it runs (the tests run it)

Without --strategies every method runs under the standard strategy and is reported as a ratio to plain KD; with
--strategies each method runs under each strategy and is reported as a ratio to the standard step of the same
method. Every case is built first, then timed round-robin and the best round kept, so a drift of the machine's
speed hits all cases alike. Synchronises only at the measurement boundaries.
"""
from __future__ import annotations

import argparse
import time

import torch

import adakd.distillers as D
from adakd.engine.build import PARTS, Run, build_run
from adakd.engine.config import OptimConfig, from_dict
from adakd.engine.distributed import DistInfo
from adakd.engine.optim import build_optimizers
from adakd.rotations import rotate_copies
from adakd.strategies import Precision, get

CIFAR_IMAGES = 50_000  # CIFAR-100's training set: CRD's memory banks at their real size


def calibrated(model: torch.nn.Module, batch: int, passes: int = 8) -> torch.nn.Module:
    """Give a random network BatchNorm statistics of its own activations, as a trained teacher has.

    A freshly initialised network in eval mode normalises with mean 0 / variance 1, so its activations grow through
    every block; an adaptive policy fed such pooled features saturates at once and the timing would not be typical.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None  # cumulative average over the calibration passes
    model.train()
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(batch, 3, 32, 32, device=device))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def split_case(case: str) -> tuple[str, dict, dict]:
    """'kd+ctkd+dot' as the distiller 'kd', the components {ctkd: true, dot: true} and its args; '+ls' is logit
    standardisation (distill.args.standardize), a switch of the method rather than a component."""
    method, *extras = case.split("+")
    args = {"standardize": True} if "ls" in extras else {}
    return method, {name: True for name in extras if name != "ls"}, args


def cifar_run(method: str, strategy_name: str, device: torch.device, kl_weight: float = 0.0,
              options: dict | None = None, channels_last: bool = False, parts=PARTS) -> Run:
    """resnet56 -> resnet20 on CIFAR-100-sized data (no images read), built by training's own builder with no
    start weights (the benchmarks give the teacher its own); `method` may add components ('kd+ctkd')."""
    method, components, method_args = split_case(method)
    # The config's batch stays the recipe's 64 whatever batch is timed: it only sizes ABL's search (to the paper's).
    config = from_dict({"task": "distill", "channels_last": channels_last, "model": {"name": "resnet20"},
                        "teacher": {"name": "resnet56"}, "data": {"name": "cifar100"},
                        "distill": {"method": method, "kl_weight": kl_weight, "args": method_args},
                        "strategy": {"name": strategy_name, "args": dict(options or {})},
                        "components": components})
    return build_run(config, [p for p in parts if p not in ("train", "test")], start_weights=(),
                     dist=DistInfo(rank=0, world_size=1, local_rank=0, device=device), num_classes=100,
                     input_shape=(3, 32, 32), train_targets=torch.arange(CIFAR_IMAGES) % 100)


def build_step(method: str, args, device: torch.device, strategy_name: str = "standard"):
    """A ready strategy and a fixed batch; returns a function that runs one training step."""
    torch.manual_seed(0)
    # With a random teacher an adaptive policy soon stops distilling, which would hide the cost of the masked
    # losses: start it distilling every sample (bias +10 on the distil logits), the worst case for the step time.
    fields = getattr(getattr(get(strategy_name), "option_class", None), "__dataclass_fields__", {})
    options = {"homo": True, "policy_bias_init": 10.0} if "homo" in fields else {}
    run = cifar_run(method, strategy_name, device, options=options,
                    kl_weight=0.0 if strategy_name == "standard" else 1.0)  # SAKD runs add the KL term
    calibrated(run.teacher.model, args.batch)
    strategy = run.strategy
    num_data = CIFAR_IMAGES
    optimizers = build_optimizers(strategy.param_groups(), OptimConfig(), 0.05)
    strategy.attach(optimizers, Precision(device, False), total_steps=1000)
    strategy.train(True)
    images = torch.randn(args.batch, 3, 32, 32, device=device)
    targets = torch.randint(0, 100, (args.batch,), device=device)
    indices = torch.randint(0, num_data, (args.batch,), device=device)
    if run.distiller is not None and run.distiller.rotated_copies:
        # SSKD's step sees the batch with its rotated copies, as the engine's loader gives it: 4x the images,
        # still counted as `args.batch` images a step (the copies are part of the method's cost).
        images, targets, indices = rotate_copies(images, targets, indices)
    counter = iter(range(10**9))
    shares: list[float] = []

    def step() -> None:
        out = strategy.training_step(images, targets, indices, 30, next(counter))
        spot_shares = [v for k, v in out.items() if "/share/" in k]
        if spot_shares:
            shares.append(float(torch.stack(spot_shares).mean()))  # one host sync per step, for every case alike

    step.shares = shares
    return step


def time_steps(step, args, device: torch.device) -> float:
    """Mean wall time of `args.steps` steps."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return (time.perf_counter() - start) / args.steps


def best_of(steps: dict, args, device: torch.device) -> dict:
    """Best of `args.rounds` round-robin timings per step function, so slow drift hits every case alike."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    best = {key: float("inf") for key in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():
            best[key] = min(best[key], time_steps(step, args, device))
    return best


def measure(cases: dict, args, device: torch.device) -> dict:
    """Build every case, then time them with `best_of`."""
    steps = {key: build_step(key[0], args, device, key[1]) for key in cases}
    best = best_of(steps, args, device)
    measure.shares = {key: (sum(s.shares) / len(s.shares) if s.shares else 1.0) for key, s in steps.items()}
    return best


def main() -> None:
    """Time every method and print images/s and the cost ratio to KD."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds; the best round counts")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", default=",".join(D.available()))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strategies", default=None, help="compare strategies, e.g. standard,sakd,sakd-faithful")
    parser.add_argument("--smoke", action="store_true", help="KD only, batch 4, 2 steps on CPU: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds, args.warmup, args.batch, args.methods, args.device = 1, 1, 1, 4, "kd", "cpu"
    device = torch.device(args.device)
    torch.set_flush_denormal(True)  # as the engine does
    print(f"resnet56 -> resnet20, batch {args.batch}, {device}, {torch.get_num_threads()} threads; best of "
          f"{args.rounds} round-robin rounds of {args.steps} steps after {args.warmup} warm-up steps")
    if args.strategies:
        compare_strategies(args, device)
        return
    methods = list(dict.fromkeys(["kd", *args.methods.split(",")]))
    best = measure({(m, "standard"): None for m in methods}, args, device)
    kd = best[("kd", "standard")]
    print(f"{'method':<14}{'ms/step':>10}{'images/s':>10}{'x KD':>8}   (standard strategy)")
    for (method, _), seconds in best.items():
        print(f"{method:<14}{1000 * seconds:>10.1f}{args.batch / seconds:>10.0f}{seconds / kd:>8.2f}")


def compare_strategies(args, device: torch.device) -> None:
    """Each method under each strategy; ratio to the standard step of the same method."""
    names = list(dict.fromkeys(["standard", *args.strategies.split(",")]))
    best = measure({(m, n): None for m in args.methods.split(",") for n in names}, args, device)
    # A relational loss (CRD, SP, ...) costs what its selected sub-batch costs, so the share distilled is printed:
    # with this random teacher the policy soon stops distilling, which makes those methods look cheap.
    print(f"{'method':<14}{'strategy':<16}{'ms/step':>10}{'images/s':>10}{'x standard':>12}{'share':>8}")
    for (method, name), seconds in best.items():
        base = best[(method, "standard")]
        share = measure.shares[(method, name)]
        print(f"{method:<14}{name:<16}{1000 * seconds:>10.1f}{args.batch / seconds:>10.0f}{seconds / base:>12.2f}"
              f"{share:>8.2f}")


if __name__ == "__main__":
    main()
