"""DOT (issue 21): the two-momentum optimiser, the task/distillation split of the step, and DOT in real runs."""
from __future__ import annotations

import copy
import csv
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adakd.cli import main
from adakd.engine.config import OptimConfig
from adakd.engine.optim import build_optimizers
from adakd.engine.trainer import Trainer
from adakd.strategies.components import build_components
from adakd.strategies.dot import DOT, DOTOptimizer, DOTOptions, dot_optimizer
from cli_checks import fails
from step_rig import build_strategy, random_batch
from sync_counter import SyncCounter
from test_no_host_sync import optimizer_step_counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distillers"))
from distiller_checks import LEARNING_STRATEGIES, SYNTHETIC, assert_learned  # noqa: E402

LR, WD, M_TASK, M_KD = 0.1, 0.01, 0.825, 0.975


def with_dot(strategy, delta: float = 0.075, optim: OptimConfig = OptimConfig(), **attach):
    """`strategy` (from step_rig) with DOT added and its optimisers rebuilt from the component's specs."""
    strategy.add_component(DOT(DOTOptions(delta)))
    strategy.attach(build_optimizers(strategy.optimizer_specs(), optim, 0.05), strategy.precision, total_steps=100,
                    **attach)
    return strategy


# ---- the optimiser against hand-written updates


def test_one_step_by_hand():
    """p = 1, g_task 0.5, g_kd 0.2, lr 0.1, wd 0.01, momenta 0.8 / 0.95, two steps worked out on paper."""
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = DOTOptimizer([p], lr=0.1, task_momentum=0.8, distill_momentum=0.95, weight_decay=0.01)
    expected = [0.929, 0.798271]  # b_t = 0.51, b_d = 0.2; then b_t = 0.8*0.51 + 0.5 + 0.01*0.929, b_d = 0.39
    for value in expected:
        p.grad = torch.tensor([0.5], dtype=torch.float64)
        opt.distill_grads = [torch.tensor([0.2], dtype=torch.float64)]
        opt.step()
        assert p.item() == pytest.approx(value, abs=1e-12)


def reference_updates(params, steps):
    """A float64 transcription of the DOT update rule (facts §8), buffer by buffer, in plain Python loops."""
    values = [p.detach().clone() for p in params]
    task_buf, kd_buf = [None] * len(params), [None] * len(params)
    mean = (M_TASK + M_KD) / 2
    for g_task, g_kd in steps:
        for i in range(len(values)):
            if g_task[i] is not None:
                d = g_task[i] + WD * values[i]
                task_buf[i] = d.clone() if task_buf[i] is None else (M_TASK if g_kd[i] is not None else mean) * task_buf[i] + d
                values[i] = values[i] - LR * task_buf[i]
            if g_kd[i] is not None:
                if kd_buf[i] is None:
                    kd_buf[i] = g_kd[i].clone()
                elif g_task[i] is not None:
                    kd_buf[i] = M_KD * kd_buf[i] + g_kd[i]
                else:
                    kd_buf[i] = mean * kd_buf[i] + g_kd[i] + WD * values[i]
                values[i] = values[i] - LR * kd_buf[i]
    return values, task_buf, kd_buf


