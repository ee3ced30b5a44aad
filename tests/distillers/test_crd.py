"""CRD: the NCE formula by hand, the class-aware sampler, memory banks, normalisers, masks, zoo pairs."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import adakd.distillers as D
from adakd.distillers.base import DistillContext
from adakd.distillers.crd import CRD, CRDConfig, crd_nce_loss, momentum_update, prefer_row_scoring
from distiller_checks import zoo_model

# Eight samples in three classes of unequal size (3, 3, 2), as in the hand cases below.
TINY_TARGETS = torch.tensor([0, 1, 2, 0, 1, 0, 2, 1])
TINY = CRDConfig(feat_dim=4, num_negatives=3, temperature=0.5, momentum=0.5)


def tiny_crd(config: CRDConfig = TINY, dtype=torch.float64) -> CRD:
    return CRD(["pooled"], [(5,)], [(6,)], config, DistillContext(3, TINY_TARGETS)).to(dtype)


def tiny_batch(batch: int = 4, dtype=torch.float64):
    student = torch.randn(batch, 5, dtype=dtype, requires_grad=True)
    teacher = torch.randn(batch, 6, dtype=dtype)
    indices = torch.tensor([0, 1, 2, 6, 4, 5, 3, 7])[:batch]
    return student, teacher, TINY_TARGETS[indices], indices


def run(crd: CRD, student, teacher, targets, indices, mask=None, seed: int = 1):
    torch.manual_seed(seed)
    masks = None if mask is None else [mask]
    return crd([student], [teacher], targets, masks=masks, indices=indices)["crd/pooled"]


def test_nce_by_hand_with_three_negatives_and_eight_samples():
    probs = torch.tensor([[0.5, 0.1, 0.2, 0.05], [0.01, 0.3, 0.02, 0.9]], dtype=torch.float64)
    noise = 3 / 8  # K * P_n with K = 3, N = 8
    expected = []
    for row in probs.tolist():
        value = math.log(row[0] / (row[0] + noise + 1e-7))
        value += sum(math.log(noise / (p + noise + 1e-7)) for p in row[1:])
        expected.append(-value)
    assert torch.allclose(crd_nce_loss(probs, 8), torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_nce_gradient_matches_finite_differences():
    probs = torch.rand(3, 5, dtype=torch.float64).add(0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: crd_nce_loss(p, 20), (probs,))


def test_negatives_never_share_the_anchor_class_and_cover_every_other_sample():
    targets = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 2, 0, 1, 1])
    crd = CRD(["pooled"], [(4,)], [(4,)], CRDConfig(num_negatives=4000), DistillContext(3, targets))
    anchors = torch.tensor([0, 1, 2, 2])
    negatives = crd.sample_negatives(anchors)
    assert negatives.shape == (4, 4000)
    for row, label in zip(negatives, anchors):
        assert torch.all(targets[row] != label)
        assert set(row.tolist()) == set(torch.nonzero(targets != label).flatten().tolist())
        # Uniform over the other classes: every allowed sample is drawn about equally often.
        counts = torch.bincount(row, minlength=len(targets))[targets != label].double()
        assert counts.min() > 0.7 * counts.mean()


def test_more_negatives_than_other_samples_are_drawn_with_replacement():
    crd = tiny_crd(CRDConfig(num_negatives=50))
    negatives = crd.sample_negatives(torch.tensor([0, 2]))
    assert negatives.shape == (2, 50)
    assert torch.all(TINY_TARGETS[negatives[0]] != 0) and torch.all(TINY_TARGETS[negatives[1]] != 2)


def test_momentum_update_on_a_hand_case():
    rows = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    embeddings = torch.tensor([[0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    got = momentum_update(rows, embeddings, 0.5)
    half = 1 / math.sqrt(2)
    assert torch.allclose(got, torch.tensor([[half, half], [0.6, 0.8]], dtype=torch.float64), atol=1e-15)


def independent_crd(crd: CRD, student, teacher, targets, indices, seed: int = 1):
    """CRD written out directly: (loss, new student memory, new teacher memory, z_s, z_t)."""
    torch.manual_seed(seed)
    negatives = crd.sample_negatives(targets)
    contrast = torch.cat([indices[:, None], negatives], 1)
    v_s = crd.embed_student(student)
    v_s = v_s / v_s.norm(dim=1, keepdim=True)
    v_t = crd.embed_teacher(teacher)
    v_t = v_t / v_t.norm(dim=1, keepdim=True)
    n, k, temperature = crd.n_data, crd.config.num_negatives, crd.config.temperature
    total = 0.0
    zs = []
    for memory, anchor in ((crd.memory_teacher, v_s), (crd.memory_student, v_t)):
        scores = torch.exp(torch.einsum("bkd,bd->bk", memory[contrast], anchor) / temperature)
        z = scores.mean() * n
        zs.append(z)
        probs = (scores / z).tolist()
        for row in probs:
            total -= math.log(row[0] / (row[0] + k / n + 1e-7))
            total -= sum(math.log((k / n) / (p + k / n + 1e-7)) for p in row[1:])
    new_s, new_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    for memory, v in ((new_s, v_s), (new_t, v_t)):
        mixed = 0.5 * memory[indices] + 0.5 * v.detach()
        memory[indices] = mixed / mixed.norm(dim=1, keepdim=True)
    return total / len(indices), new_s, new_t, zs[0], zs[1]


def test_loss_memory_and_normalisers_match_a_direct_computation():
    crd = tiny_crd()
    student, teacher, targets, indices = tiny_batch()
    expected, new_s, new_t, z_s, z_t = independent_crd(copy.deepcopy(crd), student, teacher, targets, indices)
    assert crd.z_student < 0 and crd.z_teacher < 0
    got = run(crd, student, teacher, targets, indices)
    assert abs(got.item() - expected) < 1e-10
    assert torch.allclose(crd.memory_student, new_s, atol=1e-14)
    assert torch.allclose(crd.memory_teacher, new_t, atol=1e-14)
    assert torch.allclose(crd.z_student, z_s.detach()) and torch.allclose(crd.z_teacher, z_t.detach())
    assert torch.allclose(crd.memory_student[indices].norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_normalisers_are_fixed_after_the_first_call():
    crd = tiny_crd()
    student, teacher, targets, indices = tiny_batch()
    run(crd, student, teacher, targets, indices)
    fixed = crd.z_student.clone(), crd.z_teacher.clone()
    run(crd, torch.randn(4, 5, dtype=torch.float64) * 10, torch.randn(4, 6, dtype=torch.float64), targets, indices)
    assert torch.equal(crd.z_student, fixed[0]) and torch.equal(crd.z_teacher, fixed[1])
    assert fixed[0] > 0 and fixed[1] > 0


def test_memory_rows_outside_the_batch_are_untouched():
    crd = tiny_crd()
    before = crd.memory_student.clone(), crd.memory_teacher.clone()
    student, teacher, targets, indices = tiny_batch(3)
    run(crd, student, teacher, targets, indices)
    outside = torch.tensor([i for i in range(8) if i not in indices.tolist()])
    assert torch.equal(crd.memory_student[outside], before[0][outside])
    assert torch.equal(crd.memory_teacher[outside], before[1][outside])
    assert not torch.equal(crd.memory_student[indices], before[0][indices])


def test_all_ones_mask_equals_no_mask_exactly():
    crd = tiny_crd()
    twin = copy.deepcopy(crd)
    student, teacher, targets, indices = tiny_batch()
    plain = run(crd, student, teacher, targets, indices)
    ones = run(twin, student, teacher, targets, indices, mask=torch.ones(4, dtype=torch.float64))
    assert torch.equal(plain, ones)
    assert torch.equal(crd.memory_student, twin.memory_student) and torch.equal(crd.z_teacher, twin.z_teacher)


# Three negatives per class, all from other classes of TINY_TARGETS: with these in place of the random draw, a
# masked batch and its selected sub-batch score the same contrast rows.
FIXED_NEGATIVES = torch.tensor([[1, 2, 4], [0, 2, 3], [0, 1, 3]])


def with_fixed_negatives(crd: CRD) -> CRD:
    crd.sample_negatives = lambda targets: FIXED_NEGATIVES[targets]
    return crd


def sub_batch_reference(crd: CRD, student, teacher, targets, indices, mask):
    """The masked CRD term as it was computed before issue 13: the unmasked CRD on the selected sub-batch (its
    normalisers, its memory rows), times n/B; nothing selected gives a zero and writes nothing."""
    keep = mask > 0.5
    if not keep.any():
        return student.sum() * 0.0
    sub = crd([student[keep]], [teacher[keep]], targets[keep], indices=indices[keep])["crd/pooled"]
    return sub * (int(keep.sum()) / len(mask))


MASKS = {
    "all": [1.0, 1, 1, 1, 1, 1], "none": [0.0, 0, 0, 0, 0, 0], "one": [0.0, 0, 0, 1, 0, 0],
    "two-apart": [1.0, 0, 0, 0, 0, 1], "two-adjacent": [0.0, 1, 1, 0, 0, 0], "half": [1.0, 0, 1, 0, 0, 1],
}


@pytest.mark.parametrize("by_rows", [True, False])
@pytest.mark.parametrize("name", list(MASKS))
def test_mask_equals_the_sub_batch_form_in_loss_gradients_banks_and_normalisers(name, by_rows):
    # Issue 13: the mask is applied as 0/1 weights on the whole batch (no host sync) instead of selecting a
    # sub-batch; with the same negatives every number must stay the sub-batch's, over two steps (the second one
    # scores against the banks and normalisers the first one left).
    crd = with_fixed_negatives(tiny_crd())
    crd.score_by_rows = by_rows
    reference = with_fixed_negatives(copy.deepcopy(crd))
    initial = crd.memory_student.clone()
    mask = torch.tensor(MASKS[name], dtype=torch.float64)
    indices = torch.tensor([0, 1, 2, 6, 4, 5])
    for step in range(2):
        student = torch.randn(6, 5, dtype=torch.float64)
        teacher = torch.randn(6, 6, dtype=torch.float64)
        leaf_new, leaf_ref = student.clone().requires_grad_(), student.clone().requires_grad_()
        got = run(crd, leaf_new, teacher, TINY_TARGETS[indices], indices, mask=mask)
        want = sub_batch_reference(reference, leaf_ref, teacher, TINY_TARGETS[indices], indices, mask)
        assert abs(got.item() - want.item()) <= 1e-12
        got.backward()
        want.backward()
        ref_grad = torch.zeros_like(student) if leaf_ref.grad is None else leaf_ref.grad
        assert torch.allclose(leaf_new.grad, ref_grad, rtol=0, atol=1e-12)
        assert torch.all(leaf_new.grad[mask == 0] == 0)
        for (key, p), q in zip(crd.named_parameters(), reference.parameters()):
            want_grad = torch.zeros_like(p) if q.grad is None else q.grad
            assert torch.allclose(p.grad, want_grad, rtol=0, atol=1e-12), key
        for key, value in crd.state_dict().items():
            assert torch.allclose(value, reference.state_dict()[key], rtol=0, atol=1e-14), key
        crd.zero_grad(), reference.zero_grad()
    untouched = [i for i, m in zip(indices.tolist(), MASKS[name]) if m == 0]
    assert torch.equal(crd.memory_student[untouched], initial[untouched])


def test_masked_step_never_syncs_with_the_host():
    from sync_counter import SyncCounter

    crd = tiny_crd()
    student, teacher, targets, indices = tiny_batch()
    run(crd, student, teacher, targets, indices, mask=torch.tensor([0.0, 1, 0, 1], dtype=torch.float64))
    with SyncCounter() as syncs:
        for mask in ([0.0, 0, 0, 0], [1.0, 0, 0, 1], [1.0, 1, 1, 1]):
            loss = run(crd, student, teacher, targets, indices, mask=torch.tensor(mask, dtype=torch.float64))
            loss.backward()
    assert syncs.count == 0, syncs.report()


def test_no_selected_sample_gives_zero_and_no_update_one_gives_a_normal_loss():
    crd = tiny_crd()
    before = copy.deepcopy(crd.state_dict())
    student, teacher, targets, indices = tiny_batch()
    zero = run(crd, student, teacher, targets, indices, mask=torch.zeros(4, dtype=torch.float64))
    assert zero.item() == 0.0
    zero.backward()
    assert student.grad is None or torch.all(student.grad == 0)
    for key, value in crd.state_dict().items():
        assert torch.equal(value, before[key]), key
    one = run(crd, student, teacher, targets, indices, mask=torch.tensor([0.0, 0, 1, 0], dtype=torch.float64))
    assert torch.isfinite(one) and one > 0 and crd.z_student > 0


def test_teacher_features_get_no_gradient_and_the_teacher_head_trains():
    crd = tiny_crd()
    student, teacher, targets, indices = tiny_batch()
    teacher.requires_grad_(True)
    run(crd, student, teacher, targets, indices).backward()
    assert teacher.grad is None
    assert crd.embed_teacher.weight.grad.abs().sum() > 0 and crd.embed_student.weight.grad.abs().sum() > 0


def test_missing_indices_and_missing_labels_raise():
    crd = tiny_crd()
    student, teacher, targets, _ = tiny_batch()
    with pytest.raises(ValueError, match="CRD needs dataset indices"):
        crd([student], [teacher], targets)
    with pytest.raises(ValueError, match="train_targets"):
        CRD(["pooled"], [(5,)], [(6,)], TINY, DistillContext(3, torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="other classes"):
        CRD(["pooled"], [(5,)], [(6,)], TINY, DistillContext(1, torch.zeros(8, dtype=torch.long)))


def test_state_dict_round_trip_carries_memory_banks_and_normalisers():
    crd = tiny_crd()
    student, teacher, targets, indices = tiny_batch()
    run(crd, student, teacher, targets, indices)
    state = crd.state_dict()
    assert {"memory_student", "memory_teacher", "z_student", "z_teacher"} <= set(state)
    torch.manual_seed(123)
    restored = tiny_crd()
    restored.load_state_dict(state, strict=True)
    assert torch.equal(run(crd, student, teacher, targets, indices, seed=7),
                       run(restored, student, teacher, targets, indices, seed=7))
    assert torch.equal(crd.memory_teacher, restored.memory_teacher)


def test_defaults_and_memory_initialisation():
    assert "crd" in D.available()
    assert CRD.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=0.8, spots=(-2,))
    assert CRDConfig() == CRDConfig(feat_dim=128, num_negatives=16384, temperature=0.07, momentum=0.5)
    crd = CRD(["pooled"], [(8,)], [(8,)], CRDConfig(), DistillContext(10, torch.arange(3000) % 10))
    bound = 1 / math.sqrt(128 / 3)
    assert crd.memory_student.shape == (3000, 128) and crd.memory_student.abs().max() <= bound
    assert crd.memory_student.abs().max() > 0.99 * bound
    assert not torch.equal(crd.memory_student, crd.memory_teacher)


def graph_ops(tensor: torch.Tensor) -> set[str]:
    """Names of every autograd node behind `tensor`."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


