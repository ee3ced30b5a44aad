"""ReviewKD: HCL weights by hand, the warm-up ramp, ABF fusion shapes on zoo pairs, masks, state."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import adakd.distillers as D
from adakd.distillers.reviewkd import ReviewKD, ReviewKDConfig, hcl_loss, warmup_factor
from distiller_checks import PAIRS, check_gradient, staged_model, zoo_outputs


def mse(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def test_hcl_on_a_two_by_two_map_uses_full_resolution_and_the_global_mean():
    # Pool sizes 4 and 2 are skipped (>= the map's height 2); size 1 gets weight 1/2.
    student = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    teacher = torch.tensor([[[[0.0, 2.0], [1.0, 1.0]]], [[[1.0, -1.0], [2.0, 2.0]]]], dtype=torch.float64)
    expected = []
    for s, t in zip(student.flatten(1).tolist(), teacher.flatten(1).tolist()):
        full = mse(s, t)
        global_mean = (sum(s) / 4 - sum(t) / 4) ** 2
        expected.append((full + 0.5 * global_mean) / 1.5)
    assert torch.allclose(hcl_loss(student, teacher), torch.tensor(expected, dtype=torch.float64), atol=1e-14)


def test_hcl_on_an_eight_by_eight_map_uses_every_pool_size():
    student = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    teacher = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    diff = student - teacher
    terms = [diff.pow(2).mean(dim=(1, 2, 3))]
    for size in (4, 2, 1):  # non-overlapping block means, written without adaptive pooling
        block = 8 // size
        means = diff.reshape(3, 2, size, block, size, block).mean(dim=(3, 5))
        terms.append(means.pow(2).mean(dim=(1, 2, 3)))
    expected = (terms[0] + terms[1] / 2 + terms[2] / 4 + terms[3] / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    assert torch.allclose(hcl_loss(student, teacher), expected, atol=1e-14)


def test_hcl_on_a_one_by_one_map_is_plain_mse_and_its_batch_mean_is_mdistillers():
    student, teacher = torch.randn(4, 5, 1, 1), torch.randn(4, 5, 1, 1)
    assert torch.allclose(hcl_loss(student, teacher), (student - teacher).pow(2).flatten(1).mean(1))
    student, teacher = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    # Map of height 4: sizes 2 and 1 are used (weights 1/2, 1/4).
    pooled = [F.mse_loss(F.adaptive_avg_pool2d(student, k), F.adaptive_avg_pool2d(teacher, k)) for k in (2, 1)]
    reference = (F.mse_loss(student, teacher) + pooled[0] / 2 + pooled[1] / 4) / 1.75
    assert torch.allclose(hcl_loss(student, teacher).mean(), reference, atol=1e-6)


def test_hcl_gradient_matches_finite_differences():
    check_gradient(hcl_loss, (2, 2, 4, 4), (2, 2, 4, 4))


def test_warmup_ramp():
    assert [warmup_factor(e, 20) for e in (1, 10, 19, 20, 21, 240)] == [0.05, 0.5, 0.95, 1.0, 1.0, 1.0]
    assert warmup_factor(1, 0) == 1.0


def tiny_reviewkd():
    # Three levels shallow to deep: 4x4 and 2x2 maps and a pooled vector; the teacher differs in width and size.
    return ReviewKD(["stage1", "stage2", "pooled"], [(3, 4, 4), (5, 2, 2), (6,)], [(2, 8, 8), (4, 4, 4), (7,)],
                    ReviewKDConfig(), None).double().eval()


def tiny_feats(batch=4):
    student = [torch.randn(batch, 3, 4, 4), torch.randn(batch, 5, 2, 2), torch.randn(batch, 6)]
    teacher = [torch.randn(batch, 2, 8, 8), torch.randn(batch, 4, 4, 4), torch.randn(batch, 7)]
    student = [s.double().requires_grad_() for s in student]
    return student, [t.double() for t in teacher]


def test_module_terms_are_per_level_hcl_times_the_ramp():
    distiller = tiny_reviewkd()
    student, teacher = tiny_feats()
    labels = torch.zeros(4, dtype=torch.long)
    full = distiller(student, teacher, labels, epoch=20)
    assert list(full) == ["reviewkd/stage1", "reviewkd/stage2", "reviewkd/pooled"]
    early = distiller(student, teacher, labels, epoch=10)
    later = distiller(student, teacher, labels, epoch=100)
    for key in full:
        assert torch.equal(early[key] * 2, full[key]) and torch.equal(later[key], full[key])
    # The deepest level sees the pooled vector alone: conv1x1 + BN, then the 3x3 conv's centre tap + BN.
    fusion = distiller.fusions[2]
    out = fusion.output(fusion.reduce(student[2][:, :, None, None]))
    assert torch.allclose(full["reviewkd/pooled"], hcl_loss(out, teacher[2][:, :, None, None]).mean())


def test_fused_shapes_follow_the_teacher_and_mid_channels_cap():
    distiller = tiny_reviewkd()
    assert [f.reduce[0].out_channels for f in distiller.fusions] == [6, 6, 6]  # min(512, 6)
    assert [f.attention is not None for f in distiller.fusions] == [True, True, False]
    capped = ReviewKD(["a", "b"], [(8, 4, 4), (1024,)], [(8, 4, 4), (16,)], ReviewKDConfig(mid_channels_max=32))
    assert [f.reduce[0].out_channels for f in capped.fusions] == [32, 32]


def test_all_ones_mask_equals_no_mask_and_masked_samples_get_no_gradient():
    distiller = tiny_reviewkd()
    student, teacher = tiny_feats()
    labels = torch.zeros(4, dtype=torch.long)
    plain = distiller(student, teacher, labels, epoch=5)
    ones = distiller(student, teacher, labels, masks=[torch.ones(4)] * 3, epoch=5)
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    masked = distiller(student, teacher, labels, masks=[mask, None, None], epoch=5)
    assert torch.equal(masked["reviewkd/stage2"], plain["reviewkd/stage2"])
    masked["reviewkd/stage1"].backward()
    # The stage1 term reads every level of the same sample only (BN in eval mode): masked-out rows get zero.
    for feature in student:
        assert torch.all(feature.grad[mask == 0] == 0) and torch.all(feature.grad[mask == 1].abs().sum() > 0)
    zero = distiller(student, teacher, labels, masks=[torch.zeros(4)] * 3, epoch=5)
    assert all(v.item() == 0.0 for v in zero.values())


def test_masked_term_is_the_full_batch_mean_with_zeros():
    distiller = tiny_reviewkd()
    student, teacher = tiny_feats()
    labels = torch.zeros(4, dtype=torch.long)
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    masked = distiller(student, teacher, labels, masks=[None, mask, None], epoch=40)["reviewkd/stage2"]
    sub = distiller([s[1:3] for s in student], [t[1:3] for t in teacher], labels[1:3], epoch=40)["reviewkd/stage2"]
    assert torch.allclose(masked, sub * 2 / 4)


def test_teacher_features_get_no_gradient():
    distiller = tiny_reviewkd()
    student, teacher = tiny_feats()
    teacher = [t.requires_grad_() for t in teacher]
    sum(distiller(student, teacher, torch.zeros(4, dtype=torch.long)).values()).backward()
    assert all(t.grad is None for t in teacher)
    assert all(p.grad is not None for p in distiller.parameters())


def test_state_dict_round_trip():
    distiller = tiny_reviewkd().train()
    student, teacher = tiny_feats()
    distiller(student, teacher, torch.zeros(4, dtype=torch.long))  # moves the BN running statistics
    torch.manual_seed(5)
    restored = tiny_reviewkd()
    restored.load_state_dict(copy.deepcopy(distiller.state_dict()), strict=True)
    distiller.eval()
    a = distiller(student, teacher, torch.zeros(4, dtype=torch.long), epoch=3)
    b = restored(student, teacher, torch.zeros(4, dtype=torch.long), epoch=3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_defaults_and_errors():
    assert "reviewkd" in D.available()
    assert ReviewKD.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=5.0, spots=("stages", -2))
    assert ReviewKDConfig() == ReviewKDConfig(warmup_epochs=20, mid_channels_max=512, student_preact=False)
    assert ReviewKD.teacher_preact and not ReviewKD.student_preact
    assert ReviewKD(["a"], [(4,)], [(4,)], ReviewKDConfig(student_preact=True)).student_preact
    with pytest.raises(ValueError, match="one to one"):
        ReviewKD(["a", "b"], [(4, 2, 2), (4,)], [(4,)], ReviewKDConfig())
    with pytest.raises(ValueError, match="maps"):
        ReviewKD(["a"], [(4, 2)], [(4,)], ReviewKDConfig())


def abf_params(c_in, mid, c_out, fuse):
    """Parameter count of one ABF block, written from mdistiller's layer list."""
    return c_in * mid + 2 * mid + mid * c_out * 9 + 2 * c_out + (2 * mid * 2 + 2 if fuse else 0)


