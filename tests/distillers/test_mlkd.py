"""MLKD (issue 21): the loss's value and gradient against the published formula written out by hand in float64, the
device percentile against numpy, hand-worked small cases, per-sample masks, the two-view split, and short runs on
the synthetic set under standard, SAKD and ABL."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

import adakd.distillers as D
from adakd.cli import main
from adakd.distillers.mlkd import (MLKD, MLKDConfig, batch_correlation, class_correlation, confidence_masks,
                                   percentile)
from distiller_checks import (LEARNING_STRATEGIES, SYNTHETIC, assert_gradients_follow_mask, assert_learned, fixed_logits,
                              one_spot)
from markers import slow_except

B, C = 6, 7
TEMPERATURES = (4.0, 3.0, 5.0, 2.0, 6.0)


def mlkd(views: int = 1, **config) -> MLKD:
    context = D.DistillContext(num_classes=C, train_targets=torch.zeros(0, dtype=torch.long), views=views)
    return MLKD(["logits"], [(C,)], [(C,)], MLKDConfig(**config), context)


# ---- the published formula, one sample and one pair at a time (a code path of its own)


def softmax_row(row, temperature: float):
    exps = [torch.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kd_rows(student, teacher, temperature: float) -> list:
    """T^2 KL(p_t || p_s) per sample."""
    out = []
    for s_row, t_row in zip(student, teacher):
        p_s, p_t = softmax_row(list(s_row), temperature), softmax_row(list(t_row), temperature)
        out.append(temperature**2 * sum(a * (torch.log(a) - torch.log(b)) for a, b in zip(p_t, p_s)))
    return out


def grams(student, teacher, temperature: float):
    p_s = [softmax_row(list(r), temperature) for r in student]
    p_t = [softmax_row(list(r), temperature) for r in teacher]
    n, k = len(p_s), len(p_s[0])
    class_gram = [[sum(p_t[i][a] * p_t[i][b] - p_s[i][a] * p_s[i][b] for i in range(n)) for b in range(k)]
                  for a in range(k)]
    batch_gram = [[sum(p_t[i][c] * p_t[j][c] - p_s[i][c] * p_s[j][c] for c in range(k)) for j in range(n)]
                  for i in range(n)]
    return class_gram, batch_gram


def masks_by_numpy(teacher):
    """The reference's two masks, with np.percentile on the CPU as KD_ours.forward_train computes them."""
    p = torch.softmax(teacher.detach(), 1).numpy()
    confidence, class_confidence = p.max(1), p.sum(0)
    return confidence <= np.percentile(confidence, 50), class_confidence <= np.percentile(class_confidence, 50)


def mlkd_by_formula(s_weak, t_weak, s_strong=None, t_strong=None, form: str = "scale",
                    strong_all: bool = False) -> torch.Tensor:
    """KD_ours's losses summed (one MLKD weight outside): KD, CC and BC on the weak view with the confidence masks,
    plus the strong KD terms (T = 2, 6 on the weak logits unless `strong_all`)."""
    sample_mask, class_mask = masks_by_numpy(t_weak)
    n, k = len(s_weak), len(s_weak[0])
    total = 0
    for temperature in TEMPERATURES:
        kd = kd_rows(s_weak, t_weak, temperature)
        class_gram, batch_gram = grams(s_weak, t_weak, temperature)
        if form == "scale":  # (scalar * mask).mean() = scalar * kept share
            total = total + sum(kd) / n * sample_mask.mean()
            total = total + sum(v**2 for row in class_gram for v in row) / k * class_mask.mean()
            total = total + sum(v**2 for row in batch_gram for v in row) / n * sample_mask.mean()
        else:  # the unreduced forms: per kept sample, kept columns
            total = total + sum(v for v, keep in zip(kd, sample_mask) if keep) / n
            total = total + sum(row[b] ** 2 for row in class_gram for b in range(k) if class_mask[b]) / k
            total = total + sum(row[j] ** 2 for row in batch_gram for j in range(n) if sample_mask[j]) / n
    if s_strong is not None:
        for index, temperature in enumerate(TEMPERATURES):
            copy_paste = index >= 3 and not strong_all
            s, t = (s_weak, t_weak) if copy_paste else (s_strong, t_strong)
            total = total + sum(kd_rows(s, t, temperature)) / n
    return total


