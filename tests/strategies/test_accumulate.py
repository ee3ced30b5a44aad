"""Issue 20: gradient accumulation (`optim.accumulate=N`) in the one optimiser step, Strategy.optimizer_step.

For the standard, SAKD and ABL steps (abl-fixed's assigned gradients and abl-global's ordinary backward):
accumulate=2 over micro-batches of 32 gives the weights of accumulate=1 over batches of 64, within float32 noise, and
an epoch's odd last micro-batch steps alone. BatchNorm normalises each micro-batch with its own statistics, so these
comparisons put every BatchNorm layer (student, distiller parts, SAKD's policy and adapters, ABL's heads) in eval
mode: running statistics, the same for a batch of 64 and its two halves. SAKD runs with a constant Gumbel
temperature, as its schedule is per micro-batch (a run of 3 micro-batches and one of 2 batches anneal differently).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from adakd import distillers, models, strategies
from adakd.distillers.base import DistillContext
from adakd.engine.config import ConfigError, OptimConfig, RunConfig, validate
from adakd.engine.loop import train_one_epoch
from adakd.engine.optim import build_optimizers
from adakd.strategies.base import LossWeights, MicroBatch, Precision, micro_batch_at
from step_rig import build_strategy

SIZE = 16
CLASSES = 10
MICRO = 32
SAMPLES = 3 * MICRO  # two full micro-batches and an odd last one
CASES = {
    "standard": ("kd", {}),
    "sakd": ("at", {"input_size": SIZE, "gumbel_tau_schedule": "constant"}),
    "abl-fixed": ("kd", {"input_size": SIZE}),
    "abl-global": ("kd", {"input_size": SIZE}),
}


def build(name: str, accumulate: int, clip: float | None = None):
    method, options = CASES[name]
    return build_strategy(name, method, options, samples=SAMPLES, clip_grad_norm=clip, accumulate=accumulate)


def freeze_batch_norm(strategy) -> None:
    """Every BatchNorm the strategy holds in eval mode, after each `train(True)` the loop makes."""
    train = strategy.train

    def train_then_freeze(mode: bool = True) -> None:
        train(mode)
        for value in vars(strategy).values():
            if isinstance(value, nn.Module):
                for module in value.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()

    strategy.train = train_then_freeze


def data(batch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The same SAMPLES samples in order, cut into batches of `batch`."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(SAMPLES, 3, SIZE, SIZE, generator=generator)
    indices = torch.randperm(SAMPLES, generator=generator)
    return [(images[i:i + batch], indices[i:i + batch] % CLASSES, indices[i:i + batch])
            for i in range(0, SAMPLES, batch)]


def trained_tensors(strategy) -> list[torch.Tensor]:
    """Every parameter any optimiser steps, and the student's buffers."""
    params = [p for opt in strategy.optimizers.values() for g in opt.param_groups for p in g["params"]]
    return [t.detach() for t in params] + list(strategy.student.buffers())


def run_epoch(strategy, loader) -> dict[str, float]:
    torch.manual_seed(100)  # SAKD's Gumbel noise: the same draws for a batch of 64 as for its two halves
    return train_one_epoch(strategy, loader, epoch=1, progress=False)


def count_steps(strategy) -> dict[str, int]:
    """Wrap each optimiser's step with a counter."""
    counts = {name: 0 for name in strategy.optimizers}
    for name, optimizer in strategy.optimizers.items():
        step = optimizer.step

        def counted(*args, _name=name, _step=step, **kwargs):
            counts[_name] += 1
            return _step(*args, **kwargs)

        optimizer.step = counted
    return counts


@pytest.mark.parametrize("name", list(CASES))
def test_two_micro_batches_of_32_equal_one_batch_of_64(name: str) -> None:
    """[32, 32, 32] with accumulate=2 steps as [64, 32] with accumulate=1 (BatchNorm in eval mode, see above)."""
    whole, accumulated, plain = build(name, 1), build(name, 2), build(name, 1)
    for strategy in (whole, accumulated, plain):
        freeze_batch_norm(strategy)
    before = [t.clone() for t in trained_tensors(whole)]
    run_epoch(whole, data(2 * MICRO))
    run_epoch(accumulated, data(MICRO))
    run_epoch(plain, data(MICRO))
    for a, b in zip(trained_tensors(accumulated), trained_tensors(whole)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The comparison has teeth: the weights moved, and three steps of 32 end elsewhere.
    assert any(not torch.equal(a, b) for a, b in zip(trained_tensors(whole), before))
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(trained_tensors(plain), trained_tensors(whole)))


