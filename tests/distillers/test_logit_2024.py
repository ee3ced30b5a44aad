"""WSLD, TTM, WTTM and NKD (issue 21): each loss's value and gradient against the published formula written out
by hand, hand-worked small cases, per-sample masks, the 2-class refusal of NKD and DKD, and short runs on the
synthetic set under standard, SAKD and ABL."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import adakd.distillers as D
from adakd.distillers.dkd import DKD
from adakd.distillers.nkd import NKD, NKDConfig, nkd_loss
from adakd.distillers.ttm import TTM, WTTM, TTMConfig, WTTMConfig, ttm_loss, ttm_parts, wttm_loss
from adakd.distillers.wsld import WSLD, WSLDConfig, wsld_loss, wsld_weight
from distiller_checks import (LEARNING_STRATEGIES, learning_run, assert_learned, assert_gradients_follow_mask,
                              check_float32_under_autocast, fixed_logits, one_spot)
from markers import slow_except

B, C = 5, 7


def fixed_inputs(seed: int = 0):
    """Float64 student (requires grad) and teacher logits of B x C, spread enough to be far from uniform."""
    student, teacher = fixed_logits(seed, B, C)
    targets = torch.tensor([0, 3, 6, 2, 3])
    return student, teacher, targets


# ---- the published formulas, one sample and one class at a time (a code path of their own)


def softmax_row(row, temperature: float = 1.0) -> list:
    exps = [torch.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def wsld_by_formula(student, teacher, targets, temperature: float, detach_weight: bool = True) -> torch.Tensor:
    """WSLD eqs.: l_i = T^2 w_i (-sum_c p_t,c^T log p_s,c^T), w_i = 1 - exp(-CE(y, p_s) / CE(y, p_t)) at T = 1."""
    losses = []
    for i in range(len(student)):
        s_row, t_row, y = list(student[i]), list(teacher[i]), int(targets[i])
        p_t, p_s = softmax_row(t_row, temperature), softmax_row(s_row, temperature)
        soft = -sum(p_t[c] * torch.log(p_s[c]) for c in range(len(s_row)))
        weight_source = [v.detach() for v in s_row] if detach_weight else s_row
        ce_s = -torch.log(softmax_row(weight_source)[y])
        ce_t = -torch.log(softmax_row(t_row)[y])
        weight = 1 - torch.exp(-torch.clamp(ce_s / (ce_t + 1e-7), min=0.0))
        losses.append(temperature**2 * weight * soft)
    return torch.stack(losses)


def ttm_by_formula(student, teacher, power: float, weighted: bool) -> torch.Tensor:
    """TTM: KL(p_t^l / sum p_t^l || p_s); WTTM multiplies it by U = sum_c p_t,c^l (no temperature, no T^2)."""
    losses = []
    for i in range(len(student)):
        p_t, p_s = softmax_row(list(teacher[i])), softmax_row(list(student[i]))
        powered = [p ** power for p in p_t]
        norm = sum(powered)
        q = [p / norm for p in powered]
        kl = sum(q[c] * (torch.log(q[c]) - torch.log(p_s[c])) for c in range(len(q)))
        losses.append(norm * kl if weighted else kl)
    return torch.stack(losses)


def nkd_by_formula(student, teacher, targets, temperature: float, gamma: float,
                   keep_target: bool = False) -> torch.Tensor:
    """NKD: -p_t,y log p_s,y - gamma T^2 sum_{c != y} q_t,c log q_s,c, q renormalised over the non-target classes.

    `keep_target` is the buggy stored version (e21ad37 / 1c2c0ff): its mask keeps every class.
    """
    losses = []
    for i in range(len(student)):
        s_row, t_row, y = list(student[i]), list(teacher[i]), int(targets[i])
        target = -softmax_row(t_row)[y].detach() * torch.log(softmax_row(s_row)[y])
        kept = [c for c in range(len(s_row)) if keep_target or c != y]
        q_t = softmax_row([t_row[c] for c in kept], temperature)
        q_s = softmax_row([s_row[c] for c in kept], temperature)
        non_target = -sum(a * torch.log(b) for a, b in zip(q_t, q_s))
        losses.append(target + gamma * temperature**2 * non_target)
    return torch.stack(losses)


def assert_value_and_gradient(loss, reference, student) -> None:
    """Per-sample values equal; the student gradients of a random weighting of both equal."""
    assert torch.allclose(loss, reference, rtol=1e-12, atol=1e-13)
    coefficients = torch.rand(len(loss), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = torch.autograd.grad((loss * coefficients).sum(), student)[0]
    expected = torch.autograd.grad((reference * coefficients).sum(), student)[0]
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-13)
    assert got.abs().sum() > 0


# ---- value and gradient against the formulas


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_wsld_matches_the_published_formula(temperature):
    student, teacher, targets = fixed_inputs()
    assert_value_and_gradient(wsld_loss(student, teacher, targets, temperature),
                              wsld_by_formula(student, teacher, targets, temperature), student)


def test_wsld_weight_carries_no_gradient():
    student, teacher, targets = fixed_inputs(1)
    assert not wsld_weight(student, teacher, targets).requires_grad
    loss = wsld_loss(student, teacher, targets, 4.0)
    got = torch.autograd.grad(loss.sum(), student)[0]
    # A weight that let gradients through would differ: the check below can fail.
    through_weight = wsld_by_formula(student, teacher, targets, 4.0, detach_weight=False)
    assert torch.allclose(loss, through_weight)
    assert not torch.allclose(got, torch.autograd.grad(through_weight.sum(), student)[0], rtol=1e-3)


@pytest.mark.parametrize("power", [0.1, 0.5])
def test_ttm_and_wttm_match_the_published_formulas(power):
    student, teacher, _ = fixed_inputs(2)
    assert_value_and_gradient(ttm_loss(student, teacher, power), ttm_by_formula(student, teacher, power, False),
                              student)
    assert_value_and_gradient(wttm_loss(student, teacher, power), ttm_by_formula(student, teacher, power, True),
                              student)


def test_wttm_weight_is_the_power_sum_and_a_constant():
    student, teacher, _ = fixed_inputs(3)
    teacher.requires_grad_()
    kl, norm = ttm_parts(student, teacher, 0.2)
    assert torch.allclose(norm, torch.softmax(teacher, 1).pow(0.2).sum(1), rtol=1e-13)
    assert torch.all(norm >= 1) and torch.all(norm <= C ** 0.8)  # 1 for a one-hot teacher, C^(1-l) for a uniform one
    weighted = wttm_loss(student, teacher, 0.2)
    assert torch.allclose(weighted, norm * kl, rtol=1e-14)
    # U_i is a constant: the teacher's gradient is U_i times the KL's, not the product rule's.
    got = torch.autograd.grad(weighted.sum(), teacher)[0]
    expected = torch.autograd.grad((norm.detach() * ttm_loss(student, teacher, 0.2)).sum(), teacher)[0]
    assert torch.allclose(got, expected, rtol=1e-12)
    product_rule = torch.autograd.grad((norm * ttm_loss(student, teacher, 0.2)).sum(), teacher)[0]
    assert not torch.allclose(got, product_rule, rtol=1e-3)


def test_ttm_is_kd_against_a_teacher_at_temperature_one_over_l():
    student, teacher, _ = fixed_inputs(4)
    log_q = torch.log_softmax(teacher / 4.0, 1)  # l = 0.25
    kl = (log_q.exp() * (log_q - torch.log_softmax(student, 1))).sum(1)
    assert torch.allclose(ttm_loss(student, teacher, 0.25), kl, rtol=1e-12)


@pytest.mark.parametrize("temperature, gamma", [(1.0, 1.5), (3.0, 3.5)])
def test_nkd_matches_the_published_formula(temperature, gamma):
    student, teacher, targets = fixed_inputs(5)
    assert_value_and_gradient(nkd_loss(student, teacher, targets, temperature, gamma),
                              nkd_by_formula(student, teacher, targets, temperature, gamma), student)


def test_nkd_excludes_the_target_unlike_the_buggy_version():
    student, teacher, targets = fixed_inputs(6)
    fixed = nkd_loss(student, teacher, targets, 3.0, 3.5)
    buggy = nkd_by_formula(student, teacher, targets, 3.0, 3.5, keep_target=True)
    assert torch.all((fixed - buggy).abs() > 1e-3), (fixed, buggy)
    # The target logit has no say in the non-target term: moving it changes only the target term.
    moved = teacher.clone()
    moved[torch.arange(B), targets] += 5.0
    rest = nkd_loss(student, moved, targets, 3.0, 3.5) - nkd_loss(student, moved, targets, 3.0, 0.0)
    assert torch.allclose(rest, fixed - nkd_loss(student, teacher, targets, 3.0, 0.0), rtol=1e-12)


# ---- hand-worked small cases


def test_ttm_and_wttm_by_hand_on_two_classes():
    # Teacher [ln 4, 0] -> p_t = [0.8, 0.2]; l = 0.5 -> p_t^l = [sqrt .8, sqrt .2] = [0.894427, 0.447214],
    # U = 1.341641, transformed teacher q = [2/3, 1/3]. Student [0, 0] -> [1/2, 1/2].
    # KL = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.191788 - 0.135155 = 0.056633; WTTM = U * KL = 0.075981.
    student = torch.zeros(1, 2, dtype=torch.float64)
    teacher = torch.tensor([[math.log(4.0), 0.0]], dtype=torch.float64)
    kl = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    assert math.isclose(ttm_loss(student, teacher, 0.5).item(), kl, rel_tol=1e-12)
    assert math.isclose(kl, 0.056633, abs_tol=1e-6)
    norm = math.sqrt(0.8) + math.sqrt(0.2)
    assert math.isclose(wttm_loss(student, teacher, 0.5).item(), norm * kl, rel_tol=1e-12)
    assert math.isclose(norm * kl, 0.075981, abs_tol=1e-6)


def test_wsld_by_hand_on_two_classes():
    # T = 1, label 0. Teacher [ln 3, 0] -> [3/4, 1/4]; student [0, 0] -> [1/2, 1/2].
    # Soft CE = -(3/4 + 1/4) ln(1/2) = ln 2 = 0.693147. CE_s = ln 2, CE_t = ln(4/3) = 0.287682,
    # ratio = 2.409421, w = 1 - exp(-2.409421) = 1 - 0.089867 = 0.910133; loss = w ln 2 = 0.630856 (alpha is outside).
    student = torch.zeros(1, 2, dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    weight = 1 - math.exp(-math.log(2) / (math.log(4 / 3) + 1e-7))
    got = wsld_loss(student, teacher, torch.tensor([0]), 1.0).item()
    assert math.isclose(got, weight * math.log(2), rel_tol=1e-12)
    assert math.isclose(got, 0.630856, abs_tol=1e-6)


def test_nkd_by_hand_on_three_classes():
    # Label 0, T = 2, gamma = 1.5. Teacher [ln 10, 2 ln 3, 0] -> softmax at T = 1: [10, 9, 1] / 20, so p_t,y = 1/2.
    # Student [0, 0, 0] -> p_s,y = 1/3. Target term = -1/2 ln(1/3) = 0.549306.
    # Non-target classes {1, 2}: teacher [2 ln 3, 0] / 2 = [ln 3, 0] -> [3/4, 1/4]; student -> [1/2, 1/2];
    # CE = ln 2. Non-target term = gamma T^2 ln 2 = 6 ln 2 = 4.158883. NKD = 4.708189.
    # The buggy version keeps class 0: teacher at T = 2 over all three, student uniform -> CE = ln 3, whatever the
    # teacher; non-target term 6 ln 3 = 6.591674, NKD 7.140980.
    student = torch.zeros(1, 3, dtype=torch.float64)
    teacher = torch.tensor([[math.log(10.0), 2 * math.log(3.0), 0.0]], dtype=torch.float64)
    got = nkd_loss(student, teacher, torch.tensor([0]), 2.0, 1.5).item()
    assert math.isclose(got, math.log(3) / 2 + 6 * math.log(2), rel_tol=1e-12)
    assert math.isclose(got, 4.708189, abs_tol=1e-6)
    buggy = nkd_by_formula(student, teacher, torch.tensor([0]), 2.0, 1.5, keep_target=True).item()
    assert math.isclose(buggy, math.log(3) / 2 + 6 * math.log(3), rel_tol=1e-12)


# ---- modules: masks, precision, defaults

MODULES = {
    "wsld": lambda: WSLD(["logits"], [(C,)], [(C,)], WSLDConfig(temperature=4.0)),
    "ttm": lambda: TTM(["logits"], [(C,)], [(C,)], TTMConfig(power=0.1)),
    "wttm": lambda: WTTM(["logits"], [(C,)], [(C,)], WTTMConfig(power=0.2)),
    "nkd": lambda: NKD(["logits"], [(C,)], [(C,)], NKDConfig(temperature=3.0, gamma=3.5)),
}
PER_SAMPLE = {
    "wsld": lambda s, t, y: wsld_loss(s, t, y, 4.0),
    "ttm": lambda s, t, y: ttm_loss(s, t, 0.1),
    "wttm": lambda s, t, y: wttm_loss(s, t, 0.2),
    "nkd": lambda s, t, y: nkd_loss(s, t, y, 3.0, 3.5),
}


@pytest.mark.parametrize("name", MODULES)
def test_masks_all_ones_all_zeros_and_a_subset(name):
    module, per_sample = MODULES[name](), PER_SAMPLE[name]
    student, teacher, targets = fixed_inputs(7)
    teacher.requires_grad_()
    key = f"{name}/logits"
    plain = one_spot(module, key, student, teacher, targets)
    assert torch.equal(plain, one_spot(module, key, student, teacher, targets, masks=[torch.ones(B)]))
    assert torch.allclose(plain, per_sample(student, teacher, targets).mean(), rtol=1e-14)
    assert one_spot(module, key, student, teacher, targets, masks=[torch.zeros(B)]).item() == 0.0
    mask = torch.tensor([1.0, 0, 1, 1, 0])
    keep = mask.bool()
    masked = one_spot(module, key, student, teacher, targets, masks=[mask])
    sub_batch = one_spot(module, key, student[keep], teacher[keep], targets[keep])
    assert torch.allclose(masked, sub_batch * int(keep.sum()) / B, rtol=1e-13)
    masked.backward()
    assert_gradients_follow_mask(student, mask)
    assert teacher.grad is None and not module.state_dict()


@pytest.mark.parametrize("name", MODULES)
def test_float32_under_autocast(name):
    targets = torch.tensor([0, 3, 6, 2])
    check_float32_under_autocast(lambda s, t: PER_SAMPLE[name](s, t, targets), (4, C), (4, C))


@pytest.mark.parametrize("name, defaults, config", [
    ("wsld", D.DistillerDefaults(1.0, 2.25, (-1,)), WSLDConfig(temperature=4.0)),
    ("ttm", D.DistillerDefaults(1.0, 45.0, (-1,)), TTMConfig(power=0.1)),
    ("wttm", D.DistillerDefaults(1.0, 4.0, (-1,)), WTTMConfig(power=0.2)),
    ("nkd", D.DistillerDefaults(1.0, 1.0, (-1,)), NKDConfig(temperature=3.0, gamma=3.5)),
])
def test_authors_cifar_defaults(name, defaults, config):
    cls = D.get(name)
    assert cls.defaults == defaults and cls.config_class() == config
    assert name in D.available(tag="classic")


@pytest.mark.parametrize("name", MODULES)
def test_unequal_or_non_vector_logits_are_refused(name):
    cls = D.get(name)
    with pytest.raises(ValueError, match=f"{name} needs logit vectors of equal size"):
        cls(["logits"], [(10,)], [(100,)])
    with pytest.raises(ValueError, match=f"{name} needs logit vectors"):
        cls(["stage3"], [(8, 4, 4)], [(8, 4, 4)])


@pytest.mark.parametrize("name, config", [("ttm", TTMConfig), ("wttm", WTTMConfig)])
@pytest.mark.parametrize("power", [0.0, -0.5, float("nan")])
def test_a_power_that_is_not_positive_is_refused(name, config, power):
    with pytest.raises(ValueError, match=rf"{name} needs distill.args.power > 0 \(the teacher's temperature is "
                                         rf"1/power; the authors use 0.1-0.2\), got {power}"):
        D.get(name)(["logits"], [(C,)], [(C,)], config(power=power))


# ---- two classes


def two_class_context(num_classes: int = 2) -> D.DistillContext:
    return D.DistillContext(num_classes=num_classes, train_targets=torch.arange(8) % num_classes)


@pytest.mark.parametrize("cls, name, term", [(NKD, "nkd", "non-target"), (DKD, "dkd", "NCKD")])
def test_nkd_and_dkd_refuse_two_classes_at_construction(cls, name, term):
    expected = (f"{name} needs at least 3 classes, got 2: its {term} term compares the distributions over the "
                "non-target classes, and with 2 classes that distribution has only one class, so the term is "
                "identically zero; use kd (or wsld, ttm) instead")
    with pytest.raises(ValueError) as err:
        cls(["logits"], [(2,)], [(2,)], context=two_class_context())
    assert str(err.value) == expected
    # The dataset's class count is read too, whatever the logit width.
    with pytest.raises(ValueError, match=f"{name} needs at least 3 classes, got 2"):
        cls(["logits"], [(10,)], [(10,)], context=two_class_context())
    with pytest.raises(ValueError, match="got 1: .* with 1 class it is empty, so the term is undefined"):
        cls(["logits"], [(1,)], [(1,)])
    cls(["logits"], [(3,)], [(3,)], context=two_class_context(3))  # 3 classes are fine


@pytest.mark.parametrize("name", ["wsld", "ttm", "wttm"])
def test_wsld_and_ttm_are_fine_with_two_classes(name):
    module = D.get(name)(["logits"], [(2,)], [(2,)], context=two_class_context())
    student = torch.randn(4, 2, requires_grad=True)
    term = one_spot(module, f"{name}/logits", student, torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
    term.backward()
    assert torch.isfinite(term) and term > 0 and student.grad.abs().sum() > 0


@pytest.mark.parametrize("method, term", [("nkd", "non-target"), ("dkd", "NCKD")])
def test_two_class_data_through_the_cli_is_one_error_line(tmp_path, capsys, method, term):
    from cli_checks import fails
    from data.fake_data_files import write_png
    from tiny_run import save_random_teacher

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for name in ("ant", "bee"):
            for k in range(2):
                image = rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)
                write_png(tmp_path / "imgs" / split / name / f"{k}.png", image)
    out = tmp_path / "runs"
    argv = ["distill", "dataset=folder", f"data.root={tmp_path / 'imgs'}", "data.image_size=16", "model.name=resnet8",
            "teacher.name=resnet8", f"teacher.weights={save_random_teacher(tmp_path / 't.pth', num_classes=2)}",
            f"method={method}", "log.progress=false", "log.tensorboard=false", "data.batch_size=4",
            "data.num_workers=0", "optim.milestones=[]", "epochs=1", f"out_dir={out}", "name=run"]
    fails(capsys, argv, f"{method} cannot distill resnet8 -> resnet8: {method} needs at least 3 classes, got 2",
          f"its {term} term", "identically zero; use kd (or wsld, ttm) instead")
    assert not out.exists() or not any(out.iterdir())


# ---- learning on the synthetic set under standard, SAKD and ABL

METHODS = ["wsld", "ttm", "wttm", "nkd"]
CASES = [(method, strategy) for method in METHODS for strategy in LEARNING_STRATEGIES]
# The inner loop keeps a diagonal that still runs every method and every strategy; CI runs all twelve.
INNER_LOOP = ["wsld-standard", "ttm-sakd", "wttm-abl", "nkd-standard"]


@pytest.mark.parametrize("method, strategy", slow_except(CASES, INNER_LOOP))
def test_learns_on_the_synthetic_set(tmp_path, synthetic_teacher, method, strategy):
    rows = learning_run(tmp_path, synthetic_teacher, method, strategy)
    assert_learned(rows, strategy)
