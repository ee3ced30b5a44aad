"""Issue 20: one optimiser-step tail (Strategy.optimizer_step) with gradient clipping (`optim.clip_grad_norm`).

For the standard, SAKD and ABL steps: a bound far above any gradient norm changes nothing, bit for bit; a small bound
gives the update of an independent reference, torch.nn.utils.clip_grad_norm_ applied to the gradients right before
each optimiser's own step. Under float16-style loss scaling (a CPU GradScaler stands in for CUDA's) the clip acts
on unscaled gradients, and a step with an inf gradient is skipped as without clipping.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from adakd.engine.config import ConfigError, OptimConfig, RunConfig, validate
from step_rig import build_strategy, random_batch

SIZE = 16
CLASSES = 10
BATCH = 8
STEPS = 2
SMALL = 1e-2  # far below these nets' gradient norms at initialisation, so every step is clipped
HUGE = 1e12
# The standard step, SAKD's two optimisers (agent, then student), ABL's assigned gradients (abl-fixed) and its ordinary
# backward with the non-last blocks' gradients weighted (abl-global), and the plain CE ablation (none).
CASES = {
    "standard": ("kd", {}),
    "sakd": ("at", {"input_size": SIZE}),
    "abl-fixed": ("kd", {"input_size": SIZE}),
    "abl-global": ("kd", {"input_size": SIZE}),
    "none": ("kd", {}),
}


def build(name: str, clip: float | None):
    method, options = CASES[name]
    strategy = build_strategy(name, method, options, clip_grad_norm=clip)
    strategy.train(True)
    return strategy




def run_steps(strategy) -> list[dict[str, torch.Tensor]]:
    outs = []
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # SAKD's Gumbel noise: the same draws in every compared run
        outs.append(strategy.training_step(*random_batch(step), epoch=1, step=step))
    return outs


def trained_tensors(strategy) -> list[torch.Tensor]:
    """Every parameter any optimiser steps, and the student's buffers (BatchNorm statistics)."""
    params = [p for opt in strategy.optimizers.values() for g in opt.param_groups for p in g["params"]]
    return [t.detach() for t in params] + list(strategy.student.buffers())


def clip_before_each_step(strategy, max_norm: float) -> None:
    """The reference: torch's clip_grad_norm_ wrapped around each optimiser's own step, outside adakd's code."""
    for optimizer in strategy.optimizers.values():
        step = optimizer.step

        def clipped_step(*args, _optimizer=optimizer, _step=step, **kwargs):
            params = [p for g in _optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return _step(*args, **kwargs)

        optimizer.step = clipped_step


@pytest.mark.parametrize("name", list(CASES))
def test_huge_bound_equals_no_clipping_bitwise(name: str) -> None:
    plain, bounded = build(name, None), build(name, HUGE)
    outs_plain, outs_bounded = run_steps(plain), run_steps(bounded)
    for a, b in zip(trained_tensors(plain), trained_tensors(bounded)):
        assert torch.equal(a, b)
    for a, b in zip(outs_plain, outs_bounded):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(CASES))
def test_small_bound_equals_independent_clip(name: str) -> None:
    plain, clipped, reference = build(name, None), build(name, SMALL), build(name, None)
    clip_before_each_step(reference, SMALL)
    run_steps(plain), run_steps(clipped), run_steps(reference)
    for a, b in zip(trained_tensors(clipped), trained_tensors(reference)):
        assert torch.equal(a, b)
    # The bound did bite: the clipped run left the unclipped one.
    assert any(not torch.equal(a, b) for a, b in zip(trained_tensors(clipped), trained_tensors(plain)))


def cpu_loss_scaling(strategy, scale: float = 2.0**10) -> None:
    """Float16-style loss scaling on CPU: torch's GradScaler for the CPU device in place of the disabled one."""
    strategy.precision.scaler = torch.amp.GradScaler("cpu", init_scale=scale)


@pytest.mark.parametrize("name", ["standard", "abl-fixed", "sakd"])
def test_clipping_acts_on_unscaled_gradients(name: str) -> None:
    """With a loss scale of 1024 the clipped update is the unscaled run's (power-of-two scaling is exact)."""
    scaled, unscaled = build(name, SMALL), build(name, SMALL)
    cpu_loss_scaling(scaled)
    run_steps(scaled), run_steps(unscaled)
    for a, b in zip(trained_tensors(scaled), trained_tensors(unscaled)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clip", [None, SMALL])
def test_inf_gradient_skips_the_step(clip: float | None) -> None:
    """An inf gradient under loss scaling: no parameter moves and the scale backs off, with or without clipping."""
    strategy = build("standard", clip)
    cpu_loss_scaling(strategy)
    params = list(strategy.student.parameters())
    before = [p.detach().clone() for p in params]
    params[0].register_hook(lambda grad: torch.full_like(grad, float("inf")))
    strategy.training_step(*random_batch(0), epoch=1, step=0)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert strategy.precision.scaler.get_scale() == 2.0**9


def test_config_checks_the_bound() -> None:
    assert OptimConfig().clip_grad_norm is None
    base = RunConfig()
    for bad in (0.0, -1.0):
        config = dataclasses.replace(base, optim=dataclasses.replace(base.optim, clip_grad_norm=bad))
        with pytest.raises(ConfigError, match="optim.clip_grad_norm must be > 0"):
            validate(config)