def inputs(seed: int, batch: int = B):
    return fixed_logits(seed, batch, C)


# ---- the percentile


@pytest.mark.parametrize("n", [1, 2, 5, 6, 64, 101])
@pytest.mark.parametrize("q", [0.0, 10.0, 50.0, 73.0, 100.0])
def test_percentile_matches_numpy(n, q):
    values = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert math.isclose(percentile(values, q).item(), np.percentile(values.numpy(), q), rel_tol=1e-13)
    # Selected entries only: the percentile of the sub-vector.
    weights = (torch.arange(n) % 3 != 1).double()
    expected = np.percentile(values.numpy()[weights.numpy() > 0], q)
    assert math.isclose(percentile(values, q, weights).item(), expected, rel_tol=1e-13)


def test_percentile_by_hand_and_of_nothing():
    # Sorted [0.1, 0.2, 0.3, 0.4]: the median interpolates halfway between 0.2 and 0.3.
    assert math.isclose(percentile(torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64), 50).item(), 0.25)
    # [0.1, 0.2, 0.3] at 75: position 1.5 -> 0.25.
    assert math.isclose(percentile(torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64), 75).item(), 0.25)
    assert percentile(torch.rand(4), 50, torch.zeros(4)).item() == 0.0


def test_confidence_masks_match_the_reference_numpy_ones():
    for seed in range(5):
        _, teacher = inputs(seed)
        sample_mask, class_mask = confidence_masks(teacher)
        expected_sample, expected_class = masks_by_numpy(teacher)
        assert sample_mask.tolist() == expected_sample.tolist() and class_mask.tolist() == expected_class.tolist()
        assert sample_mask.sum() == B // 2  # an even batch without ties keeps half


# ---- value and gradient against the formula


def assert_value_and_gradient(loss, reference, student) -> None:
    assert torch.allclose(loss, reference, rtol=1e-12, atol=1e-14)
    got, expected = (torch.autograd.grad(v, student)[0] for v in (loss, reference))
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-13)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("form", ["scale", "select"])
def test_one_view_matches_the_published_formula(form):
    student, teacher = inputs(1)
    loss = one_spot(mlkd(confidence_mask=form), "mlkd/logits", student, teacher)
    assert_value_and_gradient(loss, mlkd_by_formula(student, teacher, form=form), student)


@pytest.mark.parametrize("strong_all", [False, True])
def test_two_views_split_the_batch_into_weak_and_strong_halves(strong_all):
    s_weak, t_weak = inputs(2)
    s_strong, t_strong = inputs(3)
    student = torch.cat([s_weak, s_strong]).detach().requires_grad_()
    teacher = torch.cat([t_weak, t_strong])
    targets = torch.arange(B).repeat(2) % C
    loss = one_spot(mlkd(views=2, strong_all_temperatures=strong_all), "mlkd/logits", student, teacher, targets)
    reference = mlkd_by_formula(student[:B], teacher[:B], student[B:], teacher[B:], strong_all=strong_all)
    assert_value_and_gradient(loss, reference, student)
    # The copy-paste form reads the strong view at three temperatures only, the fixed one at all five.
    assert not torch.allclose(loss, mlkd_by_formula(student[:B], teacher[:B], student[B:], teacher[B:],
                                                    strong_all=not strong_all))
    # One view of the same batch is the weak half's loss alone.
    weak_only = one_spot(mlkd(), "mlkd/logits", student[:B], teacher[:B])
    assert torch.allclose(weak_only, mlkd_by_formula(student[:B], teacher[:B]), rtol=1e-12)


