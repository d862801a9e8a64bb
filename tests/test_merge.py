"""attend.merge: partial softmax results over disjoint key sets combine into the result over their union."""

from __future__ import annotations

import math

import pytest
import torch

from attend.merge import merge, merge_into


def _partial(s: torch.Tensor, v: torch.Tensor, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """out (rows, e) and lse (rows,) of rows of logits `s` over the keys `cols`; -inf logits are hidden keys."""
    lse = s[:, cols].logsumexp(-1)
    p = (s[:, cols] - lse.where(torch.isfinite(lse), torch.zeros_like(lse))[:, None]).exp()
    return torch.einsum("rj,rje->re", p, v[:, cols]), lse


@pytest.mark.parametrize("cuts", [(3,), (1, 4, 6), (2, 2, 5)], ids=str)
def test_stacked_parts_equal_the_softmax_over_their_union(cuts):
    s, v = torch.randn(3, 9, dtype=torch.float64), torch.randn(3, 9, 5, dtype=torch.float64)
    s[1, :6] = -math.inf  # row 1 sees keys only in the last part
    s[2] = -math.inf  # row 2 sees no key at all
    bounds = [0, *cuts, 9]
    parts = [_partial(s, v, slice(a, b)) for a, b in zip(bounds, bounds[1:])]
    out, lse = merge(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), with_lse=True)
    want = torch.einsum("rj,rje->re", s[:2].softmax(-1), v[:2])
    torch.testing.assert_close(out[:2], want)
    assert torch.equal(out[2], torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(lse[:2], s[:2].logsumexp(-1))
    assert lse[2] == -math.inf


def test_parts_owned_by_rows_merge_per_row_and_a_row_without_parts_is_zero():
    s, v = torch.randn(1, 8, dtype=torch.float64), torch.randn(1, 8, 3, dtype=torch.float64)
    parts = [_partial(s, v, c) for c in (slice(0, 2), slice(2, 8), slice(0, 8))]
    out = torch.stack([p[0] for p in parts])[:, 0]  # (3, e): parts 0, 1 are row 0's, part 2 row 2's
    lse = torch.stack([p[1] for p in parts])[:, 0]
    got, total = merge(out, lse, torch.tensor([0, 0, 2]), 3, with_lse=True)
    want = torch.einsum("j,je->e", s[0].softmax(-1), v[0])
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[2], want)
    assert torch.equal(got[1], torch.zeros(3, dtype=torch.float64)) and total[1] == -math.inf
    torch.testing.assert_close(total[0], s[0].logsumexp(-1))
    assert merge(out, lse, torch.tensor([0, 0, 2]), 3)[1] is None


def test_a_nan_a_row_sees_stays_nan():
    out = torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])
    lse = torch.tensor([0.5, 0.1])
    assert torch.isnan(merge(out, lse)[0][0])
    assert torch.isnan(merge(out, lse, torch.tensor([0, 0]), 1)[0][0, 0])


def test_merge_into_matches_merge():
    s, v = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, 2, dtype=torch.float64)
    s[3] = -math.inf
    a, b = _partial(s, v, slice(0, 6)), _partial(s, v, slice(6, 10))
    run_out, run_lse = a[0].clone(), a[1].clone()
    merge_into(run_out, run_lse, b[0].clone(), b[1].clone())
    out, lse = merge(torch.stack([a[0], b[0]]), torch.stack([a[1], b[1]]), with_lse=True)
    torch.testing.assert_close(run_out, out)
    torch.testing.assert_close(run_lse, lse)
