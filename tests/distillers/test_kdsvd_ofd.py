"""KDSVD (the CRD benchmark's) and OFD (mdistiller's): values, gradients, margins, masks, learning runs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import adakd.distillers as D
import adakd.models as M
from adakd.distillers.kdsvd import KDSVD, KDSVDConfig, top_right_singular
from adakd.distillers.ofd import OFD, bn_margin, ofd_loss
from distiller_checks import LEARNING_STRATEGIES, assert_gradients_follow_mask, learning_run
from markers import slow_except

RBF = 8.0


# ---- KDSVD

def reference_kdsvd(student: list[np.ndarray], teacher: list[np.ndarray], k: int = 1) -> np.ndarray:
    """Per-sample KDSVD in float64 numpy, loop by loop from the paper's steps and RepDistiller's KDSVD.py."""
    def factors(feat, n):
        x = feat.reshape(feat.shape[0], -1).T  # [HW, C]
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        s, v = s[:n], vt[:n].T
        return s / np.linalg.norm(s), v / np.linalg.norm(v, axis=0, keepdims=True)

    batch = student[0].shape[0]
    out = np.zeros(batch)
    for b in range(batch):
        previous = None
        for fs, ft in zip(student, teacher):
            st, vt = factors(ft[b], k)
            _, vs = factors(fs[b], k + 3)
            aligned = np.zeros_like(vt)
            for j in range(k):
                cos = vs.T @ vt[:, j]
                best = np.abs(cos).max()
                for i in range(vs.shape[1]):
                    if abs(cos[i]) == best:
                        aligned[:, j] += np.sign(cos[i]) * vs[:, i]
            vs_scaled, vt_scaled = aligned * st, vt * st
            if previous is not None:
                ps, pt = previous
                for c in range(vs_scaled.shape[0]):
                    for c2 in range(ps.shape[0]):
                        rs = np.exp(-(vs_scaled[c] - ps[c2]) ** 2 / RBF)
                        rt = np.exp(-(vt_scaled[c] - pt[c2]) ** 2 / RBF)
                        out[b] += ((rs - rt) ** 2).sum()
            previous = (vs_scaled, vt_scaled)
    return out


def kdsvd_inputs(seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 4, 4), (6, 2, 2), (5, 2, 2)]  # [C, H, W]: HW > C, then HW < C
    student = [torch.randn(batch, *s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    teacher = [torch.randn(batch, *s, generator=g, dtype=torch.float64) for s in shapes]
    return shapes, student, teacher


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_matches_a_float64_numpy_computation(k):
    shapes, student, teacher = kdsvd_inputs()
    distiller = KDSVD(["stage1", "stage2", "stage3"], shapes, shapes, KDSVDConfig(k=k))
    terms = distiller(student, teacher, torch.zeros(3, dtype=torch.long))
    assert list(terms) == distiller.term_names() == ["kdsvd/stage2", "kdsvd/stage3"]
    expected_total = reference_kdsvd([s.detach().numpy() for s in student], [t.numpy() for t in teacher], k).mean()
    assert math.isclose(float(sum(terms.values()).detach()), expected_total, rel_tol=1e-9)
    # The first pair alone is the two-spot distiller's one term.
    two = KDSVD(["stage1", "stage2"], shapes[:2], shapes[:2], KDSVDConfig(k=k))
    first = reference_kdsvd([s.detach().numpy() for s in student[:2]], [t.numpy() for t in teacher[:2]], k).mean()
    assert math.isclose(float(two(student[:2], teacher[:2], None)["kdsvd/stage2"].detach()), first, rel_tol=1e-9)
    assert math.isclose(float(terms["kdsvd/stage2"].detach()), first, rel_tol=1e-9)


def test_kdsvd_hand_case():
    # Spot 1: both diag(5,4,3,2,1) (top right vector e1). Spot 2: the teacher's top vector is e5, orthogonal to the
    # student's top four (e1..e4), so every |cos| ties at 0 and the aligned student vector is zero. With k = 1 the
    # normalised singular value is 1: the RBF matrices differ only in row 4 (teacher) and column 0.
    diag = torch.diag(torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64))
    spot1 = diag.T.reshape(1, 5, 5, 1)  # [B, C, H, W] whose [HW, C] matrix is diag
    teacher2 = torch.diag(torch.tensor([1.0, 1.1, 1.2, 1.3, 5], dtype=torch.float64)).T.reshape(1, 5, 5, 1)
    distiller = KDSVD(["stage1", "stage2"], [(5, 5, 1)] * 2, [(5, 5, 1)] * 2)
    value = float(distiller([spot1, spot1.clone()], [spot1, teacher2], None)["kdsvd/stage2"])
    # The teacher's own SVD signs (sigma1 on e1, sigma2 on e5) enter its RBF at (row 4, column 0).
    _, _, vh1 = torch.linalg.svd(spot1[0].flatten(1).T)
    _, _, vh2 = torch.linalg.svd(teacher2[0].flatten(1).T)
    same_sign = float(vh1[0, 0]) * float(vh2[0, 4]) > 0
    e = math.exp(-1 / 8)
    expected = 5 * (1 - e) ** 2 if same_sign else 4 * (1 - e) ** 2 + (math.exp(-1 / 2) - e) ** 2
    assert math.isclose(value, expected, rel_tol=1e-12)


def test_top_singular_gradient_matches_autograd_and_finite_differences():
    g = torch.Generator().manual_seed(1)
    for rows, cols in [(12, 5), (4, 9)]:
        x = torch.randn(2, rows, cols, generator=g, dtype=torch.float64, requires_grad=True)
        weights_v = torch.randn(2, cols, 3, generator=g, dtype=torch.float64)
        weights_s = torch.randn(2, 3, generator=g, dtype=torch.float64)

        def ours(m):
            values, vectors = top_right_singular(m, 3)
            # Sign-invariant in v (squared), as KDSVD's use after alignment is.
            return (vectors.pow(2) * weights_v).sum() + (values * weights_s).sum()

        def torchs(m):
            _, values, vh = torch.linalg.svd(m, full_matrices=False)
            return (vh.transpose(-2, -1)[:, :, :3].pow(2) * weights_v).sum() + (values[:, :3] * weights_s).sum()

        assert torch.autograd.gradcheck(ours, (x,))
        (mine,) = torch.autograd.grad(ours(x), x)
        (theirs,) = torch.autograd.grad(torchs(x), x)
        assert torch.allclose(mine, theirs, atol=1e-10)


def test_rank_deficient_maps_keep_finite_gradients():
    # Two dead channels: torch's full SVD backward divides 0 by the zero gap between them (NaN).
    shapes, student, teacher = kdsvd_inputs()
    with torch.no_grad():
        student[0][:, 2:] = 0
    distiller = KDSVD(["stage1", "stage2", "stage3"], shapes, shapes)
    sum(distiller(student, teacher, None).values()).backward()
    assert all(torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 for s in student)
    x = student[0].detach().flatten(2).transpose(1, 2).requires_grad_()
    torch.linalg.svd(x, full_matrices=False)[2][:, 0].sum().backward()
    assert not torch.isfinite(x.grad).all()  # the reference's SVD would have poisoned the step


def test_kdsvd_masks_select_samples():
    shapes, student, teacher = kdsvd_inputs(batch=6)
    distiller = KDSVD(["stage1", "stage2", "stage3"], shapes, shapes)
    mask = torch.tensor([1.0, 0, 1, 1, 0, 1])
    per_sample = reference_kdsvd([s.detach().numpy() for s in student], [t.numpy() for t in teacher])
    plain = distiller(student, teacher, None)
    ones = distiller(student, teacher, None, masks=[torch.ones(6)] * 3)
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    masked = distiller(student, teacher, None, masks=[mask] * 3)
    assert math.isclose(float(sum(masked.values()).detach()), float((per_sample * mask.numpy()).sum() / 6), rel_tol=1e-9)
    sum(masked.values()).backward()
    for feat in student:
        assert_gradients_follow_mask(feat, mask)


def test_kdsvd_defaults_and_refusals():
    assert D.get("kdsvd").defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=1.0, spots=("stages",))
    with pytest.raises(ValueError, match="consecutive spots"):
        KDSVD(["stage2"], [(4, 2, 2)], [(4, 2, 2)])
    with pytest.raises(ValueError, match="spatial maps"):
        KDSVD(["stage3", "pooled"], [(4, 2, 2), (8,)], [(4, 2, 2), (8,)])
    with pytest.raises(ValueError, match="kdsvd k"):
        D.create("kdsvd", M.staged(M.create("resnet8", num_classes=10)), M.staged(M.create("resnet8", num_classes=10)),
                 (3, 16, 16), k=0)


# ---- OFD

def numerical_negative_mean(mean: float, std: float) -> float:
    """E[x | x < 0] for x ~ N(mean, std^2) by the trapezoid rule on a fine grid (float64)."""
    x = np.linspace(mean - 12 * std, 0.0, 400001)
    density = np.exp(-((x - mean) / std) ** 2 / 2)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it
    return float(trapezoid(x * density, x) / trapezoid(density, x))


def test_margin_is_the_expected_negative_response():
    weight = torch.tensor([1.0, 2.0, -0.5, 1.0, 0.3, 0.0, 0.0], dtype=torch.float64)
    bias = torch.tensor([0.0, 1.0, -0.2, 3.0, 2.0, -0.7, 0.4], dtype=torch.float64)
    margin = bn_margin(weight, bias)
    for c in range(4):  # P(x < 0) > 0.001: the conditional mean, |weight| as the std
        assert math.isclose(float(margin[c]), numerical_negative_mean(float(bias[c]), abs(float(weight[c]))),
                            rel_tol=1e-6)
    assert math.isclose(float(margin[0]), -math.sqrt(2 / math.pi), rel_tol=1e-12)  # hand: half-normal mean
    assert math.isclose(float(margin[4]), -0.9, rel_tol=1e-12)  # P(x < 0) = Phi(-6.67) < 0.001: -3 std
    assert margin[5] == -0.7 and margin[6] == 0.0  # std 0: the limits


def reference_ofd(student: np.ndarray, teacher: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """Per-sample partial L2 from the paper's case list, element by element."""
    out = np.zeros(student.shape[0])
    for index in np.ndindex(*student.shape):
        s, t, m = student[index], teacher[index], margin[index[1]]
        if t > 0:
            out[index[0]] += (s - t) ** 2
        elif t > m and s > t:
            out[index[0]] += (s - t) ** 2
        elif t <= m and s > m:
            out[index[0]] += (s - m) ** 2
    return out


