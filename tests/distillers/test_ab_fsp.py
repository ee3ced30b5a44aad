"""AB and FSP (the CRD benchmark's initialisation methods): losses against the published formulas, masks, the
initialisation stage that trains the student, the pairs FSP refuses, and runs that learn."""
from __future__ import annotations

import csv
import itertools
import math

import pytest
import torch

import adakd.distillers as D
import adakd.models as M
from adakd.distillers.ab import AB, ABConfig, ab_loss
from adakd.distillers.fsp import FSP, flow_matrix, fsp_loss
from adakd.engine.pretrain import pretrain
from adakd.strategies.base import Precision
from distiller_checks import LEARNING_STRATEGIES, assert_gradients_follow_mask, check_gradient, learning_run
from markers import slow_except


# ---- AB: the alternative L2 loss of Heo et al., one neuron at a time (a code path of its own)


def ab_reference(student, teacher, margin):
    """Per-sample sum over neurons, in Python floats: (s+m)^2 [s > -m, t <= 0] + (s-m)^2 [s <= m, t > 0]."""
    out = []
    for s_row, t_row in zip(student.double().flatten(1).tolist(), teacher.double().flatten(1).tolist()):
        total = 0.0
        for s, t in zip(s_row, t_row):
            if t <= 0 and s > -margin:
                total += (s + margin) ** 2
            if t > 0 and s <= margin:
                total += (s - margin) ** 2
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_ab_loss_by_hand():
    # Teacher signs [+, -, +, -]; student [0.5, 0.5, 2, -2], margin 1:
    # t>0, s=0.5 <= 1 -> (0.5-1)^2 = 0.25; t<=0, s=0.5 > -1 -> 1.5^2 = 2.25; t>0, s=2 > 1 -> 0; t<=0, s=-2 -> 0.
    student = torch.tensor([[[[0.5, 0.5], [2.0, -2.0]]]], dtype=torch.float64)
    teacher = torch.tensor([[[[1.0, -1.0], [3.0, 0.0]]]], dtype=torch.float64)
    assert ab_loss(student, teacher, 1.0).tolist() == [2.5]
    # margin 0.5: 0 + 1.0 + 0 + 0 (s=0.5 <= 0.5 with t>0 -> (0.5-0.5)^2 = 0)
    assert ab_loss(student, teacher, 0.5).tolist() == [1.0]


@pytest.mark.parametrize("margin", [1.0, 0.3])
def test_ab_loss_matches_the_published_formula(margin):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    assert torch.allclose(ab_loss(student.double(), teacher.double(), margin), ab_reference(student, teacher, margin),
                          rtol=1e-12, atol=0)
    assert ab_loss(student, teacher, margin).dtype == torch.float32


def test_ab_gradient_matches_finite_differences():
    check_gradient(lambda s, t: ab_loss(s, t, 1.0), (3, 2, 3, 3), (3, 2, 3, 3))


def test_ab_terms_weights_connectors_and_masks():
    # Equal shapes at stage2 -> identity connector; other channels at stage1 -> 1x1 conv + BN, no ReLU.
    ab = AB(["stage1", "stage2"], [(2, 4, 4), (3, 2, 2)], [(4, 4, 4), (3, 2, 2)]).double().eval()
    assert isinstance(ab.connectors[1], torch.nn.Identity)
    assert [type(m).__name__ for m in ab.connectors[0].children()] == ["Conv2d", "BatchNorm2d", "Identity"]
    assert ab.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=0.0, spots=("stages",))
    assert ab.student_preact and ab.teacher_preact and ab.pretrain_trains_student
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True),
               torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)]
    teacher = [torch.randn(6, 4, 4, 4, generator=g, dtype=torch.float64, requires_grad=True),
               torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)]
    plain = ab(student, teacher, None)
    assert list(plain) == ["ab/stage1", "ab/stage2"]
    # RepDistiller: w = 2^(i - n + 1) = [0.5, 1]; sum over the batch / B * 3 / 1000.
    expected = [0.5 * ab_reference(ab.connectors[0](student[0]), teacher[0], 1.0).sum() / 6 * 3 / 1000,
                1.0 * ab_reference(student[1], teacher[1], 1.0).sum() / 6 * 3 / 1000]
    assert all(torch.allclose(plain[k], e, rtol=1e-12) for k, e in zip(plain, expected))
    ones = ab(student, teacher, None, masks=[torch.ones(6), torch.ones(6)])
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    masks = [torch.tensor([1.0, 0, 1, 0, 0, 1]), torch.tensor([0.0, 1, 1, 1, 0, 0])]
    masked = ab(student, teacher, None, masks=masks)
    assert torch.allclose(masked["ab/stage2"],
                          (ab_reference(student[1], teacher[1], 1.0) * masks[1]).sum() / 6 * 3 / 1000, rtol=1e-12)
    sum(masked.values()).backward()
    for feat, mask in zip(student, masks):
        assert_gradients_follow_mask(feat, mask)
    assert all(t.grad is None for t in teacher)  # the teacher enters only through its signs
    assert ab(student, teacher, None, masks=[torch.zeros(6)] * 2)["ab/stage1"].item() == 0.0
    # The pre-training objective is the unmasked sum of the terms.
    assert torch.allclose(ab.pretrain_loss(teacher, student), sum(plain.values()))
    assert {id(p) for p in ab.pretrain_parameters()} == {id(p) for p in ab.connectors.parameters()}
    assert not ab.trainable_parameters()
    with pytest.raises(ValueError, match="margin"):
        ABConfig(margin=0.0)
    with pytest.raises(ValueError, match="spatial maps"):
        AB(["pooled"], [(8,)], [(8,)])


