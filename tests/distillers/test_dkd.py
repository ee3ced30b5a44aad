"""DKD: TCKD and NCKD by hand, the KD decomposition identity, warm-up, masks, gradients, zoo pairs."""
from __future__ import annotations

import math

import pytest
import torch

import adakd.distillers as D
from adakd.distillers.dkd import DKD, DKDConfig, dkd_loss, dkd_parts
from adakd.distillers.kd import kd_loss
from distiller_checks import PAIRS, assert_gradients_follow_mask, check_gradient, zoo_pair


def parts_by_hand(student, teacher, target, temperature):
    def softmax(row):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    ps, pt = softmax(student), softmax(teacher)
    tckd = kl([pt[target], 1 - pt[target]], [ps[target], 1 - ps[target]])
    rest_s = [p / (1 - ps[target]) for k, p in enumerate(ps) if k != target]
    rest_t = [p / (1 - pt[target]) for k, p in enumerate(pt) if k != target]
    return temperature**2 * tckd, temperature**2 * kl(rest_t, rest_s)


def test_dkd_parts_by_hand():
    student = torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.0, -1.0, 2.0, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 4.0, -2.0]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    tckd, nckd = dkd_parts(student, teacher, targets, 2.0)
    for b in range(2):
        t_hand, n_hand = parts_by_hand(student[b].tolist(), teacher[b].tolist(), int(targets[b]), 2.0)
        assert math.isclose(tckd[b].item(), t_hand, rel_tol=1e-12)
        assert math.isclose(nckd[b].item(), n_hand, rel_tol=1e-12)
    loss = dkd_loss(student, teacher, targets, alpha=1.5, beta=8.0, temperature=2.0, warmup=0.25)
    assert torch.allclose(loss, 0.25 * (1.5 * tckd + 8.0 * nckd), rtol=1e-15)


def test_kd_is_tckd_plus_weighted_nckd_exactly():
    torch.manual_seed(3)
    student, teacher = torch.randn(16, 10, dtype=torch.float64) * 3, torch.randn(16, 10, dtype=torch.float64) * 3
    targets = torch.randint(0, 10, (16,))
    tckd, nckd = dkd_parts(student, teacher, targets, 4.0)
    p_target = torch.softmax(teacher / 4.0, dim=1).gather(1, targets[:, None]).squeeze(1)
    error = (kd_loss(student, teacher, 4.0) - (tckd + (1 - p_target) * nckd)).abs().max()
    assert error < 1e-13


def test_dkd_stays_finite_when_a_float32_softmax_saturates():
    student = torch.tensor([[200.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 0.0]])
    targets = torch.tensor([0])
    got = torch.stack(dkd_parts(student, teacher, targets, 1.0))
    expected = torch.stack(dkd_parts(student.double(), teacher.double(), targets, 1.0))
    assert torch.isfinite(got).all() and torch.allclose(got.double(), expected, rtol=1e-5)


def test_dkd_gradient_matches_finite_differences():
    check_gradient(dkd_loss, (3, 5), (3, 5), torch.tensor([0, 3, 4]), 1.0, 8.0, 4.0)


def test_dkd_module_warmup_masks_and_teacher():
    dkd = DKD(["logits"], [(5,)], [(5,)], DKDConfig(alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20))
    student = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    full = dkd([student], [teacher], targets, epoch=20)["dkd/logits"]
    assert torch.equal(full, dkd([student], [teacher], targets, epoch=240)["dkd/logits"])
    assert torch.equal(full, dkd([student], [teacher], targets, masks=[torch.ones(6)], epoch=20)["dkd/logits"])
    assert torch.allclose(full, dkd_loss(student, teacher, targets, 1.0, 8.0, 4.0).mean())
    assert torch.allclose(dkd([student], [teacher], targets, epoch=5)["dkd/logits"], full * 0.25)
    mask = torch.tensor([1.0, 0, 1, 0, 0, 1])
    masked = dkd([student], [teacher], targets, masks=[mask], epoch=1)["dkd/logits"]
    assert torch.allclose(masked, (dkd_loss(student, teacher, targets, 1.0, 8.0, 4.0, 1 / 20) * mask).sum() / 6)
    masked.backward()
    assert_gradients_follow_mask(student, mask)
    assert teacher.grad is None and not dkd.state_dict()


def test_dkd_rejects_two_classes_and_unequal_logits():
    with pytest.raises(ValueError, match="at least 3 classes"):
        DKD(["logits"], [(2,)], [(2,)])
    with pytest.raises(ValueError, match="equal size"):
        DKD(["logits"], [(10,)], [(100,)])


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_dkd_on_zoo_pairs(teacher_name, student_name):
    pair = zoo_pair("dkd", teacher_name, student_name, targets=torch.tensor([0, 1, 2, 99]), epoch=20)
    assert pair.distiller.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=1.0, spots=(-1,))
    assert pair.distiller.config == DKDConfig(alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20)
    assert list(pair.out) == ["dkd/logits"] and torch.isfinite(pair.out["dkd/logits"])


def test_target_mask_is_built_without_a_host_sync():
    # Issue 13: one_hot checks the label range with .item() calls; the scatter-built mask gives the same loss.
    from sync_counter import SyncCounter

    import torch.nn.functional as F
    from adakd.distillers.dkd import dkd_parts

    student, teacher = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    with SyncCounter() as syncs:
        tckd, nckd = dkd_parts(student, teacher, targets, 4.0)
    assert syncs.count == 0, syncs.report()
    # The one_hot form it replaces: NCKD through the -1000 offset on the target logit, TCKD through the mask.
    one_hot = F.one_hot(targets, 5).double()
    rest_s = F.log_softmax(student / 4.0 - 1000.0 * one_hot, dim=1)
    rest_t = F.log_softmax(teacher / 4.0 - 1000.0 * one_hot, dim=1)
    assert torch.allclose(nckd, (rest_t.exp() * (rest_t - rest_s)).sum(1) * 16.0, rtol=0, atol=1e-12)