def scoring_case(rows: int, batch: int, negatives: int, dtype=torch.float64):
    """A CRD with a `rows`-row bank, a random contrast [batch, 1 + negatives] and unit anchors needing grad."""
    targets = torch.arange(rows) % 3
    crd = CRD(["pooled"], [(5,)], [(6,)], CRDConfig(feat_dim=4, num_negatives=negatives, temperature=0.5),
              DistillContext(3, targets)).to(dtype)
    contrast = torch.randint(0, rows, (batch, 1 + negatives))
    anchor = torch.nn.functional.normalize(torch.randn(batch, 4, dtype=dtype), dim=1).requires_grad_()
    return crd, contrast, anchor


@pytest.mark.parametrize("rows,batch,negatives", [(8, 4, 3), (40, 3, 5)])
def test_row_scoring_equals_gathering_in_values_and_anchor_gradients(rows, batch, negatives):
    torch.manual_seed(0)
    crd, contrast, anchor = scoring_case(rows, batch, negatives)
    weights = torch.randn(batch, 1 + negatives, dtype=torch.float64)
    results = {}
    for by_rows in (True, False):
        scores = crd._scores(crd.memory_teacher, contrast, anchor, by_rows=by_rows)
        (grad,) = torch.autograd.grad((scores * weights).sum(), anchor)
        results[by_rows] = scores.detach(), grad
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-13, atol=0)
    assert torch.allclose(results[True][1], results[False][1], rtol=1e-12, atol=1e-14)
    expected = torch.exp(torch.einsum("bkd,bd->bk", crd.memory_teacher[contrast], anchor.detach()) / 0.5)
    assert torch.allclose(results[True][0], expected, rtol=1e-13, atol=0)


