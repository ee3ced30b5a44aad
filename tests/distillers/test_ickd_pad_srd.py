"""ICKD, PAD-L2 and SRD (issue 22, torchdistill's feature distillers): each loss's value and gradient against the
published formula written out independently in float64, a hand-worked case, masks, the trained parts, the refused
inputs, and short runs on the synthetic set under standard, SAKD and ABL."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import adakd.distillers as D
from adakd.cli import main
from adakd.distillers.ickd import ICKD, ICKDConfig, ickd_loss
from adakd.distillers.pad import PAD, PADConfig, pad_l2_loss
from adakd.distillers.srd import SRD, SRDConfig, srd_feature_loss, srd_logit_loss
from distiller_checks import (LEARNING_STRATEGIES, SYNTHETIC, assert_zoo_state_dict_round_trip, check_gradient,
                              learning_run, assert_learned, zoo_pair)
from markers import slow_except

B = 6
SUBSET = torch.tensor([1.0, 0, 1, 1, 0, 1])


def seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grad_of(value, inputs):
    return torch.autograd.grad(value, inputs, retain_graph=True)[0]


# ---- ICKD


def ickd_by_formula(student, teacher) -> torch.Tensor:
    """Per sample: G_ab = sum_p F_ap F_bp, each row divided by its L2 norm; sum_ab (G^s - G^t)_ab^2 / C."""
    values = []
    for f_s, f_t in zip(student.flatten(2), teacher.flatten(2)):
        channels = f_s.shape[0]
        total = 0.0
        for a in range(channels):
            row_s = torch.stack([(f_s[a] * f_s[b]).sum() for b in range(channels)])
            row_t = torch.stack([(f_t[a] * f_t[b]).sum() for b in range(channels)])
            total = total + (row_s / row_s.pow(2).sum().sqrt() - row_t / row_t.pow(2).sum().sqrt()).pow(2).sum()
        values.append(total / channels)
    return torch.stack(values)


def test_ickd_matches_the_published_formula_value_and_gradient():
    student = seeded(0, 4, 3, 2, 5).requires_grad_()
    teacher = seeded(1, 4, 3, 4, 2)  # another spatial size: the Gram matrix is C x C whatever H x W
    got, expected = ickd_loss(student, teacher), ickd_by_formula(student, teacher)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)
    weights = seeded(2, 4)
    assert torch.allclose(grad_of((got * weights).sum(), student), grad_of((expected * weights).sum(), student),
                          rtol=1e-9, atol=1e-12)
    check_gradient(ickd_loss, (3, 2, 3, 2), (3, 2, 2, 2))


def test_ickd_by_hand():
    # Student channels [1, 0] and [0, 1]: G = I, rows already unit. Teacher [1, 1] twice: G = [[2, 2], [2, 2]],
    # rows -> [1, 1] / sqrt 2. Squared difference: 2 (1 - 1/sqrt 2)^2 + 2 * 1/2 = 4 - 2 sqrt 2; / C = 2 - sqrt 2.
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=torch.float64)
    teacher = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]]], dtype=torch.float64)
    assert math.isclose(ickd_loss(student, teacher).item(), 2 - math.sqrt(2), rel_tol=1e-12)


def test_ickd_term_is_the_authors_batch_loss_and_masks_apply_per_sample():
    torch.manual_seed(0)
    module = ICKD(["stage3"], [(3, 4, 4)], [(5, 2, 2)]).double()
    student, teacher = seeded(3, B, 3, 4, 4).requires_grad_(), seeded(4, B, 5, 2, 2)
    targets = torch.zeros(B, dtype=torch.long)
    plain = module([student], [teacher], targets)["ickd/stage3"]
    # The authors' batch_loss: the batch sum of squared differences over ch * bsz.
    embedded = module.embeddings[0](student)
    assert torch.allclose(plain, ickd_by_formula(embedded, teacher).sum() / B, rtol=1e-12)
    assert torch.equal(plain, module([student], [teacher], targets, masks=[torch.ones(B)])["ickd/stage3"])
    assert module([student], [teacher], targets, masks=[torch.zeros(B)])["ickd/stage3"].item() == 0.0
    module.eval()  # BatchNorm on running statistics: samples no longer share a normalisation
    masked = module([student], [teacher], targets, masks=[SUBSET])["ickd/stage3"]
    per_sample = ickd_by_formula(module.embeddings[0](student), teacher)
    assert torch.allclose(masked, (per_sample * SUBSET).sum() / B, rtol=1e-12)
    masked.backward()
    assert torch.all(student.grad[SUBSET == 0] == 0) and torch.all(student.grad[SUBSET == 1].abs().sum((1, 2, 3)) > 0)


def test_ickd_embedding_and_defaults_on_a_zoo_pair():
    pair = zoo_pair("ickd", "resnet32x4", "resnet8x4")
    embed = pair.distiller.embeddings[0]
    assert pair.distiller.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=2.5, spots=(-3,))
    assert embed.conv.kernel_size == (1, 1) and embed.conv.bias is None
    assert embed.conv.out_channels == pair.inputs[1][0].shape[1]
    assert torch.isfinite(pair.out["ickd/stage3"]) and pair.out["ickd/stage3"] > 0
    assert_zoo_state_dict_round_trip("ickd", pair)
    wide = ICKD(["stage3"], [(3, 4, 4)], [(5, 4, 4)], ICKDConfig(embed_kernel=3))
    assert wide.embeddings[0].conv.kernel_size == (3, 3) and wide.embeddings[0].conv.padding == (1, 1)


def test_ickd_refuses_vectors_and_other_kernels():
    with pytest.raises(ValueError, match="spatial maps"):
        ICKD(["pooled"], [(8,)], [(8,)])
    with pytest.raises(ValueError, match="embed_kernel must be one of"):
        ICKDConfig(embed_kernel=2)


# ---- PAD-L2


def pad_by_formula(student, teacher, log_variance, eps=1e-6) -> torch.Tensor:
    """Per sample: (1/D) sum_d [(t_d - s_d)^2 / (eps + e^{v_d}) + v_d]."""
    rows = []
    for s, t, v in zip(student, teacher, log_variance):
        rows.append(sum((t[d] - s[d]) ** 2 / (eps + torch.exp(v[d])) + v[d] for d in range(len(s))) / len(s))
    return torch.stack(rows)


def test_pad_matches_the_published_formula_value_and_gradient():
    student, teacher = seeded(5, 4, 7).requires_grad_(), seeded(6, 4, 7)
    log_variance = seeded(7, 4, 7).requires_grad_()
    got, expected = pad_l2_loss(student, teacher, log_variance), pad_by_formula(student, teacher, log_variance)
    assert torch.allclose(got, expected, rtol=1e-12)
    weights = seeded(8, 4)
    for leaf in (student, log_variance):
        assert torch.allclose(grad_of((got * weights).sum(), leaf), grad_of((expected * weights).sum(), leaf),
                              rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s, v: pad_l2_loss(s, teacher, v), (student, log_variance))


def test_pad_by_hand():
    # s = [0, 0], t = [1, 3], v = [0, ln 3]: (1 / (1 + eps) + 0 + 9 / (3 + eps) + ln 3) / 2 = (4 + ln 3) / 2.
    value = pad_l2_loss(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[1.0, 3.0]], dtype=torch.float64),
                        torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64), eps=1e-12)
    assert math.isclose(value.item(), (4 + math.log(3.0)) / 2, rel_tol=1e-10)


def test_pad_variance_branch_trains_with_the_student_and_masks_apply_per_sample():
    torch.manual_seed(0)
    module = PAD(["pooled"], [(5,)], [(5,)]).double()
    student, teacher = seeded(9, B, 5).requires_grad_(), seeded(10, B, 5)
    targets = torch.zeros(B, dtype=torch.long)
    plain = module([student], [teacher], targets)["pad/pooled"]
    log_variance = module.variance_branches[0](student)
    assert torch.allclose(plain, pad_by_formula(student, teacher, log_variance).mean(), rtol=1e-12)
    assert torch.equal(plain, module([student], [teacher], targets, masks=[torch.ones(B)])["pad/pooled"])
    assert module([student], [teacher], targets, masks=[torch.zeros(B)])["pad/pooled"].item() == 0.0
    # The branch's parameters are the distiller's trainable ones (the student's optimiser) and receive gradient.
    branch = list(module.variance_branches.parameters())
    assert {id(p) for p in branch} <= {id(p) for p in module.trainable_parameters()} and not module.pretrain_parameters()
    plain.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in branch)
    module.eval()
    student.grad = None
    masked = module([student], [teacher], targets, masks=[SUBSET])["pad/pooled"]
    expected = (pad_by_formula(student, teacher, module.variance_branches[0](student)) * SUBSET).sum() / B
    assert torch.allclose(masked, expected, rtol=1e-12)
    masked.backward()
    assert torch.all(student.grad[SUBSET == 0] == 0) and torch.all(student.grad[SUBSET == 1].abs().sum(1) > 0)


def test_pad_on_zoo_pairs_of_equal_and_different_widths():
    same = zoo_pair("pad", "resnet32x4", "resnet8x4")
    assert same.distiller.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=1.0, spots=(-2,))
    assert isinstance(same.distiller.connectors[0], torch.nn.Identity)
    assert torch.isfinite(same.out["pad/pooled"])
    assert_zoo_state_dict_round_trip("pad", same)
    cross = zoo_pair("pad", "ResNet50", "MobileNetV2")
    assert isinstance(cross.distiller.connectors[0], torch.nn.Linear)
    assert torch.isfinite(cross.out["pad/pooled"])


def test_pad_refuses_maps_and_a_non_positive_eps():
    with pytest.raises(ValueError, match="choose the pooled spot"):
        PAD(["stage3"], [(4, 2, 2)], [(4, 2, 2)])
    with pytest.raises(ValueError, match="eps must be > 0"):
        PADConfig(eps=0.0)


# ---- SRD


def srd_feature_by_formula(student, teacher, exponent=4.0, eps=1e-4) -> torch.Tensor:
    """log sum_{i,d} |BN(s)_id - BN(t)_id|^p, BN = torch's batch_norm in training mode without affine parameters."""
    s = F.batch_norm(student, None, None, training=True, eps=eps)
    t = F.batch_norm(teacher, None, None, training=True, eps=eps)
    return torch.log((s - t).abs().pow(exponent).sum())


