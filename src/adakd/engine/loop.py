"""The training loop: one epoch of strategy steps with on-device sums, and top-1/top-5 evaluation."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Iterable, Sized

import torch
from torch import nn
from tqdm.auto import tqdm

from adakd.modes import eval_mode
from adakd.numerics import at_least_float32, cross_entropy_upcast
from adakd.ranks import all_reduce_sum
from adakd.strategies.base import Precision, Strategy


TOP5 = 5  # the k of top-k accuracy, reported only with more classes than k
LABELLED = "_labelled"  # the epoch's count of images with a class (sorts before the terms; never reported)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def train_one_epoch(
    strategy: Strategy,
    loader: Iterable,
    epoch: int,
    log_interval: int = 50,
    progress: bool = True,
    first_step: int = 0,
) -> dict[str, float]:
    """Run every batch through `strategy.training_step`; return per-sample means of every term.

    Each batch is a micro-batch placed in its optimiser step first (`optim.accumulate`): the epoch's length tells
    the strategy where the last step ends, so accumulation needs a loader with a length.
    """
    if not isinstance(loader, Sized) and strategy.accumulate > 1:
        raise ValueError("gradient accumulation needs a training loader with a length (to step at the epoch's end)")
    count = len(loader) if isinstance(loader, Sized) else None
    strategy.train(True)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    for step, (images, targets, indices) in enumerate(bar, 1):
        strategy.begin_micro_batch(step - 1, count)
        with strategy.gradient_sync():
            out = strategy.training_step(images, targets, indices, epoch, first_step + step - 1)
        batch = targets.shape[0]
        for name, value in out.items():
            weighted = value if name == "correct" else value * batch
            sums[name] = sums[name] + weighted if name in sums else weighted.clone()
        # Accuracy counts labelled images only: rotated copies (adakd.rotations) carry no class.
        labelled = (targets >= 0).sum()
        sums[LABELLED] = sums[LABELLED] + labelled if LABELLED in sums else labelled.clone()
        seen += batch
        if step % log_interval == 0:
            # The only host sync inside the epoch, at the log cadence.
            loss = sums["loss"].item() / seen
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"loss became {loss} in epoch {epoch} at step {step}")
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{100 * sums['correct'].item() / sums[LABELLED].item():.1f}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}")
    bar.close()
    elapsed = time.perf_counter() - start
    names = sorted(sums)
    device = sums["loss"].device
    stacked = torch.stack([sums[n].double() for n in names] + [torch.tensor(float(seen), device=device).double()])
    totals = all_reduce_sum(stacked).tolist()
    count = totals[-1]
    totals = dict(zip(names, totals))
    labelled_count = totals.pop(LABELLED)
    result = {("train/acc1" if n == "correct" else f"train/{n}"): (100 * v / labelled_count if n == "correct"
                                                                  else v / count) for n, v in totals.items()}
    if not math.isfinite(result["train/loss"]):
        raise NonFiniteLossError(f"loss became {result['train/loss']} in epoch {epoch}")
    result["train/images_per_s"] = count / max(elapsed, 1e-9)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: Precision | None = None) -> dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy of a classifier over a loader.

    "acc5" is left out with 5 classes or fewer: there every sample is in its top 5, so 100 % would say nothing.
    """
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    num_classes = 0
    context = precision.autocast if precision is not None else contextlib.nullcontext
    with eval_mode(model):
        for images, targets, _ in loader:
            with context():
                logits = at_least_float32(model(images))
            num_classes = logits.shape[1]
            k = min(TOP5, num_classes)
            top = logits.topk(k, dim=1).indices
            hits = top == targets[:, None]
            sums += torch.stack([
                cross_entropy_upcast(logits, targets, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=device),
            ])
    loss, top1, top5, count = all_reduce_sum(sums).tolist()
    result = {"loss": loss / count, "acc1": 100 * top1 / count}
    if num_classes > TOP5:
        result["acc5"] = 100 * top5 / count
    return result


def top5_text(acc5: float | None) -> str:
    """The text '  top-5 NN.NN%' that follows a top-1, or '' where top-5 is not measured (5 classes or fewer)."""
    return "" if acc5 is None else f"  top-5 {acc5:.2f}%"