def test_automatic_choice_scores_rows_only_when_the_bank_is_smaller_than_the_contrast():
    memory = torch.zeros(8, 4)
    assert prefer_row_scoring(memory, torch.zeros(3, 3, dtype=torch.long))  # 8 rows < 9 contrast entries
    assert not prefer_row_scoring(memory, torch.zeros(2, 4, dtype=torch.long))  # 8 = 8: gathering is no dearer
    assert not prefer_row_scoring(memory, torch.zeros(1, 5, dtype=torch.long))
    torch.manual_seed(0)
    # 8 rows, B(1 + K) = 2 * 4 = 8 or 3 * 4 = 12: the two sides of the threshold, through _scores itself.
    for batch, by_rows in ((3, True), (2, False)):
        crd, contrast, anchor = scoring_case(8, batch, 3)
        ops = graph_ops(crd._scores(crd.memory_teacher, contrast, anchor))
        assert ("MmBackward0" in ops and "GatherBackward0" in ops) == by_rows
        assert ("BmmBackward0" in ops) != by_rows
    crd.score_by_rows = True  # the switch overrides the shape rule
    assert "GatherBackward0" in graph_ops(crd._scores(crd.memory_teacher, contrast, anchor))


def test_whole_crd_step_with_row_scoring_equals_the_gather_form():
    """Forward, backward and the memory update, over two steps (the second scores the updated banks)."""
    rows_crd = tiny_crd()
    gather_crd = copy.deepcopy(rows_crd)
    rows_crd.score_by_rows, gather_crd.score_by_rows = True, False
    torch.manual_seed(3)
    inputs = [tiny_batch() for _ in range(2)]
    for step, (student, teacher, targets, indices) in enumerate(inputs):
        outcome = {}
        for crd in (rows_crd, gather_crd):
            crd.zero_grad()
            leaf = student.detach().clone().requires_grad_()
            loss = run(crd, leaf, teacher, targets, indices, seed=10 + step)
            loss.backward()
            outcome[crd.score_by_rows] = loss.detach(), leaf.grad, [p.grad.clone() for p in crd.parameters()]
        (loss_r, grad_r, params_r), (loss_g, grad_g, params_g) = outcome[True], outcome[False]
        assert torch.allclose(loss_r, loss_g, rtol=1e-13, atol=0)
        assert torch.allclose(grad_r, grad_g, rtol=1e-11, atol=1e-13)
        assert len(params_r) == 4  # both embedding heads, weight and bias
        for got, want in zip(params_r, params_g):
            assert torch.allclose(got, want, rtol=1e-11, atol=1e-13)
        for name in ("memory_student", "memory_teacher", "z_student", "z_teacher"):
            assert torch.allclose(getattr(rows_crd, name), getattr(gather_crd, name), rtol=1e-13, atol=1e-15), name