def kl_by_formula(student, teacher, temperature) -> torch.Tensor:
    rows = []
    for z_s, z_t in zip(student, teacher):
        p_s, p_t = torch.softmax(z_s / temperature, 0), torch.softmax(z_t / temperature, 0)
        rows.append(temperature**2 * sum(p_t[c] * (torch.log(p_t[c]) - torch.log(p_s[c])) for c in range(len(z_s))))
    return torch.stack(rows)


@pytest.mark.parametrize("exponent", [4.0, 2.0])
def test_srd_feature_term_matches_the_published_formula(exponent):
    student, teacher = seeded(11, B, 5).requires_grad_(), seeded(12, B, 5)
    got = srd_feature_loss(student, teacher, exponent)
    expected = srd_feature_by_formula(student, teacher, exponent)
    assert torch.allclose(got, expected, rtol=1e-12)
    assert torch.allclose(grad_of(got, student), grad_of(expected, student), rtol=1e-9, atol=1e-12)
    check_gradient(srd_feature_loss, (B, 4), (B, 4))


def test_srd_logit_term_matches_the_kl_formula():
    student, teacher = seeded(13, B, 7).requires_grad_(), seeded(14, B, 7) * 3
    for temperature in (1.0, 4.0):
        got, expected = srd_logit_loss(student, teacher, temperature), kl_by_formula(student, teacher, temperature)
        assert torch.allclose(got, expected, rtol=1e-10)
        assert torch.allclose(grad_of(got.sum(), student), grad_of(expected.sum(), student), rtol=1e-9, atol=1e-12)