def random_steps(shapes, count, seed=0):
    """Per step, task and KD gradients: parameter 1 has only a task gradient, parameter 2 only a KD one."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(count):
        g_task = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        g_kd = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        g_task[2], g_kd[1] = None, None
        steps.append((g_task, g_kd))
    return steps


def test_several_steps_equal_a_float64_transcription_of_each_buffer():
    shapes = [(3, 2), (2,), (4,)]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    steps = random_steps(shapes, 4)
    expected, task_buf, kd_buf = reference_updates(params, steps)
    opt = DOTOptimizer(params, lr=LR, task_momentum=M_TASK, distill_momentum=M_KD, weight_decay=WD)
    for g_task, g_kd in steps:
        for p, g in zip(params, g_task):
            p.grad = None if g is None else g.clone()
        opt.distill_grads = [None if g is None else g.clone() for g in g_kd]
        opt.step()
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), expected[i], rtol=0, atol=1e-12)
        state = opt.state[p]
        for key, buf in (("task_buffer", task_buf[i]), ("distill_buffer", kd_buf[i])):
            if buf is None:
                assert key not in state
            else:
                torch.testing.assert_close(state[key], buf, rtol=0, atol=1e-12)


def test_with_both_gradients_it_is_two_torch_sgd_optimisers():
    """mdistiller issue #64: with both gradients every step, DOT = SGD(m_task, wd) on g_task, then SGD(m_kd) on g_kd."""
    torch.manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    dot = DOTOptimizer(a, lr=LR, task_momentum=M_TASK, distill_momentum=M_KD, weight_decay=WD)
    task = torch.optim.SGD(b, lr=LR, momentum=M_TASK, weight_decay=WD, foreach=False)
    kd = torch.optim.SGD(b, lr=LR, momentum=M_KD, weight_decay=0.0, foreach=False)
    for _ in range(5):
        g_task, g_kd = [torch.randn_like(p) for p in a], [torch.randn_like(p) for p in a]
        for p, g in zip(a, g_task):
            p.grad = g.clone()
        dot.distill_grads = [g.clone() for g in g_kd]
        dot.step()
        for p, g in zip(b, g_task):
            p.grad = g.clone()
        task.step()
        for p, g in zip(b, g_kd):
            p.grad = g.clone()
        kd.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_state_dict_round_trips():
    params = [torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(3)]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    steps = random_steps([(4,)] * 3, 5, seed=3)
    first = DOTOptimizer(params, lr=LR, task_momentum=M_TASK, distill_momentum=M_KD, weight_decay=WD)
    second = DOTOptimizer(twin, lr=LR, task_momentum=M_TASK, distill_momentum=M_KD, weight_decay=WD)

    def run(opt, ps, chunk):
        for g_task, g_kd in chunk:
            for p, g in zip(ps, g_task):
                p.grad = None if g is None else g.clone()
            opt.distill_grads = [None if g is None else g.clone() for g in g_kd]
            opt.step()

    run(first, params, steps)
    run(second, twin, steps[:2])
    restored = DOTOptimizer(twin, lr=LR, task_momentum=M_TASK, distill_momentum=M_KD, weight_decay=WD)
    restored.load_state_dict(copy.deepcopy(second.state_dict()))
    run(restored, twin, steps[2:])
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


# ---- the split of the step


def test_the_step_hands_over_ce_and_distillation_gradients_apart():
    strategy = with_dot(build_strategy("standard", "kd", {}))
    strategy.train(True)
    student = copy.deepcopy(strategy.student)
    optimizer = strategy.optimizers["main"]
    seen = {}

    def record(closure=None):
        seen["task"] = [None if p.grad is None else p.grad.clone() for p in optimizer.param_groups[0]["params"]]
        seen["kd"] = list(optimizer.distill_grads)

    optimizer.step = record
    images, targets, indices = random_batch(0)
    strategy.training_step(images, targets, indices, epoch=1)
    # Independently: CE and KD (T 4, T^2, batchmean, teacher detached) on a copy of the student before the step.
    logits = student(images).features[-1]
    teacher = strategy.teacher(images).features[-1].detach()
    ce = F.cross_entropy(logits, targets)
    t = 4.0
    kd = strategy.weights.method * t * t * F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher / t, 1),
                                                    reduction="batchmean")
    params = list(student.parameters())
    for name, loss in (("task", ce), ("kd", kd)):
        expected = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for got, want in zip(seen[name], expected):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_sakd_splits_ce_from_the_masked_terms(monkeypatch):
    strategy = with_dot(build_strategy("sakd", "kd", {"input_size": 16}))
    strategy.train(True)
    calls = []
    original = type(strategy).optimizer_step

    def spy(self, optimizer, loss=None, **kw):
        calls.append((optimizer is self.optimizers["main"], loss, kw.get("distill_loss")))
        return original(self, optimizer, loss, **kw)

    monkeypatch.setattr(type(strategy), "optimizer_step", spy)
    out = strategy.training_step(*random_batch(0), epoch=1)
    main_calls = [c for c in calls if c[0]]
    assert len(main_calls) == 1
    _, task, distill = main_calls[0]
    torch.testing.assert_close(task.detach(), out["ce"])
    torch.testing.assert_close(distill.detach(), out["kd/logits"] + out["kl"])
    agent_calls = [c for c in calls if not c[0]]
    assert agent_calls and all(c[2] is None for c in agent_calls)  # the agent's update is untouched
    assert type(strategy.optimizers["agent"]) is torch.optim.SGD


def run_steps(strategy, count=3):
    strategy.train(True)
    for step in range(count):
        strategy.training_step(*random_batch(step), epoch=1, step=step)
    return [p.detach().clone() for p in strategy.student.parameters()]


@pytest.mark.parametrize("extra", [{}, {"clip_grad_norm": 0.5}, {"accumulate": 2}], ids=["plain", "clip", "acc2"])
def test_delta_zero_is_plain_sgd_on_the_summed_loss(extra):
    """Two buffers at one momentum add up to SGD's one buffer: the same run up to float rounding."""
    plain = run_steps(build_strategy("standard", "kd", {}, **extra))
    dot = run_steps(with_dot(build_strategy("standard", "kd", {}, **extra), delta=0.0, **extra))
    for p, q in zip(plain, dot):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_a_positive_delta_changes_the_run():
    plain = run_steps(build_strategy("standard", "kd", {}))
    dot = run_steps(with_dot(build_strategy("standard", "kd", {})))
    assert any(not torch.allclose(p, q) for p, q in zip(plain, dot))


