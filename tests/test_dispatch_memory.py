"""Memory-aware dispatch: auto skips a backend whose (i, j)-sized intermediate exceeds the budget, says so
in `explain`, and lands on the memory-bounded `chunked` backend; a named backend ignores the budget.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

import pytest
import torch

from attend import attention, dispatch, explain
from attend.dispatch import get_backend
from attend.inputs import validate


@pytest.fixture
def budget():
    """Set the budget for one test, restoring it (and the choice cache) after."""
    saved = dispatch.MEMORY_BUDGET_BYTES

    def set_budget(n):
        dispatch.MEMORY_BUDGET_BYTES = n

    yield set_budget
    dispatch.MEMORY_BUDGET_BYTES = saved
    dispatch.clear_cache()


def test_declared_intermediate_bytes():
    q = k = v = torch.zeros(2, 4, 64, 8)
    inp = validate(q, k, v)
    assert get_backend("einsum").intermediate_bytes(inp) == 2 * 4 * 64 * 64 * 4
    assert get_backend("sdpa:math").intermediate_bytes(inp) == 2 * 4 * 64 * 64 * 4
    assert get_backend("chunked").intermediate_bytes(inp) == 0
    assert get_backend("sdpa:flash").intermediate_bytes(inp) == 0
    inp64 = validate(q.double(), k.double(), v.double())
    assert get_backend("einsum").intermediate_bytes(inp64) == 2 * 4 * 64 * 64 * 8


def test_over_budget_auto_picks_chunked_and_explains_why(budget):
    budget(2**20)  # 1 MiB: (1, 8, 256, 256) float32 scores are 2 MiB
    q = torch.randn(1, 8, 256, 16)
    k = v = torch.randn(1, 2, 256, 16)
    # dropout: sdpa:flash on CPU cannot run it, so only math (over budget), chunked and einsum remain
    report = explain(q, k, v, causal=True, dropout_p=0.1)
    assert report.backend == "chunked"
    why = report.reasons["sdpa:math"]
    assert any("needs a 2.0 MiB (b, h, i, j) = (1, 8, 256, 256) intermediate > budget 1.0 MiB" in r for r in why)
    assert report.reasons["chunked"] == []
    assert "needs a 2.0 MiB" in str(report)
    out = attention(q, k, v, causal=True)  # without dropout sdpa:flash runs: it holds no (i, j) tensor
    assert explain(q, k, v, causal=True).backend == "sdpa:flash"
    assert out.shape == (1, 8, 256, 16)


def test_named_backend_ignores_the_budget(budget):
    budget(1)
    q = k = v = torch.randn(1, 2, 32, 8)
    out = attention(q, k, v, backend="einsum")
    torch.testing.assert_close(out, attention(q, k, v, backend="chunked"))
    assert explain(q, k, v, backend="einsum").backend == "einsum"
    assert explain(q, k, v, dropout_p=0.1).backend == "chunked"


def test_budget_change_is_not_hidden_by_the_cache(budget):
    q = k = v = torch.randn(1, 2, 64, 8)  # small: below the PROMOTE threshold, math goes first
    assert explain(q, k, v, dropout_p=0.1).backend == "sdpa:math"
    budget(1024)
    assert explain(q, k, v, dropout_p=0.1).backend == "chunked"


def test_long_sequence_never_lands_on_an_ij_path():
    """16k tokens with dropout (no SDPA fused kernel on CPU takes it): einsum and math would need 8 GiB."""
    n = 16384
    q = torch.zeros(1, 8, n, 64)
    report = explain(q, q, q, causal=True, dropout_p=0.1)
    assert report.backend == "chunked"
    assert any("8.0 GiB" in r for r in report.reasons["sdpa:math"])


def test_promote_rule_reorders_auto_for_matching_shapes(monkeypatch):
    """A shape-dependent rule moves a backend ahead only where its condition holds."""
    rule = ("cpu", "chunked", "sdpa:math", lambda inp: inp.i * inp.j >= 512 * 512)
    monkeypatch.setattr(dispatch, "PROMOTE", [rule])
    dispatch.clear_cache()
    small = torch.randn(1, 2, 64, 8)
    assert explain(small, small, small, dropout_p=0.1).backend == "sdpa:math"
    large = torch.randn(1, 2, 1024, 8)
    report = explain(large, large, large, dropout_p=0.1)
    assert report.backend == "chunked"
    assert list(report.reasons).index("chunked") < list(report.reasons).index("sdpa:math")
    monkeypatch.undo()
    dispatch.clear_cache()


def test_cpu_promotes_chunked_ahead_of_math_for_large_shapes():
    small = torch.randn(1, 2, 64, 8)
    assert explain(small, small, small, dropout_p=0.1).backend == "sdpa:math"
    large = torch.randn(1, 2, 512, 8)
    assert explain(large, large, large, dropout_p=0.1).backend == "chunked"


def test_cpu_promotes_chunked_ahead_of_flash_for_long_causal_masked_training():
    """CPU training with causal + a mask at d >= 128 and i >= 4096 runs chunked (sdpa:flash would go in query
    blocks, each adding a full-size dk/dv); everything else stays on sdpa:flash."""

    def pick(n: int, d: int, *, grad: bool = True, padded: bool = True, causal: bool = True, b: int = 1) -> str:
        q = torch.randn(b, 1, n, d, requires_grad=grad)
        pad = torch.ones(b, n, dtype=torch.bool)
        pad[:, -n // 5 :] = False
        report = explain(q, q, q, mask=pad if padded else None, causal=causal)
        assert report.backend is not None
        return report.backend

    assert pick(4096, 128) == "chunked"
    assert pick(8192, 256) == "chunked"
    assert pick(2048, 128) == "sdpa:flash"  # shorter
    assert pick(4096, 64) == "sdpa:flash"  # narrower heads
    assert pick(4096, 128, grad=False) == "sdpa:flash"  # inference
    assert pick(4096, 128, padded=False) == "sdpa:flash"  # causal alone: one flash call
    assert pick(4096, 128, causal=False) == "sdpa:flash"  # a mask alone: one flash call
