"""SAKD and its ablations on CPU (specs/sakd.md §14): Gumbel ST, layout, routing, isolation, ablations, engine runs."""
from __future__ import annotations

import copy
import csv
import io
import math

import pytest
import torch

from adakd import distillers, models, strategies
from markers import slow_except
from adakd.distillers.base import DistillContext
from adakd.engine.config import OptimConfig, resolve
from adakd.engine.optim import MultiStepSchedule, build_optimizers
from adakd.engine.trainer import Trainer
from adakd.strategies.base import LossWeights, Precision
from adakd.strategies.sakd import at_least_float32, gumbel_noise, gumbel_softmax_st, routing_loss, tau_at
from tiny_run import save_random_teacher

SIZE = 16
ADAPTIVE = ("sakd", "sakd-faithful", "anti")


def build(name="sakd", method="at", student="resnet8", teacher="resnet14", kl=1.0, seed=0, dtype=torch.float32,
          **options):
    """A strategy on random tiny models at 16x16, attached to the engine's optimisers (lr 0.05)."""
    torch.manual_seed(seed)
    s = models.staged(models.create(student, num_classes=10)).to(dtype)
    t = models.frozen(models.create(teacher, num_classes=10)).to(dtype)
    context = DistillContext(num_classes=10, train_targets=torch.arange(64) % 10)
    d, s_spots, t_spots = distillers.create(method, s, t, (3, SIZE, SIZE), context=context,
                                            **({"num_negatives": 16} if method == "crd" else {}))
    d.to(dtype)
    weights = LossWeights(ce=1.0, method=type(d).defaults.method_weight, kl=kl)
    if name in ADAPTIVE:
        options.setdefault("input_size", SIZE)
    strategy = strategies.get(name)(s, t, d, weights, s_spots, t_spots, **options)
    strategy.attach(build_optimizers(strategy.param_groups(), OptimConfig(milestones=(150, 180, 210)), 0.05),
                    Precision(torch.device("cpu"), False), total_steps=10)
    strategy.train(True)
    return strategy


def batch(size=8, seed=123, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, SIZE, SIZE, generator=generator, dtype=dtype)
    return images, torch.arange(size) % 10, torch.arange(size)


def record_masks(strategy):
    """Wrap the distiller call so that every per-spot mask handed over is kept."""
    seen = []
    inner = strategy.distiller_forward

    def forward(*args, masks=None, **kwargs):
        seen.append([m.clone() for m in masks])
        return inner(*args, masks=masks, **kwargs)

    strategy.distiller_forward = forward
    return seen


def record_decision_masks(strategy):
    """Keep the [B, K] masks SAKD derives from its decisions."""
    seen = []
    inner = strategy.masks_from

    def masks_from(decisions):
        seen.append(inner(decisions).clone())
        return seen[-1]

    strategy.masks_from = masks_from
    return seen


def params_of(*modules):
    return [p.detach().clone() for m in modules for p in m.state_dict().values()]


# §14.1, §14.18 ---------------------------------------------------------------------------------------------------

def test_gumbel_st_is_one_hot_forward_soft_backward_and_tau_free():
    logits = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    noise = gumbel_noise(logits.detach())
    weights = torch.randn(6, 3, 2, dtype=torch.float64)
    value = gumbel_softmax_st(logits, 5.0, noise)
    hard = value.detach() > 0.5
    assert torch.equal(hard.sum(-1), torch.ones(6, 3, dtype=torch.long))
    assert torch.allclose(value.detach(), hard.double(), atol=1e-12, rtol=0)
    assert torch.equal(hard, (logits + noise).argmax(-1, keepdim=True) == torch.arange(2))
    (grad,) = torch.autograd.grad((value * weights).sum(), logits)
    (expected,) = torch.autograd.grad((torch.softmax((logits + noise) / 5.0, -1) * weights).sum(), logits)
    assert torch.equal(grad, expected)
    for tau in (0.1, 1.0, 50.0):
        assert torch.equal(gumbel_softmax_st(logits, tau, noise).detach() > 0.5, hard)


def test_gumbel_noise_follows_the_logits():
    noise = gumbel_noise(torch.zeros(4, 2, 2, dtype=torch.float64))
    assert noise.dtype == torch.float64 and noise.device == torch.device("cpu") and noise.isfinite().all()