def test_standardize_z_scores_the_kd_terms_only():
    student, teacher = inputs(4)
    z = lambda x: (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-7)  # noqa: E731
    plain = mlkd(temperature=2.0, standardize=True)
    got = one_spot(plain, "mlkd/logits", student, teacher)
    sample_mask, _ = masks_by_numpy(teacher)
    kd_raw = sum(sum(kd_rows(student, teacher, t)) for t in (2.0, 3.0, 5.0, 2.0, 6.0)) / B * sample_mask.mean()
    kd_z = sum(sum(kd_rows(z(student), z(teacher), t)) for t in (2.0, 3.0, 5.0, 2.0, 6.0)) / B * sample_mask.mean()
    unstandardized = one_spot(mlkd(temperature=2.0), "mlkd/logits", student, teacher)
    assert torch.allclose(got, unstandardized - kd_raw + kd_z, rtol=1e-12)


# ---- hand-worked small cases


def test_correlation_terms_by_hand():
    # One sample, two classes, T = 1. Teacher [ln 3, 0] -> p_t = [3/4, 1/4]; student [0, 0] -> [1/2, 1/2].
    # BC: G_t = 9/16 + 1/16 = 5/8, G_s = 1/2; (1/8)^2 / B = 1/64 = 0.015625.
    # CC: G_t = [[9, 3], [3, 1]] / 16, G_s = [[4, 4], [4, 4]] / 16; diff [[5, -1], [-1, -3]] / 16;
    # squares (25 + 1 + 1 + 9) / 256 = 36/256; / C = 0.0703125.
    student = torch.zeros(1, 2, dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert math.isclose(batch_correlation(student, teacher, 1.0).item(), 0.015625, rel_tol=1e-13)
    assert math.isclose(class_correlation(student, teacher, 1.0).item(), 0.0703125, rel_tol=1e-13)


def test_whole_loss_by_hand_on_two_samples():
    # Two samples, two classes, the student uniform; sample 0: teacher [0, 0] (confidence 1/2, equal to the
    # student), sample 1: teacher [ln 3, 0] (confidence 3/4).
    # Median 5/8: sample 0 is kept, sample 1 not; class sums [5/4, 3/4], median 1: class 1 kept.
    # Scale form: share 1/2 of the samples and 1/2 of the classes. KD of sample 1 at T: T^2 KL([3^(1/T), 1]/Z ||
    # [1/2, 1/2]); sample 0: 0. So KD = 1/2 * 1/2 * sum_T T^2 KL_T(sample 1).
    student = torch.zeros(2, 2, dtype=torch.float64)
    teacher = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    sample_mask, class_mask = confidence_masks(teacher)
    assert sample_mask.tolist() == [True, False] and class_mask.tolist() == [False, True]

    def kl(temperature):
        a = 3 ** (1 / temperature)
        p = [a / (a + 1), 1 / (a + 1)]
        return temperature**2 * sum(v * math.log(2 * v) for v in p)

    kd = 0.25 * sum(kl(t) for t in TEMPERATURES)
    # KD at T = 4 alone, by hand: 3^(1/4) = 1.316074, p = [0.568237, 0.431763],
    # KL = 0.568237 ln 1.136474 + 0.431763 ln 0.863526 = 0.072698 - 0.063357 = 0.009341, x 16 = 0.14946.
    assert math.isclose(kl(4.0), 0.14946, abs_tol=1e-5)
    relational = sum(0.5 * class_correlation(student, teacher, t) + 0.5 * batch_correlation(student, teacher, t)
                     for t in TEMPERATURES)
    got = one_spot(mlkd(), "mlkd/logits", student, teacher).item()
    assert math.isclose(got, kd + relational.item(), rel_tol=1e-12)
    # The selection form keeps sample 0 only, whose KD is 0: the KD part vanishes.
    select = one_spot(mlkd(confidence_mask="select"), "mlkd/logits", student, teacher).item()
    relational_select = sum(class_correlation(student, teacher, t, None, class_mask)
                            + batch_correlation(student, teacher, t, None, sample_mask) for t in TEMPERATURES)
    assert math.isclose(select, relational_select.item(), rel_tol=1e-12)


# ---- masks


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("form", ["scale", "select"])
def test_masks_all_ones_all_zeros_and_a_subset(form, views):
    module = mlkd(views=views, confidence_mask=form)
    student, teacher = inputs(7, B * views)
    teacher.requires_grad_()
    targets = torch.arange(B * views) % C
    key = "mlkd/logits"
    plain = one_spot(module, key, student, teacher, targets)
    assert torch.equal(plain, one_spot(module, key, student, teacher, targets, masks=[torch.ones(B * views)]))
    zero = one_spot(module, key, student, teacher, targets, masks=[torch.zeros(B * views)])
    assert zero.item() == 0.0
    mask = torch.tensor([1.0, 0, 1, 1, 0, 1] * views)
    keep = mask.bool()
    masked = one_spot(module, key, student, teacher, targets, masks=[mask])
    sub_batch = one_spot(module, key, student[keep], teacher[keep], targets[keep])
    assert torch.allclose(masked, sub_batch * int(keep.sum()) / (B * views), rtol=1e-12)
    masked.backward()
    assert_gradients_follow_mask(student, mask)
    assert teacher.grad is None and not module.state_dict()


def test_float32_under_autocast():
    student, teacher = torch.randn(4, C), torch.randn(4, C)
    module = mlkd()
    plain = one_spot(module, "mlkd/logits", student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(one_spot(module, "mlkd/logits", student, teacher), plain)


# ---- defaults and bad input


def test_authors_cifar_defaults():
    assert MLKD.defaults == D.DistillerDefaults(0.1, 0.9, (-1,))
    assert MLKDConfig() == MLKDConfig(temperature=4.0, standardize=False, confidence_mask="scale",
                                      strong_all_temperatures=False)
    assert "mlkd" in D.available(tag="classic")


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="mlkd needs logit vectors of equal size"):
        MLKD(["logits"], [(10,)], [(100,)])
    with pytest.raises(ValueError, match=r"mlkd: distill.args.confidence_mask must be one of \('scale', 'select'\), "
                                         r"got 'half'"):
        MLKD(["logits"], [(C,)], [(C,)], MLKDConfig(confidence_mask="half"))
    with pytest.raises(ValueError, match="mlkd with standardize: true needs at least 2 classes"):
        MLKD(["logits"], [(1,)], [(1,)], MLKDConfig(standardize=True))


# ---- learning on the synthetic set under standard, SAKD and ABL

CASES = [(views, strategy) for views in (1, 2) for strategy in LEARNING_STRATEGIES]
INNER_LOOP = ["1-standard", "2-abl"]  # both view counts; SAKD runs in the other files' diagonals


@pytest.mark.parametrize("views, strategy", slow_except(CASES, INNER_LOOP))
def test_learns_on_the_synthetic_set(tmp_path, synthetic_teacher, views, strategy):
    # The strong view makes SAKD's CE noisier on 64 images: two more epochs show the trend.
    epochs = 5 if (views, strategy) == (2, "sakd") else 3
    argv = ["distill", *SYNTHETIC, f"epochs={epochs}", "model.name=resnet8", "teacher.name=resnet14",
            f"teacher.weights={synthetic_teacher}", "method=mlkd", f"out_dir={tmp_path}", "name=run",
            f"data.views={views}", *LEARNING_STRATEGIES[strategy]]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    columns = [c for c in rows[0] if c.startswith("train/mlkd/")]
    assert columns and all(math.isfinite(float(r[c])) for r in rows for c in columns)
    assert_learned(rows, strategy, epochs)


# ---- the two-view loader (data.views: 2)


def two_view_loader(seed: int = 3, epoch: int = 1):
    from adakd.data.arrays import ArrayDataset
    from adakd.data.loader import make_loader

    images = torch.randint(0, 256, (20, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    dataset = ArrayDataset(images, torch.arange(20) % 4, classes=list("abcd"), mean=(0.5,) * 3, std=(0.25,) * 3,
                           augment="crop_flip", crop_padding=4)
    one, two = (make_loader(dataset, 8, train=True, device="cpu", seed=seed, views=v) for v in (1, 2))
    for loader in (one, two):
        loader.set_epoch(epoch)
    return list(one), list(two)


def test_the_strong_view_replays_from_seed_and_epoch_and_differs_from_the_weak_one():
    one, two = two_view_loader()
    again = two_view_loader()[1]
    other_epoch = two_view_loader(epoch=2)[1]
    for (weak_images, weak_targets, weak_ids), (images, targets, ids) in zip(one, two):
        n = len(weak_images)
        assert images.shape[0] == 2 * n
        assert torch.equal(images[:n], weak_images)  # the weak half is exactly the one-view batch
        assert torch.equal(targets, weak_targets.repeat(2)) and torch.equal(ids, weak_ids.repeat(2))
        assert (images[n:] - images[:n]).abs().mean() > 0.1  # the strong half is another image
    assert all(torch.equal(a[0], b[0]) for a, b in zip(two, again))
    assert not torch.equal(two[0][0][8:], other_epoch[0][0][8:])


def test_randaugment_identity_draws_leave_the_image_and_cutout_fills_a_square():
    from adakd.data.strong_aug import CUTOUT_FILL, OPS, draw_randaugment, randaugment

    images = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    draws = draw_randaugment(torch.Generator().manual_seed(0), 4)
    draws["ops"][:] = [name for name, _, _ in OPS].index("identity")
    draws["cutout"][:, 0] = 0.0
    assert torch.equal(randaugment(images, **draws), images)
    # Side 0.5 * 8 = 4 centred at (4, 4): columns and rows 2..6 inclusive (PIL's rectangle) take the fill.
    draws["cutout"][:] = torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64)
    out = randaugment(images, **draws)
    fill = torch.tensor(CUTOUT_FILL).to(torch.uint8).view(1, 3, 1, 1)
    assert torch.equal(out[:, :, 2:7, 2:7], fill.expand(4, 3, 5, 5))
    assert torch.equal(out[:, :, :2], images[:, :, :2]) and torch.equal(out[:, :, 7:], images[:, :, 7:])


def test_views_two_on_a_folder_dataset_is_refused():
    from adakd.data.loader import make_loader

    with pytest.raises(ValueError, match="data.views: 2 needs a dataset held in memory"):
        make_loader(torch.utils.data.TensorDataset(torch.zeros(4, 3)), 2, train=True, device="cpu", views=2)


# ---- presets


def test_presets_carry_the_authors_values():
    from adakd.engine.config import resolve

    plain = resolve(["cifar100", "pair-resnet32x4-resnet8x4", "mlkd"])
    recipe = resolve(["cifar100", "pair-resnet32x4-resnet8x4", "mlkd-recipe"])
    ls = resolve(["cifar100", "pair-resnet32x4-resnet8x4", "mlkd-recipe", "mlkd-ls"])
    assert (plain.data.views, plain.optim.epochs, plain.distill.for_method().method_weight) == (1, 240, 0.9)
    assert (recipe.data.views, recipe.optim.epochs, recipe.optim.lr, recipe.data.batch_size) == (2, 480, 0.025, 64)
    assert list(recipe.optim.milestones) == [150, 180, 210] and recipe.optim.weight_decay == 5e-4
    method = ls.distill.for_method()
    assert (method.ce_weight, method.method_weight, method.args) == (0.1, 9.0, {"standardize": True,
                                                                                "temperature": 2.0})
    assert ls.data.views == 2