def test_no_host_sync_per_step():
    strategy = with_dot(build_strategy("sakd", "kd", {"input_size": 16}))
    strategy.train(True)
    strategy.training_step(*random_batch(0), epoch=1, step=0)
    with SyncCounter(host_resident=optimizer_step_counters(strategy)) as syncs:
        for step in range(1, 4):
            strategy.training_step(*random_batch(step), epoch=1, step=step)
    assert syncs.count == 0, syncs.report()


# ---- refusals


def test_abl_is_refused_with_the_reason():
    strategy = build_strategy("abl-fixed", "kd", {"input_size": 16})
    with pytest.raises(ValueError, match="dot is not defined with ABLFixed: ABL's step forms each block's gradient"):
        strategy.add_component(DOT(DOTOptions()))


def test_bad_options_and_settings_are_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"components.dot.delta: must be in \[0, 1\), got -0.1"):
        build_components({"dot": {"delta": -0.1}})
    with pytest.raises(ValueError, match=r"momenta optim.momentum -/\+ delta must lie in \[0, 1\)"):
        dot_optimizer(0.2)([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9, nesterov=False,
                           weight_decay=0.0)
    with pytest.raises(ValueError, match="DOT has no Nesterov form"):
        dot_optimizer(0.075)([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9, nesterov=True,
                             weight_decay=0.0)
    monkeypatch.setattr("adakd.strategies.dot.is_distributed", lambda: True)
    with pytest.raises(ValueError, match="dot is not supported with several ranks yet"):
        build_strategy("standard", "kd", {}).add_component(DOT(DOTOptions()))


def test_cli_errors_are_one_line(tmp_path, capsys, random_teacher):
    base = ["distill", *SYNTHETIC, "epochs=1", "model.name=resnet8", "teacher.name=resnet8",
            f"teacher.weights={random_teacher()}", f"out_dir={tmp_path}", "name=run", "components.dot=true"]
    fails(capsys, [*base, "optim.nesterov=true"], "DOT has no Nesterov form", "set optim.nesterov=false")
    fails(capsys, [*base, "components.dot.delta=0.2"], "components.dot.delta: DOT's momenta", "lower")
    fails(capsys, [*base, "strategy=abl-fixed"], "dot is not defined with ABLFixed")
    assert not (tmp_path / "run").exists()


# ---- real runs


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A resnet14 teacher trained 4 epochs on the synthetic set (as tests/distillers/conftest.py's)."""
    root = tmp_path_factory.mktemp("teacher")
    assert main(["train", *SYNTHETIC, "epochs=4", "model.name=resnet14", f"out_dir={root}", "name=t"]) == 0
    return root / "t" / "last.pth"


@pytest.mark.parametrize("strategy", [s for s in LEARNING_STRATEGIES if s != "abl"])
def test_learns_on_the_synthetic_set(tmp_path, taught, strategy):
    argv = ["distill", *SYNTHETIC, "epochs=3", "model.name=resnet8", "teacher.name=resnet14",
            f"teacher.weights={taught}", "method=kd", "components.dot=true", f"out_dir={tmp_path}", "name=run",
            *LEARNING_STRATEGIES[strategy]]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert_learned(rows, strategy)


def test_resume_equals_uninterrupted(tmp_path, taught):
    common = ["distill", *SYNTHETIC, "model.name=resnet8", "teacher.name=resnet14", f"teacher.weights={taught}",
              "method=kd", "components.dot=true", "deterministic=true", f"out_dir={tmp_path}"]
    assert main([*common, "epochs=2", "name=straight"]) == 0
    assert main([*common, "epochs=1", "name=split"]) == 0
    resumed = Trainer.resume(tmp_path / "split", ["optim.epochs=2"])
    assert type(resumed.optimizers["main"]) is DOTOptimizer
    resumed.fit()
    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=False)
    split = torch.load(tmp_path / "split" / "last.pth", weights_only=False)
    for key, value in straight["model"].items():
        assert torch.equal(value, split["model"][key]), key
    a, b = straight["optimizers"]["main"]["state"], split["optimizers"]["main"]["state"]
    assert a.keys() == b.keys() and all("distill_buffer" in s and "task_buffer" in s for s in a.values())
    for index in a:
        for key in a[index]:
            assert torch.equal(a[index][key], b[index][key]), (index, key)