# §14.2 -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gap", [0.0, 1.5, -2.0, 10.0])
def test_decision_probability_matches_softmax(gap):
    draws = 20000
    logits = torch.tensor([gap, 0.0]).expand(draws, 1, 2)
    rate = (gumbel_softmax_st(logits, 5.0)[..., 0] > 0.5).double().mean().item()
    p = 1 / (1 + math.exp(-gap))
    assert abs(rate - p) <= 3 * math.sqrt(p * (1 - p) / draws) + 1e-12


# §14.3 -----------------------------------------------------------------------------------------------------------

def test_policy_bias_init_edits_only_even_bias_entries():
    plain = build("sakd-faithful", homo=False)
    biased = build("sakd-faithful", homo=True)
    assert torch.equal(plain.policy.weight, biased.policy.weight)
    assert torch.equal(biased.policy.bias[0::2], plain.policy.bias[0::2] + 10.0)
    assert torch.equal(biased.policy.bias[1::2], plain.policy.bias[1::2])
    assert biased.policy.bias.is_leaf and biased.policy.bias.requires_grad
    assert torch.equal(build("sakd", homo=True).policy.bias, plain.policy.bias)  # paper preset: b = 0
    out = biased.training_step(*batch(), epoch=1)
    assert all(out[f"sakd/share/{n}"] == 1.0 for n in biased.decision_names())  # sigma(10): distil everything


# §14.4 -----------------------------------------------------------------------------------------------------------

BODY = {"resnet8": 3, "vgg8": 4}
PAIRS = {"resnet8": "resnet14", "vgg8": "vgg11"}


def expected_k(method, body):
    if distillers.get(method).defaults.spots == ("stages",):  # every body stage: at, nst, vid, ab, kdsvd, ofd
        return body + 1
    if distillers.get(method).defaults.spots == (-1,):  # a logits-only method: kd, dkd and issue 21's logit methods
        return 1
    if method in ("reviewkd", "fsp"):  # fsp: the stem and every body stage
        return body + 2
    return 2


# The inner loop aligns every distiller on resnet8; CI on vgg8 too.
@pytest.mark.parametrize("method, student", slow_except(
    [(m, s) for s in ("resnet8", "vgg8") for m in distillers.available()], [f"{m}-resnet8" for m in distillers.available()]))
def test_k_and_spot_alignment(method, student):
    kl = 0.0 if method in ("kd", "dkd") else 1.0
    strategy = build("sakd", method=method, student=student, teacher=PAIRS[student], kl=kl)
    k = expected_k(method, BODY[student])
    assert strategy.layout.num_decisions == k and strategy.policy.out_features == 2 * k
    assert strategy.decision_names()[-1] == "logits" and len(strategy.decision_names()) == k
    spot_masks, decision_masks = record_masks(strategy), record_decision_masks(strategy)
    strategy.training_step(*batch(), epoch=1)
    head = strategy.student_module.num_stages - 1
    feature_rank = 0
    for spot, mask in zip(strategy.student_spots, spot_masks[0]):
        column = k - 1 if spot == head else feature_rank
        feature_rank += spot != head
        assert torch.equal(mask, decision_masks[0][:, column])


def test_unequal_spot_orders_are_refused():
    with pytest.raises(ValueError, match="increase together"):
        torch.manual_seed(0)
        s = models.staged(models.create("resnet8", num_classes=10))
        t = models.frozen(models.create("resnet14", num_classes=10))
        d, _, _ = distillers.create("at", s, t, (3, SIZE, SIZE))
        strategies.get("sakd")(s, t, d, LossWeights(), [1, 2, 3], [3, 2, 1], input_size=SIZE)


# §14.6, §14.7 ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter", ["conv1x1", "convreg"])
def test_routing_corner_cases(adapter):
    strategy = build("sakd", adapter=adapter)
    images = batch()[0]
    k = strategy.layout.num_decisions
    with torch.no_grad():
        teacher_logits = strategy.teacher(images).features[-1]
        routed_teacher = strategy.route(images, torch.ones(8, k))
        routed_student = strategy.route(images, torch.zeros(8, k))
        strategy.student_module.eval()
        student_logits = strategy.student_module(images).features[-1]
    assert len(strategy.adapters["student_to_teacher"]) == k - 1
    assert torch.equal(routed_teacher, teacher_logits)
    assert torch.equal(routed_student, student_logits)