def test_srd_feature_term_by_hand():
    # s = [0, 2] -> [-1, 1]; t = [4, 0] -> [1, -1] (eps 1e-12); |diff|^4 = 16 twice: log 32 = 5 ln 2.
    student = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    teacher = torch.tensor([[4.0], [0.0]], dtype=torch.float64)
    assert math.isclose(srd_feature_loss(student, teacher, 4.0, eps=1e-12).item(), 5 * math.log(2), rel_tol=1e-9)


def srd_module() -> SRD:
    torch.manual_seed(0)
    return SRD(["pooled", "logits"], [(4,), (7,)], [(5,), (7,)]).double()


def test_srd_terms_and_masks():
    module = srd_module()
    features_s, features_t = seeded(15, B, 4).requires_grad_(), seeded(16, B, 5)
    logits_s, logits_t = seeded(17, B, 7).requires_grad_(), seeded(18, B, 7) * 2
    targets = torch.zeros(B, dtype=torch.long)

    def run(masks=None):
        return module([features_s, logits_s], [features_t, logits_t], targets, masks=masks)

    plain = run()
    projected = module.projector(features_s)
    assert torch.allclose(plain["srd/pooled"], 2 * srd_feature_by_formula(projected, features_t), rtol=1e-12)
    assert torch.allclose(plain["srd/logits"], kl_by_formula(logits_s, logits_t, 1.0).mean(), rtol=1e-10)
    ones = run([torch.ones(B), torch.ones(B)])
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    # A subset: the feature term is the selected sub-batch's (its statistics, its sum) times its share.
    keep = SUBSET.bool()
    masked = run([SUBSET, SUBSET])
    sub_batch = 2 * srd_feature_by_formula(projected[keep], features_t[keep]) * 4 / B
    assert torch.allclose(masked["srd/pooled"], sub_batch, rtol=1e-12)
    assert torch.allclose(masked["srd/logits"], (kl_by_formula(logits_s, logits_t, 1.0) * SUBSET).sum() / B)
    sum(masked.values()).backward()
    assert torch.all(features_s.grad[~keep] == 0) and torch.all(logits_s.grad[~keep] == 0)
    assert torch.all(features_s.grad[keep].abs().sum(1) > 0)
    # 0 or 1 selected samples: exact zeros with finite, zero gradients.
    for selected in (0, 1):
        features_s.grad = None
        few = torch.zeros(B)
        few[:selected] = 1
        zero = run([few, few])
        assert zero["srd/pooled"].item() == 0.0
        zero["srd/pooled"].backward()
        assert features_s.grad is None or torch.all(features_s.grad == 0)


