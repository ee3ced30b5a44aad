"""SAKD switches beyond the core step (specs/sakd.md §8.4, §9-§11, §14.17): FT's empty selection, CC's detached
teacher embedding, the trainable-teacher ablation with its both_script agent lr, anti-faithful, first-segment reuse."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from adakd import distillers, models, strategies
from adakd.distillers.base import DistillContext
from adakd.engine.config import OptimConfig, resolve
from adakd.engine.optim import MultiStepSchedule, build_optimizers
from adakd.engine.trainer import Trainer
from adakd.strategies.base import LossWeights, Precision
from adakd.strategies.sakd import both_script_agent_lr
from tiny_run import save_random_teacher

SIZE = 16
LR = 0.05
OPTIM = OptimConfig(milestones=(150, 180, 210))
TRAINABLE = ("sakd-trainable-teacher", "sakd-faithful-trainable-teacher")


def build(name="sakd", method="at", kl=1.0, seed=0, distill_args=None, perturb_teacher=False, **options):
    """A strategy on tiny random models at 16x16 (resnet8 <- resnet14), attached to the engine's optimisers."""
    torch.manual_seed(seed)
    s = models.staged(models.create("resnet8", num_classes=10))
    teacher_model = models.create("resnet14", num_classes=10)
    if perturb_teacher:  # stands for pre-trained weights: every tensor away from any initialiser's constants
        with torch.no_grad():
            for tensor in teacher_model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(torch.rand_like(tensor) * 0.1 + 0.05)
    t = models.frozen(teacher_model)
    context = DistillContext(num_classes=10, train_targets=torch.arange(64) % 10)
    d, s_spots, t_spots = distillers.create(method, s, t, (3, SIZE, SIZE), context=context, **(distill_args or {}))
    weights = LossWeights(ce=1.0, method=type(d).defaults.method_weight, kl=kl)
    cls = strategies.get(name)
    if "input_size" in getattr(cls.option_class, "__dataclass_fields__", {}):
        options.setdefault("input_size", SIZE)
    strategy = cls(s, t, d, weights, s_spots, t_spots, **options)
    strategy.attach(build_optimizers(strategy.param_groups(), OPTIM, LR), Precision(torch.device("cpu"), False),
                    total_steps=10)
    strategy.train(True)
    return strategy


def batch(size=8, seed=123):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, SIZE, SIZE, generator=generator), torch.arange(size) % 10, torch.arange(size)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def preset_args(preset, method):
    """The distiller args a shipped YAML preset gives `method`."""
    config = resolve(["cifar100", preset], overrides=[f"method={method}", "task=distill", "teacher.name=resnet56"])
    return dict(config.distill.for_method().args)


def never_distil_first_spot(strategy):
    """Bias the first decision to "student" for every sample (exp(-1e4) = 0: no Gumbel draw can flip it)."""
    with torch.no_grad():
        strategy.policy.bias[0] -= 1e4


# ft_empty_selection (§8.4) -----------------------------------------------------------------------------------------

def record_unmasked(strategy):
    """Wrap the distiller call; keep the unmasked terms of the same inputs next to the masked ones."""
    unmasked = []
    inner = strategy.distiller_forward

    def forward(student_feats, teacher_feats, targets, masks=None, **kwargs):
        unmasked.append(inner(student_feats, teacher_feats, targets, **kwargs))
        return inner(student_feats, teacher_feats, targets, masks=masks, **kwargs)

    strategy.distiller_forward = forward
    return unmasked


@pytest.mark.parametrize("preset, expect_unmasked", [("sakd", False), ("sakd-faithful", True)])
def test_ft_empty_selection_follows_the_preset(preset, expect_unmasked):
    args = preset_args(preset, "ft")
    assert args.get("empty_selection", "zero") == ("unmasked" if expect_unmasked else "zero")
    strategy = build(preset, method="ft", distill_args=args)
    never_distil_first_spot(strategy)
    unmasked = record_unmasked(strategy)
    out = strategy.training_step(*batch(), epoch=1)
    assert out["sakd/share/stage3"] == 0
    if expect_unmasked:  # [C] train.py keeps the full-batch FT loss when no sample is selected
        assert out["ft/stage3"] > 0
        assert torch.equal(out["ft/stage3"], strategy.weights.method * unmasked[0]["ft/stage3"].detach())
        assert all(p.grad.abs().sum() > 0 for p in strategy.distiller.translators.parameters())
    else:
        assert out["ft/stage3"].item() == 0.0
        assert all(p.grad.abs().sum() == 0 for p in strategy.distiller.translators.parameters())