def test_routing_restores_student_mode_and_keeps_running_stats():
    strategy = build("sakd")
    before = {k: v.clone() for k, v in strategy.student_module.state_dict().items()}
    strategy.route(batch()[0], torch.rand(8, strategy.layout.num_decisions).round())
    assert strategy.student_module.training and all(m.training for m in strategy.student_module.modules())
    for key, value in strategy.student_module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_routing_mixes_per_sample():
    strategy = build("sakd-faithful", adapter_bn_mode="eval")
    images = batch()[0]
    decisions = (torch.rand(8, strategy.layout.num_decisions) < 0.5).float()
    with torch.no_grad():
        mixed = strategy.route(images, decisions)
        for b in range(8):
            alone = strategy.route(images[b:b + 1], decisions[b:b + 1])
            assert torch.allclose(mixed[b], alone[0], atol=1e-5), b


def test_masks_are_per_sample():
    strategy = build("sakd")
    seen = record_decision_masks(strategy)
    strategy.training_step(*batch(), epoch=1)
    masks = seen[0]
    assert ((masks == 0) | (masks == 1)).all()
    assert any(0 < masks[:, k].sum() < 8 for k in range(masks.shape[1]))


# §14.10 ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sakd", "sakd-faithful"])
def test_gradient_isolation_matches_the_literal_two_backward_step(name):
    step = build(name)
    literal = build(name)
    teacher_before = params_of(step.teacher)
    images, targets, indices = batch()
    torch.manual_seed(7)
    step.training_step(images, targets, indices, epoch=1)
    # §7 step 9 literally: full backward of L_route (it reaches the student), agent step, then student zero_grad.
    torch.manual_seed(7)
    s = literal
    teacher_out, student_out = s.teacher(images), s.student(images)
    logits = s.policy_logits(teacher_out, student_out).float()
    decisions = gumbel_softmax_st(logits, s.tau(0))[..., 0]
    terms = s.student_terms(student_out, teacher_out, targets, indices, 1, s.masks_from(decisions))
    student_loss = torch.stack(list(terms.values())).sum()
    route_ce = torch.nn.functional.cross_entropy(s.route(images, decisions), targets)
    route_total, _ = routing_loss(route_ce, torch.nn.functional.cross_entropy(student_out.features[-1], targets),
                                  decisions[:, -1], s.options.routing_weight, s.asym_gamma, s.options.routing_hinge)
    s.optimizers["agent"].zero_grad()
    route_total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.student_module.parameters())
    s.optimizers["agent"].step()
    s.optimizers["main"].zero_grad()
    student_loss.backward()
    s.optimizers["main"].step()
    for a, b in zip(params_of(step.student_module, step.policy, step.adapters),
                    params_of(literal.student_module, literal.policy, literal.adapters)):
        assert torch.equal(a, b)
    for a, b in zip(params_of(step.teacher), teacher_before):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in step.teacher.parameters())


def test_losses_are_computed_in_at_least_float32():
    # Autocast's float16/bfloat16 logits are widened (CE and softmax would overflow); float32 stays the same tensor
    # (float32 runs unchanged) and float64 stays float64 (a float64 run is not rounded to float32).
    for dtype, want in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float32, torch.float32), (torch.float64, torch.float64)):
        t = torch.randn(3, 4).to(dtype)
        assert at_least_float32(t).dtype == want
    same = torch.randn(3)
    assert at_least_float32(same) is same