def test_in_place_memory_update_does_not_reach_the_row_scored_gradient():
    crd = tiny_crd()
    crd.score_by_rows = True
    untouched = copy.deepcopy(crd)
    student, teacher, targets, indices = tiny_batch()
    # Reference: the same loss, but with the memory write held back until after backward.
    torch.manual_seed(1)
    leaf = student.detach().clone().requires_grad_()
    untouched.contrast(leaf, teacher, targets, indices, pending=[]).backward()
    expected = leaf.grad, [p.grad for p in untouched.parameters()]
    before = crd.memory_teacher.clone()
    loss = run(crd, student, teacher, targets, indices)  # writes the banks in place before this backward
    assert not torch.allclose(crd.memory_teacher[indices], before[indices])  # the update did happen
    loss.backward()
    assert torch.allclose(student.grad, expected[0], rtol=1e-12, atol=1e-14)
    for got, want in zip(crd.parameters(), expected[1]):
        assert torch.allclose(got.grad, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("by_rows", [True, False])
def test_scores_stay_float32_under_autocast(by_rows):
    torch.manual_seed(0)
    config = CRDConfig(feat_dim=4, num_negatives=5)  # the real temperature, 0.07
    crd = CRD(["pooled"], [(5,)], [(6,)], config, DistillContext(3, torch.arange(40) % 3))
    contrast = torch.randint(0, 40, (3, 6))
    anchor = torch.nn.functional.normalize(torch.randn(3, 4), dim=1).requires_grad_()  # at T = 0.07, exp(<= 14.3)
    plain = crd._scores(crd.memory_teacher, contrast, anchor, by_rows=by_rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = crd._scores(crd.memory_teacher, contrast, anchor, by_rows=by_rows)
    assert under_autocast.dtype == torch.float32 and torch.isfinite(under_autocast).all()
    assert torch.equal(under_autocast, plain)


# (teacher, student, CRD embed parameters from model-zoo.md §6)
PAIRS = [
    ("resnet32x4", "resnet8x4", 65_792),
    ("vgg13", "vgg8", 131_328),
    ("wrn_40_2", "wrn_16_2", 33_024),
    ("resnet32x4", "ShuffleV1", 155_904),
    ("vgg13", "MobileNetV2", 229_632),
    ("ResNet50", "MobileNetV2", 426_240),
]


@pytest.mark.parametrize("teacher_name,student_name,embed_params", PAIRS)
def test_zoo_pairs_build_the_documented_heads_and_run(teacher_name, student_name, embed_params):
    (student, student_feats), (teacher, teacher_feats) = zoo_model(student_name), zoo_model(teacher_name)
    context = DistillContext(100, torch.arange(500) % 100)
    crd, student_spots, teacher_spots = D.create("crd", student, teacher, (3, 32, 32), context=context)
    assert sum(p.numel() for p in crd.parameters()) == embed_params
    assert crd.memory_student.shape == crd.memory_teacher.shape == (500, 128)
    student_feats = [student_feats[k].clone().requires_grad_() for k in student_spots]
    teacher_feats = [teacher_feats[k] for k in teacher_spots]
    indices = torch.tensor([3, 10, 200, 499])
    out = crd(student_feats, teacher_feats, context.train_targets[indices], indices=indices)
    assert list(out) == ["crd/pooled"] and torch.isfinite(out["crd/pooled"])
    out["crd/pooled"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in crd.parameters())