def test_ofd_loss_matches_the_case_list_and_a_hand_case():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    margin = torch.tensor([-0.5, -1.0, -0.2, -2.0], dtype=torch.float64)
    expected = reference_ofd(student.detach().numpy(), teacher.numpy(), margin.numpy())
    assert np.allclose(ofd_loss(student, teacher, margin).detach().numpy(), expected, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda s: ofd_loss(s, teacher, margin), (student,))
    # Hand case, margin -1: t=2,s=1 -> 1; t=-0.5,s=0 -> 0.25; t=-0.5,s=-0.7 -> 0; t=-3,s=0 -> 1; t=-3,s=-2 -> 0.
    s = torch.tensor([[[[1.0]], [[0.0]], [[-0.7]], [[0.0]], [[-2.0]]]])
    t = torch.tensor([[[[2.0]], [[-0.5]], [[-0.5]], [[-3.0]], [[-3.0]]]])
    assert float(ofd_loss(s, t, torch.full((5,), -1.0))) == pytest.approx(2.25)


def test_ofd_reads_margins_from_the_teacher_batchnorm():
    torch.manual_seed(0)
    teacher, student = M.frozen(M.create("resnet8x4", num_classes=10)), M.staged(M.create("resnet8", num_classes=10))
    bns = [teacher.model.layer1[-1].bn2, teacher.model.layer2[-1].bn2, teacher.model.layer3[-1].bn2]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.2, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    distiller, s_spots, t_spots = D.create("ofd", student, teacher, (3, 16, 16))
    assert s_spots == t_spots == [1, 2, 3] and distiller.student_preact and distiller.teacher_preact
    for margin, bn in zip(distiller.margins(), bns):
        assert torch.allclose(margin.double(), bn_margin(bn.weight, bn.bias))
        c = 3
        assert math.isclose(float(margin[c]), numerical_negative_mean(float(bn.bias[c]), float(bn.weight[c])),
                            rel_tol=1e-5)
    assert distiller.stage_weights == [0.25, 0.5, 1.0]
    # Terms: the connector's output against the pooled teacher pre-activation, weighted per stage.
    x = torch.randn(4, 3, 16, 16)
    s_out, t_out = student(x, preact=True), teacher(x, preact=True)
    distiller.eval()
    terms = distiller([s_out.preacts[k] for k in s_spots], [t_out.preacts[k] for k in t_spots], None)
    for i, (k, name) in enumerate(zip(s_spots, ["stage1", "stage2", "stage3"])):
        projected = distiller.connectors[i](s_out.preacts[k])
        expected = ofd_loss(projected, t_out.preacts[k], distiller.margins()[i]).mean() * distiller.stage_weights[i]
        assert torch.allclose(terms[f"ofd/{name}"], expected)
    # The margins travel in the state_dict.
    fresh = OFD(distiller.spot_names, [s_out.preacts[k].shape[1:] for k in s_spots],
                [t_out.preacts[k].shape[1:] for k in t_spots])
    fresh.load_state_dict(distiller.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.margins(), distiller.margins()))