@pytest.mark.parametrize("name", ["sakd", "sakd-faithful", "anti"])
def test_float64_step_matches_a_float64_reference(name):
    # The step's CE, routing CE and policy logits are at least float32 (float16 autocast would overflow), never
    # narrowed: a float64 run must equal a float64 reference to float64 precision (issue 13). With `.float()` casts
    # the CE gradients were float32-rounded (~1e-8 relative) and the Gumbel noise was drawn in float32.
    f64 = torch.float64
    step, s = build(name, dtype=f64), build(name, dtype=f64)
    masks_seen = record_decision_masks(step)
    images, targets, indices = batch(dtype=f64)
    before = params_of(step.student_module, step.policy, step.adapters)
    torch.manual_seed(7)
    step.training_step(images, targets, indices, epoch=1)
    assert masks_seen[0].dtype == f64
    # The reference, in float64 throughout: §7 with the losses written out, as in the literal two-backward step.
    torch.manual_seed(7)
    teacher_out, student_out = s.teacher(images), s.student(images)
    logits = s.policy_logits(teacher_out, student_out)
    decisions = gumbel_softmax_st(logits, s.tau(0))[..., 0]
    distil = decisions.detach() > 0.5
    masks = (~distil if s.options.invert_masks else distil).to(f64)
    z_s, z_t = student_out.features[-1], teacher_out.features[-1]
    named = s.distiller(s.select(student_out, s.student_spots), s.select(teacher_out, s.teacher_spots), targets,
                        masks=[masks[:, k] for k in s.layout.spot_decision], indices=indices, epoch=1)
    temp = s.weights.temperature
    kl = (torch.nn.functional.kl_div(torch.log_softmax(z_s / temp, 1), torch.log_softmax(z_t / temp, 1),
                                     log_target=True, reduction="none").sum(1) * temp ** 2 * masks[:, -1]).mean()
    student_loss = (torch.nn.functional.cross_entropy(z_s, targets) + s.weights.kl * kl
                    + s.weights.method * torch.stack(list(named.values())).sum())
    route_ce = torch.nn.functional.cross_entropy(s.route(images, decisions), targets)
    route_total, _ = routing_loss(route_ce, torch.nn.functional.cross_entropy(z_s, targets), decisions[:, -1],
                                  s.options.routing_weight, s.asym_gamma, s.options.routing_hinge)
    s.optimizers["agent"].zero_grad()
    route_total.backward()
    s.optimizers["agent"].step()
    s.optimizers["main"].zero_grad()
    student_loss.backward()
    s.optimizers["main"].step()
    got = torch.cat([(b - a).flatten() for a, b in zip(params_of(step.student_module, step.policy, step.adapters),
                                                       before)])
    want = torch.cat([(b - a).flatten() for a, b in zip(params_of(s.student_module, s.policy, s.adapters), before)])
    assert want.norm() > 0 and got.dtype == f64
    assert (got - want).norm() <= 1e-12 * want.norm()


# §14.11 ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("routed, student, expected", [(2.0, 1.0, 4.0), (1.0, 2.0, 0.5), (1.5, 1.5, 1.5)])
def test_asymmetric_rule(routed, student, expected):
    total, _ = routing_loss(torch.tensor(routed), torch.tensor(student), torch.ones(4), gamma=2.0)
    assert total.item() == expected


@pytest.mark.parametrize("routed_count, hinge", [(1, 2.0), (3, 0.0), (5, 0.0)])
def test_hinge_value(routed_count, hinge):
    last = torch.zeros(6)
    last[:routed_count] = 1
    total, value = routing_loss(torch.tensor(1.0), torch.tensor(1.0), last, hinge=True)
    assert value.item() == hinge and total.item() == 1.0 + hinge
    off, _ = routing_loss(torch.tensor(1.0), torch.tensor(1.0), last, hinge=False)
    assert off.item() == 1.0


def test_hinge_gradient_reaches_the_policy_except_at_half():
    strategy = build("sakd-faithful")
    k = strategy.layout.num_decisions
    features = torch.randn(8, strategy.policy.in_features)
    with torch.no_grad():  # route every sample to the student's classifier: the hinge is B/2 = 4
        strategy.policy.bias[-2] -= 20.0
    decisions = gumbel_softmax_st(strategy.policy(features).view(8, k, 2), 5.0)[..., 0]
    _, value = routing_loss(torch.tensor(0.0), torch.tensor(0.0), decisions[:, -1], hinge=True)
    value.backward()
    assert value.item() == 4.0 and strategy.policy.weight.grad[-2:].abs().sum() > 0
    assert strategy.policy.weight.grad[:-2].abs().sum() == 0  # only the logits decision feels the hinge
    half = torch.tensor([1.0, 1, 0, 0], requires_grad=True)
    _, value = routing_loss(torch.tensor(0.0), torch.tensor(0.0), half, hinge=True)
    (grad,) = torch.autograd.grad(value, half)
    assert value.item() == 0 and torch.equal(grad, torch.zeros(4))