@pytest.mark.parametrize("name", ["standard", "sakd", "abl-fixed"])
def test_a_step_every_n_micro_batches_and_at_the_epoch_end(name: str) -> None:
    strategy = build(name, 3)
    counts = count_steps(strategy)
    loader = data(16)  # 6 micro-batches per epoch
    loader = loader + loader[:1]  # 7: steps after the 3rd, the 6th and the 7th (the epoch's end)
    run_epoch(strategy, loader)
    assert set(counts.values()) == {3}
    run_epoch(strategy, loader)
    assert set(counts.values()) == {6}
    # The epoch ended on a step: nothing is carried into a checkpoint or the next epoch (zeroed at its first batch).
    assert strategy.micro_batch.last


def test_placement_of_micro_batches() -> None:
    places = [micro_batch_at(i, 5, 2) for i in range(5)]
    assert places == [MicroBatch(True, False, 2), MicroBatch(False, True, 2), MicroBatch(True, False, 2),
                      MicroBatch(False, True, 2), MicroBatch(True, True, 1)]
    assert all(micro_batch_at(i, 5, 1) == MicroBatch() for i in range(5))
    assert micro_batch_at(4, None, 3) == MicroBatch(False, False, 3)  # an unknown length: every 3rd steps
    with pytest.raises(ValueError, match="accumulate must be >= 1"):
        micro_batch_at(0, 5, 0)


@pytest.mark.parametrize("name", list(CASES))
def test_accumulate_1_is_the_plain_step_bitwise(name: str) -> None:
    """Through the loop with accumulate=1 = training_step called alone (the step before accumulation existed)."""
    looped, alone = build(name, 1), build(name, 1)
    run_epoch(looped, data(MICRO))
    torch.manual_seed(100)
    alone.train(True)
    for step, (images, targets, indices) in enumerate(data(MICRO)):
        assert alone.micro_batch == MicroBatch()
        alone.training_step(images, targets, indices, 1, step)
    for a, b in zip(trained_tensors(looped), trained_tensors(alone)):
        assert torch.equal(a, b)


def test_accumulation_keeps_the_loss_scale_within_a_step() -> None:
    """Under float16-style loss scaling the scale moves only at a step, and the update is the unscaled run's."""
    scaled, unscaled = build("standard", 2), build("standard", 2)
    scaled.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    updates = []
    update = scaled.precision.scaler.update
    scaled.precision.scaler.update = lambda *a, **k: (updates.append(1), update(*a, **k))
    run_epoch(scaled, data(MICRO)), run_epoch(unscaled, data(MICRO))
    assert len(updates) == 2  # [32, 32] then [32]
    for a, b in zip(trained_tensors(scaled), trained_tensors(unscaled)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_abl_search_refuses_accumulation() -> None:
    torch.manual_seed(0)
    student = models.staged(models.create("resnet8", num_classes=CLASSES))
    teacher = models.frozen(models.create("resnet14", num_classes=CLASSES))
    context = DistillContext(num_classes=CLASSES, train_targets=torch.arange(SAMPLES) % CLASSES)
    distiller, s_spots, t_spots = distillers.create("kd", student, teacher, (3, SIZE, SIZE), context=context)
    strategy = strategies.get("abl-search")(student, teacher, distiller, LossWeights(), s_spots, t_spots,
                                            input_size=SIZE)
    optimizers = build_optimizers(strategy.param_groups(), OptimConfig(), 0.05)
    with pytest.raises(ValueError, match="does not support gradient accumulation"):
        strategy.attach(optimizers, Precision(torch.device("cpu"), False), accumulate=2)


def test_config_checks_accumulate() -> None:
    assert OptimConfig().accumulate == 1
    base = RunConfig()
    for bad in (0, -1):
        config = dataclasses.replace(base, optim=dataclasses.replace(base.optim, accumulate=bad))
        with pytest.raises(ConfigError, match="optim.accumulate must be >= 1"):
            validate(config)


def test_a_run_steps_every_n_micro_batches(tmp_path) -> None:
    """The trainer hands optim.accumulate to the strategy: 3 micro-batches of 32 at accumulate=2 are 2 steps."""
    from adakd.engine.config import resolve
    from adakd.engine.trainer import Trainer
    from tiny_run import TINY_RUN

    config = resolve(["cifar100", "demo"], overrides=[f"out_dir={tmp_path}", "name=run", *TINY_RUN,
                                                      "data.train_size=96", "optim.accumulate=2"])
    trainer = Trainer(config)
    assert trainer.strategy.accumulate == 2 and len(trainer.train_loader) == 3
    counts = count_steps(trainer.strategy)
    trainer.fit()
    assert counts == {"main": 2}