def test_ofd_connector_and_masks():
    distiller = OFD(["stage1"], [(3, 4, 4)], [(5, 2, 2)])
    conv, bn = distiller.connectors[0]
    assert conv.kernel_size == (1, 1) and conv.bias is None and conv.out_channels == 5 and bn.num_features == 5
    assert D.get("ofd").defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=0.001, spots=("stages",))
    distiller.eval()
    student = torch.randn(6, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(6, 5, 4, 4)  # pooled to the student's 4x4 (no-op) then compared
    mask = torch.tensor([1.0, 0, 1, 1, 0, 1])
    per_sample = ofd_loss(distiller.connectors[0](student), teacher, distiller.margins()[0])
    masked = distiller([student], [teacher], None, masks=[mask])["ofd/stage1"]
    assert torch.allclose(masked, (per_sample * mask).sum() / 6)
    masked.backward()
    assert_gradients_follow_mask(student, mask)
    with pytest.raises(ValueError, match="odd size"):
        D.create("ofd", M.staged(M.create("resnet8", num_classes=10)), M.frozen(M.create("resnet8", num_classes=10)),
                 (3, 16, 16), connector_kernel=2)


def test_ofd_refuses_teachers_and_students_without_what_it_reads():
    student = M.staged(M.create("resnet8", num_classes=10))
    with pytest.raises(ValueError, match="BatchNorm before the ReLU.*ShuffleNetV1"):
        D.create("ofd", student, M.frozen(M.create("ShuffleV1", num_classes=10)), (3, 32, 32))
    torchvision = pytest.importorskip("torchvision")
    automatic = M.staged(torchvision.models.mobilenet_v3_small(num_classes=10))  # cut from its traced forward
    assert not automatic.has_layout
    # The factory refuses any pre-activation method on an automatically staged network first (one message for all).
    with pytest.raises(ValueError, match="ofd reads the student.s pre-activation features.*staged automatically"):
        D.create("ofd", automatic, M.frozen(M.create("resnet8", num_classes=10)), (3, 32, 32))


# ---- learning on the synthetic set under standard, SAKD and ABL

CASES = [(method, strategy) for method in ("kdsvd", "ofd") for strategy in LEARNING_STRATEGIES]


@pytest.mark.parametrize("method, strategy", slow_except(CASES, ["kdsvd-sakd", "ofd-abl"]))
def test_learns_on_the_synthetic_set(tmp_path, synthetic_teacher, method, strategy):
    rows = learning_run(tmp_path, synthetic_teacher, method, strategy)
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