def test_gumbel_tau_schedules():
    assert tau_at(0, 100, 5.0, 0.5, "exp") == 5.0
    assert math.isclose(tau_at(100, 100, 5.0, 0.5, "exp"), 0.5)
    values = [tau_at(t, 100, 5.0, 0.5, "exp") for t in range(0, 101, 10)]
    assert values == sorted(values, reverse=True)
    assert tau_at(77, 100, 5.0, 0.5, "constant") == 5.0
    out = build("sakd").training_step(*batch(), epoch=1, step=5)
    assert math.isclose(out["gumbel/tau"].item(), 5 * math.exp(-math.log(10) * 5 / 10), rel_tol=1e-6)


# §14.12 ----------------------------------------------------------------------------------------------------------

def test_optimiser_wiring():
    strategy = build("sakd")
    groups = strategy.param_groups()
    agent = {id(p) for p in groups["agent"]["params"]}
    assert agent == {id(p) for m in (strategy.policy, strategy.adapters) for p in m.parameters()}
    assert groups["agent"]["lr_scale"] == 0.5 and groups["agent"]["weight_decay"] == 1e-3
    main = {id(p) for p in groups["main"]}
    assert main == {id(p) for p in strategy.student_module.parameters()}  # AT has no heads
    assert not main & agent and not main & {id(p) for p in strategy.teacher.parameters()}
    config = OptimConfig(milestones=(150, 180, 210))
    optimizers = build_optimizers(groups, config, 0.05)
    schedule = MultiStepSchedule(config, optimizers, 0.05)
    for epoch, factor in [(1, 1.0), (150, 1.0), (151, 0.1), (181, 0.01), (211, 0.001)]:
        schedule.start_epoch(epoch)
        assert math.isclose(optimizers["main"].param_groups[0]["lr"], 0.05 * factor)
        assert math.isclose(optimizers["agent"].param_groups[0]["lr"], 0.025 * factor)
    assert optimizers["agent"].param_groups[0]["weight_decay"] == 1e-3


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown strategy option"):
        build("sakd", bogus=1)
    with pytest.raises(ValueError, match="adapter"):
        build("sakd", adapter="mlp")
    with pytest.raises(ValueError, match="homo"):
        build("sakd", homo="yes")
    assert build("sakd-faithful").asym_gamma == 2.0  # AT on CIFAR-100 in [C]
    assert build("sakd-faithful", method="fitnets").asym_gamma == 1.0
    assert build("sakd-faithful", routing_asym_gamma=3).asym_gamma == 3.0


# §14.13 ----------------------------------------------------------------------------------------------------------

def test_always_masks_are_all_ones_and_match_standard():
    always, standard = build("always"), build("standard")
    seen = record_masks(always)
    a = always.training_step(*batch(), epoch=1)
    b = standard.training_step(*batch(), epoch=1)
    assert all(torch.equal(m, torch.ones(8)) for m in seen[0])
    for name in b:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-6), name
    for x, y in zip(params_of(always.student_module), params_of(standard.student)):
        assert torch.allclose(x, y, atol=1e-6)


def test_none_has_only_ce():
    strategy = build("none")

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher ran")

    strategy.teacher.forward = refuse
    out = strategy.training_step(*batch(), epoch=1)
    assert set(out) == {"ce", "loss", "correct"}
    assert {id(p) for p in strategy.param_groups()["main"]} == {id(p) for p in strategy.student.parameters()}
    # A float64 run's CE stays float64 (not rounded through float32): equal to a float64 reference.
    strategy = build("none", dtype=torch.float64)
    images, targets, indices = batch(dtype=torch.float64)
    reference = torch.nn.functional.cross_entropy(strategy.student(images).features[-1], targets)
    ce = strategy.training_step(images, targets, indices, epoch=1)["ce"]
    assert ce.dtype == torch.float64 and abs(ce.item() - reference.item()) <= 1e-12


