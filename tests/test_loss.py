"""Masks and losses of train/loss.py against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.loss import (
    LearnableTemperature,
    build_mask,
    distill_kl,
    distill_mse,
    info_nce,
    masked_fraction,
    mean_candidates,
    mi_lower_bound,
    multi_positive_masks,
    positive_mask,
)

T, F_ = True, False
E = math.exp

# Unit vectors with simple cosines. At t = 0.5 the logits q @ d.T / t are
#   row 0: [2.0, 1.2, 0.0]
#   row 1: [0.0, 1.6, 2.0]
#   row 2: [1.2, 2.0, 1.6]
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
D = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
TEMP = 0.5


# --- masks -------------------------------------------------------------------------------------


def test_build_mask_false_negative_and_duplicate():
    cols = ["p0", "p1", "na", "nb", "nc", "p1"]  # column 5 repeats row 1's positive
    known = [["p0", "p1"], ["p1", "nc"]]
    expected = torch.tensor([[F_, T, F_, F_, F_, T], [F_, F_, F_, F_, T, T]])
    assert torch.equal(build_mask(cols, known, 2), expected)


def test_build_mask_forbidden_ids_are_masked_like_known_positives():
    cols = ["p0", "p1", "na", "nb", "nc", "p1"]
    known = [["p0", "p1"], ["p1", "nc"]]
    expected = torch.tensor([[F_, T, F_, F_, F_, T], [F_, F_, T, F_, T, T]])
    assert torch.equal(build_mask(cols, known, 2, forbidden_ids=[set(), {"na"}]), expected)


def test_build_mask_never_masks_own_positive_even_when_repeated():
    # Both rows have the same positive doc: each keeps its own column and masks the other.
    mask = build_mask(["x", "x", "n"], [["x"], ["x"]], 2)
    assert torch.equal(mask, torch.tensor([[F_, T, F_], [T, F_, F_]]))


def test_build_mask_rejects_bad_layout():
    with pytest.raises(ValueError, match="known_pos_ids"):
        build_mask(["a", "b"], [["a"]], 2)
    with pytest.raises(ValueError, match="n_rows"):
        build_mask(["a"], [["a"], ["b"]], 2)


def test_positive_mask_counts_each_doc_once():
    cols = ["p0", "p1", "na", "p0b", "p1"]
    known = [["p0", "p0b"], ["p1", "p0"]]
    expected = torch.tensor([[T, F_, F_, T, F_], [T, T, F_, F_, F_]])
    assert torch.equal(positive_mask(cols, known, 2), expected)
    # Own positive seen first in another row's column: only the own column counts.
    assert torch.equal(
        positive_mask(["x", "x"], [["x"], ["x"]], 2), torch.tensor([[T, F_], [F_, T]])
    )


def test_multi_positive_masks_take_positives_off_the_mask():
    cols = ["p0", "p1", "na", "p0b", "p1"]
    known = [["p0", "p0b"], ["p1", "p0"]]
    mask, pos = multi_positive_masks(cols, known, 2, forbidden_ids=[{"na"}, set()])
    assert torch.equal(mask, torch.tensor([[F_, F_, T, F_, T], [F_, F_, F_, F_, T]]))
    assert not (mask & pos).any()


# --- InfoNCE -----------------------------------------------------------------------------------


def test_info_nce_hand_value():
    rows = [
        -2.0 + math.log(E(2.0) + E(1.2) + E(0.0)),
        -1.6 + math.log(E(0.0) + E(1.6) + E(2.0)),
        -1.6 + math.log(E(1.2) + E(2.0) + E(1.6)),
    ]
    assert float(info_nce(Q, D, temperature=TEMP)) == pytest.approx(sum(rows) / 3, abs=1e-12)


def test_info_nce_hand_value_with_mask_entry():
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1] = True
    rows = [
        -2.0 + math.log(E(2.0) + E(0.0)),
        -1.6 + math.log(E(0.0) + E(1.6) + E(2.0)),
        -1.6 + math.log(E(1.2) + E(2.0) + E(1.6)),
    ]
    assert float(info_nce(Q, D, mask, TEMP)) == pytest.approx(sum(rows) / 3, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_empty_mask_equals_plain_cross_entropy(seed):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    d = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    plain = F.cross_entropy(q @ d.T / 0.05, torch.arange(4))
    empty = torch.zeros(4, 12, dtype=torch.bool)
    assert torch.allclose(info_nce(q, d, empty, 0.05), plain, atol=1e-6)
    assert torch.allclose(info_nce(q, d, None, 0.05), plain, atol=1e-6)


def test_decoupled_hand_value():
    rows = [
        -2.0 + math.log(E(1.2) + E(0.0)),
        -1.6 + math.log(E(0.0) + E(2.0)),
        -1.6 + math.log(E(1.2) + E(2.0)),
    ]
    got = info_nce(Q, D, temperature=TEMP, decoupled=True)
    assert float(got) == pytest.approx(sum(rows) / 3, abs=1e-12)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1] = True
    rows[0] = -2.0 + math.log(E(0.0))
    got = info_nce(Q, D, mask, TEMP, decoupled=True)
    assert float(got) == pytest.approx(sum(rows) / 3, abs=1e-12)


def test_decoupled_raises_without_negatives():
    mask = torch.tensor([[F_, T, T], [F_, F_, F_], [F_, F_, F_]])
    with pytest.raises(ValueError, match="negative"):
        info_nce(Q, D, mask, TEMP, decoupled=True)


def test_multi_positive_hand_value():
    positives = torch.eye(3, dtype=torch.bool)
    positives[0, 1] = True  # doc 1 is also a known positive of query 0
    lse0 = math.log(E(2.0) + E(1.2) + E(0.0))
    rows = [
        -((2.0 - lse0) + (1.2 - lse0)) / 2,
        -1.6 + math.log(E(0.0) + E(1.6) + E(2.0)),
        -1.6 + math.log(E(1.2) + E(2.0) + E(1.6)),
    ]
    got = info_nce(Q, D, temperature=TEMP, positives=positives)
    assert float(got) == pytest.approx(sum(rows) / 3, abs=1e-12)


def test_multi_positive_with_mask_is_finite_and_exact():
    positives = torch.eye(3, dtype=torch.bool)
    positives[0, 1] = True
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = True
    lse0 = math.log(E(2.0) + E(1.2))
    rows = [
        -((2.0 - lse0) + (1.2 - lse0)) / 2,
        -1.6 + math.log(E(1.6) + E(2.0)),
        -1.6 + math.log(E(1.2) + E(2.0) + E(1.6)),
    ]
    q = Q.clone().requires_grad_(True)
    got = info_nce(q, D, mask, TEMP, positives=positives)
    assert float(got.detach()) == pytest.approx(sum(rows) / 3, abs=1e-12)
    got.backward()
    assert torch.isfinite(q.grad).all()


def test_multi_positive_rejects_masked_positive():
    positives = torch.eye(3, dtype=torch.bool)
    positives[0, 1] = True
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1] = True
    with pytest.raises(ValueError, match="multi_positive_masks"):
        info_nce(Q, D, mask, TEMP, positives=positives)


def test_symmetric_hand_value_uses_only_positive_block():
    extra = torch.tensor([[0.8, 0.6]], dtype=torch.float64)  # a mined negative: column 3
    d = torch.cat([D, extra])
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = True  # doc 1 is a known positive of query 0: masked both ways
    # q->d, column 3 logits: row 0: 1.6, row 1: 1.2, row 2: (0.48 + 0.48) / 0.5 = 1.92
    q2d = [
        -2.0 + math.log(E(2.0) + E(0.0) + E(1.6)),
        -1.6 + math.log(E(0.0) + E(1.6) + E(2.0) + E(1.2)),
        -1.6 + math.log(E(1.2) + E(2.0) + E(1.6) + E(1.92)),
    ]
    # d->q, doc j over queries i (column j of the logits), query 0 masked for doc 1
    d2q = [
        -2.0 + math.log(E(2.0) + E(0.0) + E(1.2)),
        -1.6 + math.log(E(1.6) + E(2.0)),
        -1.6 + math.log(E(0.0) + E(2.0) + E(1.6)),
    ]
    expected = (sum(q2d) / 3 + sum(d2q) / 3) / 2
    got = info_nce(Q, d, mask, TEMP, symmetric=True)
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_masked_column_does_not_change_loss_or_get_gradient():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    d = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[:, 5] = True  # e.g. a repeated doc: out of every row
    mask[1, 4] = True
    d2 = d.clone()
    d2[5] = F.normalize(torch.randn(8, generator=g), dim=0)
    assert torch.equal(info_nce(q, d, mask), info_nce(q, d2, mask))
    d_leaf = d.clone().requires_grad_(True)
    info_nce(q, d_leaf, mask).backward()
    assert torch.isfinite(d_leaf.grad).all()
    assert torch.equal(d_leaf.grad[5], torch.zeros(8))
    d3 = d.clone()
    d3[6] = F.normalize(torch.randn(8, generator=g), dim=0)  # an unmasked column does count
    assert not torch.equal(info_nce(q, d, mask), info_nce(q, d3, mask))


@pytest.mark.parametrize("kw", [{}, {"decoupled": True}, {"symmetric": True}])
def test_masked_losses_have_finite_gradients(kw):
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(3, 8, generator=g), dim=1).requires_grad_(True)
    d = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_(True)
    mask = build_mask(["a", "b", "c", "b", "x", "y"], [["a", "c"], ["b"], ["c"]], 3)
    info_nce(q, d, mask, **kw).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(d.grad).all()


def test_learnable_temperature_gets_gradient_and_stays_in_bounds():
    temp = LearnableTemperature(0.05)
    assert float(temp().detach()) == pytest.approx(0.05)
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    d = F.normalize(torch.randn(8, 8, generator=g), dim=1)
    info_nce(q, d, temperature=temp()).backward()
    assert temp.log_t.grad is not None and float(temp.log_t.grad) != 0.0
    with torch.no_grad():
        temp.log_t.fill_(5.0)
    assert float(temp().detach()) == pytest.approx(1.0)
    temp.clamp_()
    assert float(temp.log_t.detach()) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="init"):
        LearnableTemperature(2.0)


def test_bound_and_mask_stats():
    mask = torch.tensor([[F_, T, F_, F_], [F_, F_, T, T]])
    assert masked_fraction(mask) == pytest.approx(3 / 8)
    assert mean_candidates(mask, 4) == pytest.approx(2.5)
    assert mean_candidates(None, 4) == pytest.approx(4.0)
    assert mi_lower_bound(torch.tensor(1.0), 4.0) == pytest.approx(math.log(4) - 1.0)


# --- distillation ------------------------------------------------------------------------------


def test_distill_kl_zero_when_student_matches_teacher():
    teacher = torch.tensor([[3.0, 1.0, -2.0], [0.5, 0.2, 0.1]])
    assert float(distill_kl(teacher / 2.0, teacher, 2.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(distill_kl(torch.zeros(2, 3), teacher, 2.0)) > 0.0


def test_distill_kl_hand_value_and_padding():
    p0, p1 = E(1.0) / (E(1.0) + 1.0), 1.0 / (E(1.0) + 1.0)
    expected = p0 * math.log(p0 / 0.5) + p1 * math.log(p1 / 0.5)
    got = distill_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert float(got) == pytest.approx(expected, abs=1e-6)
    # A padded third candidate (any value) changes nothing, and its gradient is zero and finite.
    student = torch.tensor([[0.0, 0.0, 9.0]], requires_grad=True)
    valid = torch.tensor([[T, T, F_]])
    got = distill_kl(student, torch.tensor([[1.0, 0.0, -9.0]]), valid=valid)
    assert float(got.detach()) == pytest.approx(expected, abs=1e-6)
    got.backward()
    assert torch.isfinite(student.grad).all() and float(student.grad[0, 2]) == 0.0


def test_distill_mse_hand_value_and_padding():
    student = torch.tensor([[0.5, 0.2, 0.0]])
    teacher = torch.tensor([[0.7, 0.1, 5.0]])
    valid = torch.tensor([[T, T, F_]])
    assert float(distill_mse(student, teacher, valid)) == pytest.approx((0.04 + 0.01) / 2)
    assert float(distill_mse(student[:, :2], teacher[:, :2])) == pytest.approx(0.025)