# ---- FSP: the flow matrix of Yim et al., entry by entry


def flow_reference(bottom, top):
    """G[b, j, i] = (1 / HW) sum_{h,w} top[b, j, h, w] * bottom[b, i, h, w], both maps of one size, float64 loops."""
    b, c1, h, w = bottom.shape
    c2 = top.shape[1]
    out = torch.zeros(b, c2, c1, dtype=torch.float64)
    for n, j, i in itertools.product(range(b), range(c2), range(c1)):
        out[n, j, i] = sum(float(top[n, j, y, x]) * float(bottom[n, i, y, x])
                           for y in range(h) for x in range(w)) / (h * w)
    return out


def test_flow_matrix_by_hand_with_pooling():
    bottom = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]], dtype=torch.float64)     # 1 channel 2x2 -> pooled to 4
    top = torch.tensor([[[[2.0]], [[-1.0]]]], dtype=torch.float64)               # 2 channels 1x1
    assert flow_matrix(bottom, top).tolist() == [[[8.0], [-4.0]]]


def test_fsp_loss_matches_the_published_formula():
    g = torch.Generator().manual_seed(2)
    sb, st = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 3, 2, 2, generator=g,
                                                                                     dtype=torch.float64)
    tb, tt = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 3, 2, 2, generator=g,
                                                                                     dtype=torch.float64)
    pooled = [torch.nn.functional.avg_pool2d(x, 2) for x in (sb, tb)]  # 4x4 -> 2x2, as adaptive pooling here
    g_s, g_t = flow_reference(pooled[0], st), flow_reference(pooled[1], tt)
    assert torch.allclose(flow_matrix(sb, st), g_s, rtol=1e-12)
    expected = ((g_s - g_t) ** 2).flatten(1).mean(1)
    assert torch.allclose(fsp_loss(sb, st, tb, tt), expected, rtol=1e-12)
    check_gradient(lambda s, t: fsp_loss(s, st, t, tt), (3, 2, 4, 4), (3, 2, 4, 4))
    check_gradient(lambda s, t: fsp_loss(sb, s, tb, t), (3, 3, 2, 2), (3, 3, 2, 2))