def test_srd_reads_a_map_pooled_and_builds_on_zoo_pairs():
    module = SRD(["stage3", "logits"], [(4, 3, 3), (7,)], [(5, 2, 2), (7,)]).double()
    maps_s, maps_t = seeded(19, B, 4, 3, 3), seeded(20, B, 5, 2, 2)
    logits = seeded(21, B, 7)
    got = module([maps_s, logits], [maps_t, logits], torch.zeros(B, dtype=torch.long))
    expected = 2 * srd_feature_by_formula(module.projector(maps_s.mean((2, 3))), maps_t.mean((2, 3)))
    assert torch.allclose(got["srd/stage3"], expected, rtol=1e-12) and got["srd/logits"].abs().item() < 1e-12
    pair = zoo_pair("srd", "ResNet50", "MobileNetV2")
    assert pair.distiller.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=1.0, spots=(-2, -1))
    assert list(pair.out) == ["srd/pooled", "srd/logits"]
    assert all(torch.isfinite(v) for v in pair.out.values())
    assert_zoo_state_dict_round_trip("srd", pair)


def test_srd_refuses_other_spot_layouts_and_bad_options():
    with pytest.raises(ValueError, match="srd reads two spots"):
        SRD(["pooled"], [(4,)], [(4,)])
    with pytest.raises(ValueError, match="logit vectors of equal size"):
        SRD(["pooled", "logits"], [(4,), (7,)], [(4,), (9,)])
    with pytest.raises(ValueError, match="feature map or vector"):
        SRD(["x", "logits"], [(4, 2), (7,)], [(4, 2), (7,)])
    for bad in ({"exponent": 0.0}, {"temperature": 0.0}, {"bn_eps": 0.0}):
        with pytest.raises(ValueError, match="must be > 0"):
            SRDConfig(**bad)


def test_cli_names_the_spot_problem_in_one_line(tmp_path, capsys, synthetic_teacher):
    assert main(["distill", *SYNTHETIC, "epochs=1", "model.name=resnet8", "teacher.name=resnet14",
                 f"teacher.weights={synthetic_teacher}", "method=pad", "distill.spots=[2]", f"out_dir={tmp_path}",
                 "name=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pad compares embedding vectors" in err[0] and "distill.spots=[-2]" in err[0], err
    assert not (tmp_path / "x").exists()


# ---- learning on the synthetic set

METHODS = ["ickd", "pad", "srd"]
CASES = [(method, strategy) for method in METHODS for strategy in LEARNING_STRATEGIES]
# The inner loop keeps a diagonal that still runs every method and every strategy; CI runs all nine.
INNER_LOOP = ["ickd-standard", "pad-sakd", "srd-abl"]


@pytest.mark.parametrize("method, strategy", slow_except(CASES, INNER_LOOP))
def test_learns_on_the_synthetic_set(tmp_path, synthetic_teacher, method, strategy):
    rows = learning_run(tmp_path, synthetic_teacher, method, strategy)
    assert_learned(rows, strategy)