# mdistiller's shipped CIFAR config (channels [64, 128, 256, 256] on both sides, mid 256) gives 1,808,774.
MDISTILLER_HEAD_SIZES = {("resnet32x4", "resnet8x4"): 1_808_774}


def zoo_model(name: str):
    """A shared staged zoo model, its measured shapes and its outputs (with pre-activations) on the fixed batch."""
    model = staged_model(name)
    return model, model.feature_shapes(), zoo_outputs(name, preact=True)


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_zoo_pairs_fuse_to_the_teacher_shapes(teacher_name, student_name):
    student, student_all_shapes, student_out = zoo_model(student_name)
    teacher, teacher_all_shapes, teacher_out = zoo_model(teacher_name)
    distiller, student_spots, teacher_spots = D.create("reviewkd", student, teacher, (3, 32, 32))
    assert distiller.spot_names == student.stage_names[1:-2] + ["pooled"]
    student_shapes = [student_all_shapes[k] for k in student_spots]
    teacher_shapes = [teacher_all_shapes[k] for k in teacher_spots]
    mid = min(512, student_shapes[-1][0])
    expected = sum(abf_params(s[0], mid, t[0], fuse=i < len(student_shapes) - 1)
                   for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)))
    assert sum(p.numel() for p in distiller.parameters()) == expected
    assert expected == MDISTILLER_HEAD_SIZES.get((teacher_name, student_name), expected)
    source = student_out.preacts if distiller.student_preact else student_out.features
    student_feats = [source[k].clone().requires_grad_() for k in student_spots]
    teacher_feats = [teacher_out.preacts[k] for k in teacher_spots]
    fused = distiller.fuse(student_feats)
    assert [tuple(f.shape[1:]) for f in fused] == [t if len(t) == 3 else (t[0], 1, 1) for t in teacher_shapes]
    out = distiller(student_feats, teacher_feats, torch.zeros(4, dtype=torch.long), epoch=1)
    assert list(out) == [f"reviewkd/{n}" for n in distiller.spot_names]
    assert all(torch.isfinite(v) for v in out.values())
