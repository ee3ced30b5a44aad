"""DIST+ and SKD (issue 22, torchdistill's DISTPlusLoss, SKDInstanceLoss and SKDDirectionLoss): values and gradients
against the published formulas written out independently in float64, hand-worked cases, per-sample masks (the
batch-coupled terms on the selected sub-batch), DIST+'s connector, the refusals, and short runs on the synthetic set
under standard, SAKD and ABL."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import adakd.distillers as D
from adakd.distillers.connectors import ConvReg
from adakd.distillers.dist import dist_inter, dist_intra
from adakd.distillers.dist_plus import DISTPlus, DISTPlusConfig, channel_relation, spatial_relation
from adakd.distillers.kd import kd_loss
from adakd.distillers.skd import SKD, SKDConfig, skd_direction, skd_instance
from distiller_checks import (LEARNING_STRATEGIES, SYNTHETIC, learning_run, assert_gradients_follow_mask,
                              check_degenerate_selections, check_float32_under_autocast, check_gradient, fixed_logits,
                              one_spot)
from markers import slow_except
from sync_counter import SyncCounter

B, C = 6, 5
MAP = (4, 3, 2)  # (C, H, W) of the feature spot in the formula checks
MASKS = [[1.0, 0, 1, 1, 0, 1], [0.0, 1, 0, 0, 1, 0], [1.0, 1, 1, 1, 1, 0]]


def grad_of(value, inputs):
    return torch.autograd.grad(value, inputs, retain_graph=True)[0]


def fixed_maps(seed: int, batch: int = B, shape: tuple = MAP):
    """Float64 student (requires grad) and positive teacher maps, never constant over the channels at a position
    (where the reference's sqrt(ss_s ss_t) has a NaN gradient; see `test_a_constant_position_has_finite_gradients`)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, *shape, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(batch, *shape, generator=g, dtype=torch.float64).exp()
    return student, teacher


# ---- the published formulas, written as torchdistill's DISTPlusLoss / SKD*Loss read (a code path of their own)


def pearson_by_formula(x, y):
    """sum (x - x̄)(y - ȳ) / (sqrt(sum (x - x̄)^2 * sum (y - ȳ)^2) + 1e-8), the reference's `channel_relation` form."""
    x_c, y_c = x - x.mean(), y - y.mean()
    return (x_c * y_c).sum() / (torch.sqrt((x_c**2).sum() * (y_c**2).sum()) + 1e-8)


def channel_by_formula(student, teacher):
    """Per sample: 1 - mean over positions of the channel correlation (the sign fixed, see DISTPlus)."""
    batch, _, height, width = student.shape
    return torch.stack([1 - torch.stack([pearson_by_formula(student[b, :, h, w], teacher[b, :, h, w])
                                         for h in range(height) for w in range(width)]).mean()
                        for b in range(batch)])


def spatial_by_formula(student, teacher):
    """1 - mean over positions of the correlation over the batch of the channel sums."""
    s_sum, t_sum = student.sum(1), teacher.sum(1)
    _, height, width = s_sum.shape
    return 1 - torch.stack([pearson_by_formula(s_sum[:, h, w], t_sum[:, h, w])
                            for h in range(height) for w in range(width)]).mean()


def skd_instance_by_formula(student, teacher, tau):
    """KL(p_t || p_s) at tau per sample, no tau^2 (F.kl_div with 'none', summed over classes)."""
    return F.kl_div(torch.log_softmax(student / tau, 1), torch.softmax(teacher / tau, 1), reduction="none").sum(1)


def skd_direction_by_formula(student, teacher, tikhonov):
    """mean_i sqrt(D_i Sigma'^-1 D_i^T) with torch.cov and a Cholesky inverse, as SKDDirectionLoss computes it."""
    a, b = F.normalize(student, p=2, dim=1), F.normalize(teacher, p=2, dim=1)
    diff = a @ a.t() - b @ b.t()
    covariance = torch.cov(diff.t()) + tikhonov * torch.eye(diff.shape[1], dtype=diff.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(covariance))
    return torch.sqrt(torch.einsum("bi,ij,bj->b", diff, inverse, diff)).mean()


# ---- DIST+: values and gradients


def dist_plus_module(student_map=MAP, teacher_map=MAP, **config) -> DISTPlus:
    return DISTPlus(["logits", "stage3"], [(C,), student_map], [(C,), teacher_map], DISTPlusConfig(**config))


@pytest.mark.parametrize("config", [{}, {"temperature": 4.0, "beta": 1.0, "gamma": 0.5, "iota": 3.0, "kappa": 0.25}])
def test_dist_plus_matches_the_published_formula(config):
    student, teacher = fixed_logits(0, B, C)
    s_map, t_map = fixed_maps(1)
    c = DISTPlusConfig(**config)
    terms = dist_plus_module(**config)([student, s_map], [teacher, t_map], torch.zeros(B, dtype=torch.long))
    assert list(terms) == ["dist_plus/logits", "dist_plus/stage3"]
    # The logit spot is DIST's (its own formula tests are test_dist_ls.py), with DIST+'s weights.
    expected_logits = (c.beta * dist_inter(student, teacher, c.temperature).mean()
                       + c.gamma * dist_intra(student, teacher, c.temperature))
    assert torch.equal(terms["dist_plus/logits"], expected_logits)
    expected_map = c.iota * channel_by_formula(s_map, t_map).mean() + c.kappa * spatial_by_formula(s_map, t_map)
    assert torch.allclose(terms["dist_plus/stage3"], expected_map, rtol=1e-12, atol=1e-13)
    assert torch.allclose(grad_of(terms["dist_plus/stage3"], s_map), grad_of(expected_map, s_map), rtol=1e-9,
                          atol=1e-12)
    assert grad_of(terms["dist_plus/stage3"], s_map).abs().sum() > 0


def test_dist_plus_terms_each_match_and_pass_gradcheck():
    s_map, t_map = fixed_maps(2)
    assert torch.allclose(channel_relation(s_map, t_map), channel_by_formula(s_map, t_map), rtol=1e-12, atol=1e-13)
    assert torch.allclose(spatial_relation(s_map, t_map), spatial_by_formula(s_map, t_map), rtol=1e-12, atol=1e-13)
    coefficients = torch.rand(B, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(grad_of((channel_relation(s_map, t_map) * coefficients).sum(), s_map),
                          grad_of((channel_by_formula(s_map, t_map) * coefficients).sum(), s_map), rtol=1e-9,
                          atol=1e-12)
    check_gradient(lambda s, t: channel_relation(s, t).sum(), (B, *MAP), (B, *MAP))
    check_gradient(spatial_relation, (B, *MAP), (B, *MAP))


def test_dist_plus_feature_terms_by_hand():
    # Two samples, 2 channels, 1 x 2 positions; maps written [sample][channel][w].
    # Channel term (correlation over the 2 channels at each position):
    #   sample 0: pos 0 s [1, 3], t [0, 2]: rho 1; pos 1 s [2, 0], t [1, 3]: rho -1 -> 1 - 0 = 1.
    #   sample 1: pos 0 s [5, 5] is constant: rho 0; pos 1 s [0, 4], t [0, 4]: rho 1 -> 1 - 1/2 = 1/2. Mean 3/4.
    # Spatial term (channel sums, correlation over the 2 samples at each position):
    #   pos 0: s [4, 10], t [2, 3]: rho 1; pos 1: s [2, 4], t [4, 4] is constant: rho 0 -> 1 - 1/2 = 1/2.
    # DIST+'s feature term with iota = kappa = 1: 3/4 + 1/2 = 5/4 (the eps 1e-8 moves it by < 1e-7).
    student = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]], [[[5.0, 0.0]], [[5.0, 4.0]]]], dtype=torch.float64)
    teacher = torch.tensor([[[[0.0, 1.0]], [[2.0, 3.0]]], [[[1.0, 0.0]], [[2.0, 4.0]]]], dtype=torch.float64)
    assert torch.allclose(channel_relation(student, teacher), torch.tensor([1.0, 0.5], dtype=torch.float64),
                          atol=1e-7)
    assert math.isclose(spatial_relation(student, teacher).item(), 0.5, abs_tol=1e-7)
    module = DISTPlus(["stage3"], [(2, 1, 2)], [(2, 1, 2)], DISTPlusConfig(iota=1.0, kappa=1.0))
    assert math.isclose(one_spot(module, "dist_plus/stage3", student, teacher).item(), 1.25, abs_tol=1e-7)