def test_fsp_terms_pairs_and_masks():
    shapes = [(2, 4, 4), (2, 4, 4), (3, 2, 2)]
    fsp = FSP(["stem", "stage1", "stage2"], shapes, shapes)
    assert fsp.term_names() == ["fsp/stem-stage1", "fsp/stage1-stage2"]
    assert fsp.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=0.0, spots=(0, "stages"))
    assert not fsp.state_dict() and fsp.pretrain_trains_student
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(6, *s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    teacher = [torch.randn(6, *s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    plain = fsp(student, teacher, None)
    assert list(plain) == fsp.term_names()
    assert torch.allclose(plain["fsp/stage1-stage2"], fsp_loss(student[1], student[2], teacher[1], teacher[2]).mean())
    ones = fsp(student, teacher, None, masks=[torch.ones(6)] * 3)
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    masks = [torch.tensor([1.0, 1, 1, 0, 1, 1]), torch.tensor([1.0, 0, 1, 1, 0, 1]), torch.tensor([1.0, 0, 1, 1, 1, 0])]
    masked = fsp(student, teacher, None, masks=masks)
    both = masks[1] * masks[2]  # a pair's samples: selected at both of its spots
    assert torch.allclose(masked["fsp/stage1-stage2"],
                          (fsp_loss(student[1], student[2], teacher[1], teacher[2]) * both).sum() / 6)
    masked["fsp/stage1-stage2"].backward()
    assert_gradients_follow_mask(student[2], both)
    assert all(t.grad is None for t in teacher)
    assert torch.allclose(fsp.pretrain_loss(teacher, student), sum(plain.values()))


# ---- the pairs FSP refuses and the networks AB cannot read


def staged(name: str) -> M.StagedModel:
    torch.manual_seed(0)
    return M.staged(M.create(name, num_classes=10))


def test_fsp_refuses_unequal_channels_and_stage_counts_in_one_line():
    with pytest.raises(ValueError, match=r"equal channels at every spot \(stem: student 16 vs teacher 32"):
        D.create("fsp", staged("resnet8"), staged("resnet8x4"), (3, 16, 16))
    with pytest.raises(ValueError, match="as many body stages; the student has 3 and the teacher 4"):
        D.create("fsp", staged("resnet8"), staged("resnet18"), (3, 32, 32))
    with pytest.raises(ValueError, match="consecutive spots, but got one"):
        D.create("fsp", staged("resnet8"), staged("resnet14"), (3, 16, 16), spots=(2,))


def test_ab_refuses_a_network_without_pre_activations():
    external = M.staged(M.create("timm:mobilenetv3_small_050", num_classes=10))
    assert external.auto_cut and not staged("resnet18").auto_cut
    with pytest.raises(ValueError, match="ab reads the student's pre-activation features .* staged automatically"):
        D.create("ab", external, staged("resnet18"), (3, 32, 32))


# ---- the initialisation stage (engine/pretrain.py) trains the student


class FixedBatches:
    """A loader of fixed batches with the engine loader's `set_epoch`."""

    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("method", ["ab", "fsp"])
def test_initialisation_stage_trains_the_student_not_the_teacher(method):
    student, teacher = staged("resnet8"), M.frozen(M.create("resnet14", num_classes=10))
    distiller, s_spots, t_spots = D.create(method, student, teacher, (3, 16, 16), pretrain_epochs=6)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.zeros(8, dtype=torch.long), torch.arange(8))
               for _ in range(2)]
    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    history = pretrain(distiller, teacher, t_spots, FixedBatches(batches), Precision(torch.device("cpu"), False),
                       progress=False, student=student, student_spots=s_spots, run_lr=0.05)
    assert len(history) == 6 and all(b < a for a, b in zip(history, history[1:])), history
    moved = {n for n, p in student.model.named_parameters() if not torch.equal(before[n], p)}
    assert "conv1.weight" in moved and "layer3.0.conv1.weight" in moved
    assert not {n for n in moved if n.startswith("fc.")}  # RepDistiller trains get_feat_modules() only
    assert all(torch.equal(teacher_before[n], p) for n, p in teacher.model.named_parameters())
    assert all(p.requires_grad for p in student.parameters())  # the student keeps learning afterwards
    assert all(not p.requires_grad for p in distiller.pretrain_parameters())  # AB's connectors are frozen
    with pytest.raises(ValueError, match="student_spots"):
        pretrain(distiller, teacher, t_spots, FixedBatches(batches), Precision(torch.device("cpu"), False))


# ---- runs on the synthetic set: the stage, then training under standard, SAKD and ABL

CASES = [(method, strategy) for method in ("ab", "fsp") for strategy in LEARNING_STRATEGIES]


@pytest.mark.parametrize("method, strategy", slow_except(CASES, ["ab-standard", "fsp-sakd"]))
def test_learns_on_the_synthetic_set(tmp_path, synthetic_teacher, method, strategy):
    # method_weight 1 keeps the term in the distillation stage, so SAKD's masks and ABL's blocks act on it.
    rows = learning_run(tmp_path, synthetic_teacher, method, strategy, "distill.args.pretrain_epochs=3",
                        "distill.method_weight=1")
    pretrained = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "run" / "pretrain.csv"))]
    # The stage ran (its fall is checked on fixed batches above; 4 augmented steps an epoch are too noisy here).
    assert len(pretrained) == 3 and all(math.isfinite(v) and v > 0 for v in pretrained), pretrained
    # The task loss, not the total: after its init stage FSP's term first rises as the student leaves the
    # stage's fit (measured total 2.85, 2.81, 2.85 while CE fell 2.32, 2.26, 2.22).
    losses = [float(r["train/ce"]) for r in rows]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