# cc_detach_teacher_embed (§9) --------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, name, detached", [
    ("sakd-faithful", "sakd-faithful", True), ("sakd-faithful", "anti-faithful", True),
    ("sakd", "sakd", False), ("sakd", "always", False), ("sakd", "random", False),
    ("sakd-faithful-trainable-teacher", "sakd-faithful-trainable-teacher", False)])
def test_cc_teacher_embedding_detached_only_in_the_adaptive_and_anti_scripts(preset, name, detached):
    strategy = build(name, method="cc", distill_args=preset_args(preset, "cc"))
    embed_t, embed_s = strategy.distiller.embed_t, strategy.distiller.embed_s
    before_t, before_s = snapshot(embed_t), snapshot(embed_s)
    torch.manual_seed(4)
    strategy.training_step(*batch(size=16), epoch=1)
    assert any(not torch.equal(v, before_s[k]) for k, v in embed_s.state_dict().items())
    unchanged = all(torch.equal(v, before_t[k]) for k, v in embed_t.state_dict().items())
    main = {id(p) for p in strategy.param_groups()["main"]}
    if detached:  # left at its random initialisation, outside every optimiser
        assert unchanged and all(p.grad is None for p in embed_t.parameters())
        assert not main & {id(p) for p in embed_t.parameters()}
    else:  # the CC loss itself reaches the embedding (not only weight decay)
        assert not unchanged and all(p.grad.abs().sum() > 0 for p in embed_t.parameters())
        assert {id(p) for p in embed_t.parameters()} <= main


# The trainable-teacher ablation (§11, §14.17) ----------------------------------------------------------------------

@pytest.mark.parametrize("name", TRAINABLE)
def test_trainable_teacher_learns_in_train_mode_in_the_student_optimiser(name):
    strategy = build(name)
    teacher = strategy.teacher
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)
    before = snapshot(teacher.model)
    out = strategy.training_step(*batch(), epoch=1)
    assert all(m.training for m in teacher.modules())  # the routing forward puts it back in train mode
    after = teacher.model.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in before.items() if k.endswith(("weight", "running_mean")))
    groups = strategy.param_groups()
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert teacher_ids <= {id(p) for p in groups["main"]}
    assert not teacher_ids & {id(p) for p in groups["agent"]["params"]}
    assert teacher_ids <= {id(p) for g in strategy.optimizers["main"].param_groups for p in g["params"]}
    assert "teacher_ce" in out and 0 <= out["sakd/teacher_acc1"] <= 100
    assert math.isclose(out["loss"].item(), sum(v.item() for k, v in out.items() if k in (
        "ce", "teacher_ce", "kl", "at/stage1", "at/stage2", "at/stage3")), rel_tol=1e-5)
    strategy.decide(batch()[0])
    assert all(m.training for m in teacher.modules())


@pytest.mark.parametrize("method_weight, kl_weight", [(1000.0, 0.0), (0.0, 1.0)])
def test_kd_and_kl_terms_reach_the_trainable_teacher(method_weight, kl_weight):
    # With the KD and KL weights at 0 only the teacher's CE moves it. Had a term been detached from the teacher,
    # turning it on would leave the teacher of one step unchanged (same forward, same CE).
    taught, ce_only = build("sakd-trainable-teacher"), build("sakd-trainable-teacher")
    taught.weights = LossWeights(ce=1.0, method=method_weight, kl=kl_weight)
    ce_only.weights = LossWeights(ce=1.0, method=0.0, kl=0.0)
    for strategy in (taught, ce_only):
        torch.manual_seed(9)
        strategy.training_step(*batch(), epoch=1)
    a, b = taught.teacher.model.state_dict(), ce_only.teacher.model.state_dict()
    unchanged = [k for k in a if k.endswith("weight") and torch.equal(a[k], b[k])]
    # AT's spots end at the last stage, so without KL the classifier after them learns from the CE alone.
    assert unchanged == ([] if kl_weight else ["fc.weight"])


def test_frozen_teacher_is_unchanged_and_untouched_by_default():
    strategy = build("sakd")
    before = snapshot(strategy.teacher.model)
    strategy.training_step(*batch(), epoch=1)
    assert all(torch.equal(v, before[k]) for k, v in strategy.teacher.model.state_dict().items())
    assert not any(p.requires_grad for p in strategy.teacher.parameters())
    assert "teacher" not in strategy.state_dict()


