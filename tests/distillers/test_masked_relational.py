"""Issue 13: relational losses (SP, CC, RKD, PKT) take a mask as 0/1 weights on the whole batch, with no host
sync, and give the numbers and gradients of the sub-batch form they replace (kept below as the reference)."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from adakd.distillers.base import relational_term, zero_like_loss
from adakd.distillers.cc import cc_loss
from adakd.distillers.pkt import pkt_loss
from adakd.distillers.rkd import rkd_loss
from adakd.distillers.sp import sp_loss
from sync_counter import SyncCounter


def sub_batch_relational_term(loss_fn, student, teacher, mask, min_samples: int = 2):
    """`relational_term` as it was before issue 13: boolean selection of the sub-batch (a host sync)."""
    if mask is None:
        return loss_fn(student, teacher)
    keep = mask > 0.5
    count = int(keep.sum())
    if count < min_samples:
        return zero_like_loss(student)
    return loss_fn(student[keep], teacher[keep]) * (count / student.shape[0])


B = 7
LOSSES = {
    "sp": (sp_loss, (4, 3, 3), (5, 3, 3)),
    "cc": (cc_loss, (6,), (6,)),
    "rkd": (partial(rkd_loss, distance_weight=25.0, angle_weight=50.0, eps=1e-12), (6,), (8,)),
    "pkt": (partial(pkt_loss, eps=1e-7), (6,), (8,)),
}
MASKS = {
    "all": [1] * B, "none": [0] * B, "first": [1, 0, 0, 0, 0, 0, 0], "last": [0, 0, 0, 0, 0, 0, 1],
    "two-adjacent": [0, 0, 1, 1, 0, 0, 0], "two-apart": [1, 0, 0, 0, 0, 0, 1], "three": [0, 1, 0, 1, 0, 0, 1],
    "all-but-one": [1, 1, 1, 0, 1, 1, 1],
}
RANDOM_MASKS = [(torch.rand(B, generator=torch.Generator().manual_seed(k)) < 0.5).double().tolist()
                for k in range(6)]


def features(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g, dtype=torch.float64, requires_grad=True)


def value_and_gradients(term, loss_fn, student, teacher, mask, min_samples):
    s, t = student.detach().clone().requires_grad_(), teacher.detach().clone().requires_grad_()
    value = term(loss_fn, s, t, mask, min_samples)
    value.backward()
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in (s, t)]
    return value.detach(), grads


@pytest.mark.parametrize("min_samples", [1, 2, 3])
@pytest.mark.parametrize("mask", list(MASKS.values()) + RANDOM_MASKS,
                         ids=list(MASKS) + [f"random{k}" for k in range(len(RANDOM_MASKS))])
@pytest.mark.parametrize("method", list(LOSSES))
def test_weighted_form_equals_the_sub_batch_form_in_value_and_gradients(method, mask, min_samples):
    loss_fn, student_shape, teacher_shape = LOSSES[method]
    student, teacher = features(student_shape, 1), features(teacher_shape, 2)
    mask = torch.tensor(mask, dtype=torch.float64)
    got, got_grads = value_and_gradients(relational_term, loss_fn, student, teacher, mask, min_samples)
    want, want_grads = value_and_gradients(sub_batch_relational_term, loss_fn, student, teacher, mask, min_samples)
    assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item()))
    if int(mask.sum()) < min_samples:
        assert got.item() == 0.0  # exactly zero, as the reference's fresh zero
    for g, w in zip(got_grads, want_grads):
        assert torch.isfinite(g).all()
        assert torch.allclose(g, w, rtol=0, atol=1e-12)
    assert torch.all(got_grads[0][mask == 0] == 0)  # unselected samples: exactly no gradient


@pytest.mark.parametrize("method", list(LOSSES))
def test_masked_relational_terms_never_sync_with_the_host(method):
    loss_fn, student_shape, teacher_shape = LOSSES[method]
    student, teacher = features(student_shape, 1), features(teacher_shape, 2)
    with SyncCounter() as syncs:
        for mask in ([0.0] * B, [1.0] + [0.0] * (B - 1), MASKS["three"], [1.0] * B):
            relational_term(loss_fn, student, teacher, torch.tensor(mask, dtype=torch.float64)).backward()
    assert syncs.count == 0, syncs.report()
    # The reference does sync: the counter sees what the weighted form avoids.
    with SyncCounter() as syncs:
        sub_batch_relational_term(loss_fn, student, teacher, torch.tensor(MASKS["three"], dtype=torch.float64))
    assert syncs.count > 0