def test_random_rate_and_independence():
    strategy = build("random")
    masks = strategy.draw_masks(20000, torch.device("cpu"))
    se = 3 * math.sqrt(0.25 / 20000)
    assert (masks.mean(0) - 0.5).abs().max() < se
    assert ((masks[:, 0] * masks[:, 1]).mean() - 0.25).abs() < 3 * math.sqrt(0.25 * 0.75 / 20000)
    tied = build("random", rand_kl_mask="tied").draw_masks(64, torch.device("cpu"))
    assert torch.equal(tied[:, -1], tied[:, -2])
    assert not hasattr(strategy, "policy") and set(strategy.param_groups()) == {"main"}
    out = strategy.training_step(*batch(), epoch=1)
    assert "sakd/share/logits" in out and "sakd/route_ce" not in out


def test_anti_masks_are_the_complement_of_adaptive_masks():
    adaptive, anti = build("sakd"), build("anti")
    seen_adaptive, seen_anti = record_masks(adaptive), record_masks(anti)
    torch.manual_seed(3)
    a = adaptive.training_step(*batch(), epoch=1)
    torch.manual_seed(3)
    b = anti.training_step(*batch(), epoch=1)
    for x, y in zip(seen_adaptive[0], seen_anti[0]):
        assert torch.equal(x + y, torch.ones(8))
    assert a["sakd/route_total"] == b["sakd/route_total"]  # the policy trains exactly as in adaptive
    for x, y in zip(params_of(adaptive.policy, adaptive.adapters), params_of(anti.policy, anti.adapters)):
        assert torch.equal(x, y)
    for name in adaptive.decision_names():
        assert a[f"sakd/share/{name}"] + b[f"sakd/share/{name}"] == 1.0


# §14.15, §14.16, logging, checkpoints, export ---------------------------------------------------------------------

def test_shares_are_n_over_b_and_every_term_is_logged():
    strategy = build("sakd-faithful")
    seen = record_decision_masks(strategy)
    out = strategy.training_step(*batch(size=7), epoch=1)
    for k, name in enumerate(strategy.decision_names()):
        assert torch.equal(out[f"sakd/share/{name}"], seen[0][:, k].sum() / 7)
        assert 0 < out[f"sakd/policy_p/{name}"].item() < 1
    expected = {"ce", "kl", "at/stage1", "at/stage2", "at/stage3", "sakd/route_ce", "sakd/route_total",
                "sakd/hinge", "gumbel/tau", "loss", "correct"}
    assert expected <= set(out)
    assert all(not v.requires_grad and v.dim() == 0 for v in out.values())
    assert math.isclose(out["loss"].item(), sum(out[n].item() for n in ("ce", "kl", "at/stage1", "at/stage2",
                                                                         "at/stage3")), rel_tol=1e-5)


@pytest.mark.parametrize("name", ["sakd", "random"])
def test_same_seed_same_numbers(name):
    runs = []
    for _ in range(2):
        strategy = build(name)
        torch.manual_seed(11)
        outs = [strategy.training_step(*batch(seed=s), epoch=1, step=s) for s in range(3)]
        learners = [m for m in (strategy.distiller, getattr(strategy, "policy", None),
                                getattr(strategy, "adapters", None)) if m is not None]
        runs.append((outs, params_of(strategy.student_module, *learners)))
    (outs_a, params_a), (outs_b, params_b) = runs
    for a, b in zip(outs_a, outs_b):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_strategy_state_round_trip():
    trained = build("sakd-faithful", method="crd")
    trained.training_step(*batch(), epoch=1)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert {"distiller", "policy", "adapters"} == set(state)
    fresh = build("sakd-faithful", method="crd", seed=5)
    fresh.load_state_dict(state)
    for a, b in zip(params_of(trained.distiller, trained.policy, trained.adapters),
                    params_of(fresh.distiller, fresh.policy, fresh.adapters)):
        assert torch.equal(a, b)
    broken = copy.deepcopy(state)
    broken["adapters"].pop(next(iter(broken["adapters"])))
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(broken)