def test_faithful_trainable_teacher_losses():
    # [C] train_both.py: gamma_r (2 for AT) on both CE terms and on the routing CE; no asymmetry, no hinge, no bias.
    paper, faithful = build("sakd-trainable-teacher"), build("sakd-faithful-trainable-teacher", homo=True)
    plain = build("sakd-faithful", homo=False)
    assert faithful.asym_gamma == 2.0 and torch.equal(faithful.policy.bias, plain.policy.bias)
    with torch.no_grad():  # every sample to the student's classifier: the hinge would be B/2 = 4
        faithful.policy.bias[-2] -= 1e4
    out_paper = paper.training_step(*batch(), epoch=1)
    out = faithful.training_step(*batch(), epoch=1)
    assert torch.equal(out["ce"], 2 * out_paper["ce"]) and torch.equal(out["teacher_ce"], 2 * out_paper["teacher_ce"])
    assert out["sakd/hinge"].item() == 4.0
    assert torch.equal(out["sakd/route_total"], 2 * out["sakd/route_ce"])
    assert torch.equal(out_paper["sakd/route_total"], out_paper["sakd/route_ce"])


def test_scratch_teacher_is_redrawn():
    pretrained = build("sakd-trainable-teacher", perturb_teacher=True)
    scratch = build("sakd-trainable-teacher", perturb_teacher=True, teacher_init="scratch")
    a, b = pretrained.teacher.model.state_dict(), scratch.teacher.model.state_dict()
    for key, value in b.items():
        if key.endswith("num_batches_tracked"):
            assert value == 0
        elif key.endswith("running_var"):
            assert torch.equal(value, torch.ones_like(value))
        else:
            assert not torch.equal(value, a[key]), key
    bn = next(m for m in scratch.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    # The policy and adapters draw the same initial weights with either teacher.
    assert torch.equal(pretrained.policy.weight, scratch.policy.weight)
    with pytest.raises(ValueError, match="teacher_trainable"):
        build("sakd", teacher_init="scratch")


def test_trained_teacher_state_round_trip_is_strict():
    trained = build("sakd-trainable-teacher")
    trained.training_step(*batch(), epoch=1)
    state = trained.state_dict()
    assert set(state) == {"distiller", "policy", "adapters", "teacher"}
    fresh = build("sakd-trainable-teacher", seed=5)
    fresh.load_state_dict(state)
    assert all(torch.equal(v, state["teacher"][k]) for k, v in fresh.teacher.model.state_dict().items())
    with pytest.raises(ValueError, match="teacher_trainable"):
        build("sakd").load_state_dict(state)


def test_both_script_agent_lr_schedule():
    # §10: lr_agent / 100 for epochs 1-150 (< 30, then unchanged), then lr_agent x 0.1^(milestones passed).
    agent = LR / 2
    expected = {1: agent / 100, 29: agent / 100, 30: agent / 100, 150: agent / 100, 151: agent * 0.1,
                181: agent * 0.01, 211: agent * 0.001}
    strategy = build("sakd-faithful-trainable-teacher")
    schedule = MultiStepSchedule(OPTIM, strategy.optimizers, LR)
    for epoch, value in expected.items():
        schedule.start_epoch(epoch)
        strategy.set_agent_lr(epoch)
        assert math.isclose(strategy.optimizers["agent"].param_groups[0]["lr"], value, rel_tol=1e-12), epoch
        strategy.set_agent_lr(epoch)  # applying it again at the next step changes nothing
        assert math.isclose(strategy.optimizers["agent"].param_groups[0]["lr"], value, rel_tol=1e-12), epoch
        assert math.isclose(strategy.optimizers["main"].param_groups[0]["lr"], LR * 0.1 ** sum(
            epoch > m for m in OPTIM.milestones), rel_tol=1e-12)
    assert both_script_agent_lr(12, 0.0025, 0.025) == 0.025 / 100  # [C]: below epoch 30 whatever has passed
    schedule.start_epoch(1)
    out = strategy.training_step(*batch(), epoch=1)  # the step applies it
    assert math.isclose(out["sakd/agent_lr"].item(), agent / 100, rel_tol=1e-6)
    standard = build("sakd-trainable-teacher")
    MultiStepSchedule(OPTIM, standard.optimizers, LR).start_epoch(1)
    assert "sakd/agent_lr" not in standard.training_step(*batch(), epoch=1)
    assert standard.optimizers["agent"].param_groups[0]["lr"] == agent


# anti-faithful ----------------------------------------------------------------------------------------------------

def test_anti_faithful_is_faithful_with_inverted_masks():
    adaptive, anti = build("sakd-faithful"), build("anti-faithful")
    assert anti.options == type(adaptive.options)(**{**adaptive.options.__dict__, "invert_masks": True})
    torch.manual_seed(3)
    a = adaptive.training_step(*batch(), epoch=1)
    torch.manual_seed(3)
    b = anti.training_step(*batch(), epoch=1)
    assert a["sakd/route_total"] == b["sakd/route_total"]
    for spot in adaptive.decision_names():
        assert a[f"sakd/share/{spot}"] + b[f"sakd/share/{spot}"] == 1.0


# Reuse of the teacher's first segment in the routing forward -------------------------------------------------------

@pytest.mark.parametrize("name, method", [("sakd", "at"), ("sakd-faithful", "at"), ("sakd", "kd"),
                                          ("sakd", "reviewkd"), ("sakd-faithful", "crd")])
def test_routing_with_the_teacher_forward_gives_the_same_numbers(name, method):
    strategy = build(name, method=method, kl=0.0 if method == "kd" else 1.0,
                     **({"distill_args": {"num_negatives": 16}} if method == "crd" else {}))
    images, targets, _ = batch()
    decisions = (torch.rand(8, strategy.layout.num_decisions) < 0.5).float().requires_grad_(True)
    teacher_out = strategy.teacher(images, preact=strategy.teacher_preact)
    results = []
    for given in (None, teacher_out):
        torch.manual_seed(1)
        routed = strategy.route(images, decisions, given)
        params = [decisions] + strategy.agent_params
        grads = torch.autograd.grad(F.cross_entropy(routed, targets), params, allow_unused=True)
        results.append((routed.detach(), grads))
    (plain, plain_grads), (reused, reused_grads) = results
    assert torch.equal(plain, reused)
    for a, b in zip(plain_grads, reused_grads):
        assert (a is None and b is None) or torch.equal(a, b)


# Engine: checkpoint and resume of a trained teacher ---------------------------------------------------------------

def engine_config(tmp_path, name, *extra):
    path = tmp_path / "teacher.pth"
    if not path.exists():
        save_random_teacher(path, "resnet14")
    return resolve(["cifar100", "demo", "sakd-faithful-trainable-teacher"], overrides=[
        f"out_dir={tmp_path}", f"name={name}", "task=distill", "method=at", "model.name=resnet8",
        "teacher.name=resnet14", f"teacher.weights={path}", "data.image_size=16", "optim.epochs=2",
        "log.progress=false", "log.tensorboard=false", "deterministic=true", "optim.milestones=[1]",
        "data.train_size=192", "data.batch_size=32", "strategy.args.teacher_init=scratch", *extra])


def test_trained_teacher_resumes_bitwise(tmp_path):
    straight = Trainer(engine_config(tmp_path, "straight"))
    straight.fit()
    Trainer(engine_config(tmp_path, "split", "optim.epochs=1")).fit()
    resumed = Trainer.resume(tmp_path / "split", ["optim.epochs=2"])
    resumed.fit()
    a, b = straight.strategy.teacher.model.state_dict(), resumed.strategy.teacher.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for part in ("policy", "adapters"):
        assert all(torch.equal(v, resumed.strategy.state_dict()[part][k])
                   for k, v in straight.strategy.state_dict()[part].items())
    assert all(torch.equal(v, resumed.student.model.state_dict()[k])
               for k, v in straight.student.model.state_dict().items())
    for name, optimizer in straight.optimizers.items():
        states = zip(optimizer.state_dict()["state"].values(), resumed.optimizers[name].state_dict()["state"].values())
        assert all(torch.equal(x["momentum_buffer"], y["momentum_buffer"]) for x, y in states)
    loaded = torch.load(tmp_path / "teacher.pth", weights_only=True)["model"]
    assert any(not torch.equal(v, a[k]) for k, v in loaded.items())  # redrawn and trained
    rows = list(csv.DictReader(open(tmp_path / "straight" / "metrics.csv")))
    full_agent_lr = float(rows[0]["lr"]) / 2  # both epochs are below 30: lr_agent / 100 though a milestone passed
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])
    assert all(math.isclose(float(r["train/sakd/agent_lr"]), full_agent_lr / 100, rel_tol=1e-6) for r in rows)
    assert all(0 <= float(r["train/sakd/teacher_acc1"]) <= 100 for r in rows)


def test_scratch_teacher_run_needs_no_weights_file(tmp_path):
    from adakd.engine.config import resolve
    from adakd.engine.trainer import Trainer

    cfg = resolve(["cifar100", "demo"], overrides=[
        f"out_dir={tmp_path}", "name=scratch", "task=distill", "model.name=resnet8", "teacher.name=resnet8",
        "data.image_size=8", "data.train_size=64", "data.batch_size=32", "optim.epochs=1", "log.progress=false",
        "log.tensorboard=false", "strategy=sakd-trainable-teacher", "strategy.args.teacher_init=scratch"])
    summary = Trainer(cfg).fit()
    assert summary["epochs"] == 1
    with pytest.raises(Exception, match="teacher.weights is required"):
        Trainer(resolve(["cifar100", "demo"], overrides=[
            f"out_dir={tmp_path}", "name=frozen", "task=distill", "model.name=resnet8", "teacher.name=resnet8"]))