def test_the_channel_term_falls_as_the_student_follows_the_teacher():
    # The departure from torchdistill's sign: 1 - rho is 0 for a student map that is the teacher's, and largest for
    # its negation (torchdistill's iota * rho would prefer the negation).
    _, teacher = fixed_maps(4)
    assert torch.allclose(channel_relation(teacher, teacher), torch.zeros(B, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(channel_relation(-teacher, teacher), torch.full((B,), 2.0, dtype=torch.float64), atol=1e-7)
    assert torch.all(channel_relation(fixed_maps(5)[0], teacher) < 2.0)


def test_a_constant_position_has_finite_gradients():
    # A post-ReLU teacher that is 0 on every channel at a position: the correlation there is 0 (term 1 - 0) with a
    # finite gradient, where the reference's sqrt(ss_s * 0) has a NaN one.
    s_map, t_map = fixed_maps(16)
    t_map = t_map.clone()
    t_map[:, :, 0, 0] = 0.0
    value = channel_relation(s_map, t_map)
    value.sum().backward()
    assert torch.allclose(value, channel_by_formula(s_map, t_map), rtol=1e-12)
    assert torch.isfinite(s_map.grad).all() and torch.all(s_map.grad[:, :, 0, 0] == 0)


# ---- DIST+: masks, connector, precision, refusals


@pytest.mark.parametrize("mask", MASKS)
def test_dist_plus_under_a_mask_is_the_sub_batch_term_times_its_share(mask):
    s_map, t_map = fixed_maps(6)
    t_map.requires_grad_()
    mask = torch.tensor(mask)
    keep = mask.bool()
    module = DISTPlus(["stage3"], [MAP], [MAP], DISTPlusConfig(iota=0.5, kappa=2.0))
    masked = one_spot(module, "dist_plus/stage3", s_map, t_map, masks=[mask])
    # The channel term is per sample (zeros for the samples left out); the spatial one is the sub-batch's.
    share = int(keep.sum()) / B
    expected = (0.5 * channel_by_formula(s_map[keep], t_map[keep]).sum() / B
                + 2.0 * spatial_by_formula(s_map[keep], t_map[keep]) * share)
    assert torch.allclose(masked, expected, rtol=1e-12)
    masked.backward()
    assert_gradients_follow_mask(s_map, mask)
    assert t_map.grad is None


def test_dist_plus_all_ones_is_no_mask_and_few_selected_are_finite():
    s_map, t_map = fixed_maps(7)
    module = DISTPlus(["stage3"], [MAP], [MAP])
    plain = one_spot(module, "dist_plus/stage3", s_map, t_map)
    assert torch.equal(plain, one_spot(module, "dist_plus/stage3", s_map, t_map, masks=[torch.ones(B)]))
    spatial_only = DISTPlus(["stage3"], [MAP], [MAP], DISTPlusConfig(iota=0.0))
    check_degenerate_selections(spatial_only, "dist_plus/stage3", s_map, t_map)
    assert not module.state_dict()  # maps of one shape: no connector


def test_dist_plus_bridges_other_channel_counts_with_a_trained_connector():
    module = DISTPlus(["logits", "stage3"], [(C,), (3, 4, 4)], [(C,), (8, 2, 2)])
    connector = module.connectors[1]
    assert isinstance(connector, ConvReg) and isinstance(connector.relu, torch.nn.Identity)
    assert isinstance(module.connectors[0], torch.nn.Identity)
    assert {p.shape for p in module.trainable_parameters()} >= {torch.Size([8, 3, 3, 3])}  # 3x3 stride-2 conv
    module.eval()
    student = torch.randn(B, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, 8, 2, 2, dtype=torch.float64).relu()
    module.double()
    logits, teacher_logits = fixed_logits(8, B, C)
    terms = module([logits, student], [teacher_logits, teacher], torch.zeros(B, dtype=torch.long))
    regressed = connector(student)
    expected = channel_by_formula(regressed, teacher).mean() + spatial_by_formula(regressed, teacher)
    assert torch.allclose(terms["dist_plus/stage3"], expected, rtol=1e-12)
    terms["dist_plus/stage3"].backward()
    assert connector.conv.weight.grad.abs().sum() > 0 and student.grad.abs().sum() > 0
    restored = DISTPlus(["logits", "stage3"], [(C,), (3, 4, 4)], [(C,), (8, 2, 2)]).double().eval()
    restored.load_state_dict(module.state_dict())
    again = restored([logits, student], [teacher_logits, teacher], torch.zeros(B, dtype=torch.long))
    assert all(torch.equal(again[k], terms[k]) for k in terms)


def test_dist_plus_float32_under_autocast_and_no_host_sync():
    check_float32_under_autocast(lambda s, t: channel_relation(s, t), (4, *MAP), (4, *MAP))
    check_float32_under_autocast(spatial_relation, (4, *MAP), (4, *MAP))
    student, teacher = fixed_logits(9, B, C)
    s_map, t_map = fixed_maps(10)
    with SyncCounter() as syncs:
        terms = dist_plus_module()([student, s_map], [teacher, t_map], torch.zeros(B, dtype=torch.long),
                                   masks=[torch.tensor(MASKS[0])] * 2)
        sum(terms.values()).backward()
    assert syncs.count == 0, syncs.report()


def test_dist_plus_defaults_and_refusals():
    assert DISTPlus.defaults == D.DistillerDefaults(1.0, 2.0, (-1, -3))
    assert DISTPlusConfig() == DISTPlusConfig(temperature=1.0, beta=2.0, gamma=2.0, iota=1.0, kappa=1.0)
    assert {"dist_plus", "skd"} <= set(D.available(tag="classic"))
    with pytest.raises(ValueError, match=r"dist_plus needs logit vectors of equal size at 'pooled'; student \(64,\) "
                                         r"vs teacher \(256,\)"):
        DISTPlus(["pooled"], [(64,)], [(256,)])
    with pytest.raises(ValueError, match=r"dist_plus compares logit vectors \(C,\) or spatial maps \(C, H, W\), but "
                                         r"spot 'stage2' has student \(16, 8\) and teacher \(16, 8\)"):
        DISTPlus(["stage2"], [(16, 8)], [(16, 8)])


# ---- SKD: values and gradients


@pytest.mark.parametrize("tau, tikhonov", [(4.0, 0.1), (1.0, 0.5)])
def test_skd_matches_the_published_formula(tau, tikhonov):
    student, teacher = fixed_logits(11, B, C)
    module = SKD(["logits"], [(C,)], [(C,)], SKDConfig(temperature=tau, tikhonov=tikhonov, instance_weight=0.7,
                                                       direction_weight=1.3))
    got = one_spot(module, "skd/logits", student, teacher)
    instance = skd_instance_by_formula(student, teacher, tau)
    direction = skd_direction_by_formula(student, teacher, tikhonov)
    assert torch.allclose(skd_instance(student, teacher, tau), instance, rtol=1e-12, atol=1e-14)
    assert torch.allclose(skd_direction(student, teacher, tikhonov), direction, rtol=1e-10)
    expected = 0.7 * instance.mean() + 1.3 * direction
    assert torch.allclose(got, expected, rtol=1e-10)
    assert torch.allclose(grad_of(got, student), grad_of(expected, student), rtol=1e-8, atol=1e-11)
    check_gradient(lambda s, t: skd_direction(s, t, tikhonov), (B, C), (B, C))


def test_skd_by_hand():
    # Direction, two samples of two classes: student [1, 0], [0, 1] (Gram off-diagonal 0), teacher [1, 0], [1, 1]
    # (off-diagonal 1/sqrt 2): D = [[0, d], [d, 0]], d = -1/sqrt 2, d^2 = 1/2. D's columns over the 2 rows:
    # Sigma = d^2 / 2 [[1, -1], [-1, 1]], eigenvalues d^2 (along [1, -1]) and 0 (along [1, 1]). Each row of D
    # projects d^2 / 2 on both: D_i Sigma'^-1 D_i = d^2 / (2 (d^2 + l)) + d^2 / (2 l); l = 1/2: 1/4 + 1/2 = 3/4,
    # so the term is sqrt(3/4) = 0.866025.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert math.isclose(skd_direction(student, teacher, 0.5).item(), math.sqrt(0.75), rel_tol=1e-12)
    # Instance at T = 1: student logits [0, 0] (uniform), teacher [ln 3, 0] (3/4, 1/4):
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812.
    kl = skd_instance(torch.zeros(1, 2, dtype=torch.float64),
                      torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64), 1.0)
    assert math.isclose(kl.item(), 0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel_tol=1e-12)
    assert math.isclose(kl.item(), 0.130812, abs_tol=1e-6)


def test_skd_has_no_t_squared_and_a_batch_of_one_is_finite():
    student, teacher = fixed_logits(12, B, C)
    # The instance term is KD's per-sample KL without KD's T^2.
    assert torch.allclose(skd_instance(student, teacher, 4.0) * 16, kd_loss(student, teacher, 4.0), rtol=1e-14)
    assert not torch.allclose(skd_instance(student, teacher, 4.0), kd_loss(student, teacher, 4.0), rtol=1e-3)
    one = student[:1].detach().clone().requires_grad_()
    term = skd_direction(one, teacher[:1], 0.1)
    term.backward()
    assert term.item() == 0.0 and torch.all(one.grad == 0)  # the reference's sqrt(0) gives a NaN gradient here


# ---- SKD: masks, precision, refusals


def skd_module(**config) -> SKD:
    return SKD(["logits"], [(C,)], [(C,)], SKDConfig(**config))


@pytest.mark.parametrize("mask", MASKS)
def test_skd_under_a_mask_is_the_sub_batch_term_times_its_share(mask):
    student, teacher = fixed_logits(13, B, C)
    teacher.requires_grad_()
    mask = torch.tensor(mask)
    keep = mask.bool()
    masked = one_spot(skd_module(), "skd/logits", student, teacher, masks=[mask])
    expected = (skd_instance_by_formula(student[keep], teacher[keep], 4.0).sum() / B
                + skd_direction_by_formula(student[keep], teacher[keep], 0.1) * int(keep.sum()) / B)
    assert torch.allclose(masked, expected, rtol=1e-10)
    masked.backward()
    assert_gradients_follow_mask(student, mask)
    assert teacher.grad is None


def test_skd_all_ones_is_no_mask_and_few_selected_are_finite():
    student, teacher = fixed_logits(14, B, C)
    module = skd_module()
    plain = one_spot(module, "skd/logits", student, teacher)
    assert torch.equal(plain, one_spot(module, "skd/logits", student, teacher, masks=[torch.ones(B)]))
    zero = one_spot(module, "skd/logits", student, teacher, masks=[torch.zeros(B)])
    assert zero.item() == 0.0
    check_degenerate_selections(skd_module(instance_weight=0.0), "skd/logits", student, teacher)
    assert not module.state_dict()


def test_skd_float32_under_autocast_and_no_host_sync():
    check_float32_under_autocast(lambda s, t: skd_direction(s, t, 0.1), (B, C), (B, C))
    check_float32_under_autocast(lambda s, t: skd_instance(s, t, 4.0), (B, C), (B, C))
    student, teacher = fixed_logits(15, B, C)
    with SyncCounter() as syncs:
        one_spot(skd_module(), "skd/logits", student, teacher, masks=[torch.tensor(MASKS[0])]).backward()
    assert syncs.count == 0, syncs.report()


def test_skd_defaults_and_refusals():
    assert SKD.defaults == D.DistillerDefaults(0.0, 1.0, (-1,))
    assert SKDConfig() == SKDConfig(temperature=4.0, tikhonov=0.1, instance_weight=1.0, direction_weight=1.0)
    for tikhonov in (0.0, -0.1):
        with pytest.raises(ValueError, match=rf"skd needs distill.args.tikhonov > 0 \(the ridge lambda that keeps the "
                                             rf"covariance Sigma \+ lambda I invertible; the reference uses 0.1\), "
                                             rf"got {tikhonov}"):
            skd_module(tikhonov=tikhonov)
    with pytest.raises(ValueError, match=r"skd needs logit vectors of equal size at 'logits'; student \(10,\) vs "
                                         r"teacher \(100,\)"):
        SKD(["logits"], [(10,)], [(100,)])


def test_a_tikhonov_that_is_not_positive_through_the_cli_is_one_error_line(tmp_path, capsys, synthetic_teacher):
    from cli_checks import fails

    out = tmp_path / "runs"
    base = ["distill", *SYNTHETIC, "epochs=1", "model.name=resnet8", "teacher.name=resnet14",
            f"teacher.weights={synthetic_teacher}", f"out_dir={out}", "name=run"]
    fails(capsys, [*base, "method=skd", "distill.args.tikhonov=0"],
          "skd cannot distill resnet14 -> resnet8: skd needs distill.args.tikhonov > 0")
    assert not out.exists() or not any(out.iterdir())


# ---- learning on the synthetic set under standard, SAKD and ABL

METHODS = ["dist_plus", "skd"]
CASES = [(method, strategy) for method in METHODS for strategy in LEARNING_STRATEGIES]
INNER_LOOP = ["dist_plus-abl", "skd-sakd"]  # a diagonal; CI runs all six


@pytest.mark.parametrize("method, strategy", slow_except(CASES, INNER_LOOP))
def test_learns_on_the_synthetic_set(tmp_path, synthetic_teacher, method, strategy):
    rows = learning_run(tmp_path, synthetic_teacher, method, strategy)
    if strategy == "sakd":
        # SAKD's objective grows with the share of samples its policy distils: the measure is the method's logits
        # term per distilled sample (the logged batch mean, zeros for the samples left out, over the share).
        column = f"train/{method}/logits"
        losses = [float(r[column]) / float(r["train/sakd/share/logits"]) for r in rows]
    else:
        losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