def test_decide_exports_decisions_and_probabilities():
    strategy = build("sakd")
    images = batch()[0]
    decisions, probs = strategy.decide(images)
    k = strategy.layout.num_decisions
    assert decisions.shape == probs.shape == (8, k)
    assert ((decisions == 0) | (decisions == 1)).all() and ((probs > 0) & (probs < 1)).all()
    with torch.no_grad():
        strategy.student_module.eval()
        inputs = strategy.policy_logits(strategy.teacher(images), strategy.student_module(images))
    strategy.student_module.train()
    assert torch.allclose(probs, inputs.softmax(-1)[..., 0])
    assert strategy.student_module.training and strategy.policy.training
    assert strategy.decision_names() == ["stage1", "stage2", "stage3", "logits"]


def test_teacher_stays_in_eval():
    strategy = build("sakd")
    strategy.train(True)
    strategy.training_step(*batch(), epoch=1)
    assert not any(m.training for m in strategy.teacher.modules())


# Engine runs -------------------------------------------------------------------------------------------------------

def engine_config(tmp_path, name, *extra):
    path = tmp_path / "teacher.pth"
    if not path.exists():
        save_random_teacher(path, "resnet14")
    return resolve(["cifar100", "demo"], overrides=[
        f"out_dir={tmp_path}", f"name={name}", "task=distill", "strategy=sakd", "distill.kl_weight=1",
        "model.name=resnet8", "teacher.name=resnet14", f"teacher.weights={path}", "data.image_size=16",
        "optim.epochs=2", "log.progress=false", "log.tensorboard=false", *extra])


@pytest.mark.parametrize("method, extra", [("at", []), ("crd", ["distill.args.num_negatives=32"])])
def test_engine_run(tmp_path, method, extra):
    Trainer(engine_config(tmp_path, "run", f"method={method}", *extra)).fit()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    spots = ["stage1", "stage2", "stage3", "logits"] if method == "at" else ["pooled", "logits"]
    assert len(rows) == 2
    for spot in spots:
        assert 0 <= float(rows[-1][f"train/sakd/share/{spot}"]) <= 1
    assert float(rows[-1]["lr/agent"]) == float(rows[-1]["lr"]) / 2
    assert all(math.isfinite(float(r["train/sakd/route_total"])) for r in rows)


def _run_state(trainer):
    state = dict(trainer.student.model.state_dict())
    for part, values in trainer.strategy.state_dict().items():
        state.update({f"{part}.{k}": v for k, v in values.items()})
    for name, opt in trainer.optimizers.items():
        for i, buf in enumerate(opt.state_dict()["state"].values()):
            state[f"{name}.momentum{i}"] = buf["momentum_buffer"]
    return state


def test_resume_is_bitwise(tmp_path):
    # Constant tau: the exp schedule depends on the run length, which the split run changes from 1 to 2 epochs.
    extra = ["method=at", "deterministic=true", "optim.milestones=[1]", "data.train_size=192",
             "strategy.args.gumbel_tau_schedule=constant",
             "data.batch_size=32"]
    straight = Trainer(engine_config(tmp_path, "straight", *extra))
    straight.fit()
    Trainer(engine_config(tmp_path, "split", *extra, "optim.epochs=1")).fit()
    resumed = Trainer.resume(tmp_path / "split", ["optim.epochs=2"])
    resumed.fit()
    a, b = _run_state(straight), _run_state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("policy.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["sakd", "standard"])
def test_loss_scale_moves_once_per_iteration(name):
    # Under float16 AMP the agent and the student steps share one GradScaler: both optimisers step, the scale
    # updates once. A CPU GradScaler with growth_interval 1 doubles the scale at every update, so two iterations
    # take it from 8 to 32 (two updates per iteration would give 128).
    strategy = build(name) if name in ADAPTIVE else build_standard()
    strategy.precision.scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)
    for step in range(2):
        strategy.training_step(*batch(), epoch=1, step=step)
    assert strategy.precision.scaler.get_scale() == 32.0


def build_standard():
    torch.manual_seed(0)
    s = models.staged(models.create("resnet8", num_classes=10))
    t = models.frozen(models.create("resnet14", num_classes=10))
    d, s_spots, t_spots = distillers.create("kd", s, t, (3, SIZE, SIZE))
    strategy = strategies.get("standard")(s, t, d, LossWeights(ce=0.1, method=0.9), s_spots, t_spots)
    optimizers = build_optimizers(strategy.param_groups(), OptimConfig(), 0.05)
    strategy.attach(optimizers, Precision(torch.device("cpu"), False))
    strategy.train(True)
    return strategy
