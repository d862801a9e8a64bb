"""Memory-aware dispatch: auto skips a backend whose (i, j)-sized intermediate exceeds the budget, says so
in `explain`, and lands on the memory-bounded `chunked` backend; a named backend ignores the budget.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def test_window_reasons_say_what_each_backend_would_hold(budget):
    """`attend explain --shape 1,8,16384,64 --causal --window 512,0`: sdpa:math runs query blocks of 512 rows, each
    against at most 1024 keys, so it holds 16 MiB of scores per block (in training autograd keeps all 32 blocks':
    504 MiB), not the 8 GiB (b, h, i, j) of one call; einsum builds the full (b, h, i, j) logits, and says so."""
    n = 16384
    q = torch.zeros(1, 8, n, 64)
    report = explain(q, q, q, causal=True, window=(512, 0))
    assert report.reasons["sdpa:math"] == [], "16 MiB per block fits the 1 GiB budget"
    assert not any("8.0 GiB" in r or "16384, 16384" in r for r in report.reasons["sdpa:math"])
    assert report.reasons["einsum"] == [
        "needs a 8.0 GiB (b, h, i, j) = (1, 8, 16384, 16384) intermediate > budget 1.0 GiB "
        "(attend.dispatch.MEMORY_BUDGET_BYTES; auto only)"
    ]
    block = 8 * 512 * 1024 * 4  # (b, h, rows, keys) float32: rows [x, x + 512) see keys [x - 512, x + 512)
    inp = validate(q, q, q, causal=True, window=(512, 0))
    assert get_backend("sdpa:math").intermediate_bytes(inp) == block
    assert get_backend("einsum").intermediate_bytes(inp) == 8 * n * n * 4
    assert (
        "sdpa:math: window (512, 0) lowered per block of 512 queries: only the keys the block can see, a mask only "
        "where a block is partly visible; holds query blocks of 512 rows against at most 1024 keys each: up to "
        "16.0 MiB of (b, h, rows, keys) = (1, 8, 512, 1024) scores per block"
    ) in report.lowering

    budget(8 * 2**20)  # below one block: the reason names the blocks
    report = explain(q, q, q, causal=True, window=(512, 0), dropout_p=0.1)
    assert report.reasons["sdpa:math"] == [
        "needs query blocks of 512 rows against at most 1024 keys each: up to 16.0 MiB of (b, h, rows, keys) = "
        "(1, 8, 512, 1024) scores per block > budget 8.0 MiB (attend.dispatch.MEMORY_BUDGET_BYTES; auto only)"
    ]

    train = q.clone().requires_grad_()
    held = get_backend("sdpa:math").intermediate(validate(train, train, train, causal=True, window=(512, 0)))
    assert held is not None
    assert held.nbytes == 8 * 512 * 4 * (512 + 31 * 1024)  # the first block sees 512 keys, the other 31 see 1024
    assert held.what.endswith("training keeps all 32 for the backward: 504.0 MiB")


def test_document_blocks_are_sized_by_the_keys_each_block_sees(budget):
    """8 packed documents of 512 tokens, causal: each 512-row query block of sdpa:math sees only its own document
    (8 MiB of scores), where einsum holds the whole (b, h, i, j) logits (512 MiB)."""
    n = 4096
    q = torch.zeros(1, 8, n, 64)
    ids = torch.arange(n)[None] // 512
    inp = validate(q, q, q, causal=True, documents=ids)
    assert get_backend("sdpa:math").intermediate_bytes(inp) == 8 * 512 * 512 * 4
    assert get_backend("einsum").intermediate_bytes(inp) == 8 * n * n * 4
    budget(4 * 2**20)
    report = explain(q, q, q, causal=True, documents=ids, dropout_p=0.1)
    assert report.reasons["sdpa:math"] == [
        "needs query blocks of 512 rows against at most 512 keys each: up to 8.0 MiB of (b, h, rows, keys) = "
        "(1, 8, 512, 512) scores per block > budget 4.0 MiB (attend.dispatch.MEMORY_BUDGET_BYTES; auto only)"
    ]
    assert report.reasons["einsum"] == [
        "needs a 512.0 MiB (b, h, i, j) = (1, 8, 4096, 4096) intermediate > budget 4.0 MiB "
        "(attend.dispatch.MEMORY_BUDGET_BYTES; auto only)"
    ]


def test_causal_with_a_mask_is_sized_by_its_largest_key_prefix():
    """Causal with key padding at i > 512: sdpa:math runs query blocks of 512 rows against their key prefix, so the
    largest block is (b, h, 512, j); causal alone at i == j is one call, the whole (b, h, i, j)."""
    q = torch.zeros(1, 2, 2048, 16)
    pad = torch.ones(1, 2048, dtype=torch.bool)
    math = get_backend("sdpa:math")
    assert math.intermediate_bytes(validate(q, q, q, mask=pad, causal=True)) == 2 * 512 * 2048 * 4
    assert math.intermediate_bytes(validate(q, q, q, causal=True)) == 2 * 2048 * 2048 * 4
    assert math.intermediate_bytes(validate(q, q, q, mask=pad)) == 2 * 2048 * 2048 * 4


_PEAK_CHILD = r"""
import json, sys, torch
from attend import attention
from attend.dispatch import get_backend
from attend.inputs import validate

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

torch.set_num_threads(2)
out = {}
for grad in (False, True):
    q, k, v = (torch.randn(1, 8, 16, 64, requires_grad=grad) for _ in range(3))
    attention(q, k, v, causal=True, window=(128, 0), backend="sdpa:math")  # one-time set-up, not measured
    q, k, v = (torch.randn(1, 8, 4096, 64, requires_grad=grad) for _ in range(3))
    held = get_backend("sdpa:math").intermediate_bytes(validate(q, k, v, causal=True, window=(128, 0)))
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak mark (VmHWM) to the resident size
    o = attention(q, k, v, causal=True, window=(128, 0), backend="sdpa:math")
    if grad:
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    out["train" if grad else "fwd"] = (status("VmHWM") - before, held)
    del o
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_windowed_math_estimate_matches_a_measured_peak():
    """The estimate against what sdpa:math really allocates at (1, 8, 4096, 64), causal, window (128, 0), in a child
    process (peak RSS above the inputs, as `attend.bench.memory` measures it): at most the measured peak, and the
    peak at most 2x it plus the output's copies (the blocks' outputs, their `cat`, the gradients: 6 of (b, h, i, e)).
    Measured on a 2-vCPU CPU, torch 2.13: forward 36 MB against 10 MiB, fwd+bwd 147 MB against 78 MiB; the (b, h, i,
    j) estimate of before (512 MiB) was far above both."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # glibc returns freed blocks: a stable peak
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip("the peak RSS mark cannot be reset here (/proc/self/clear_refs)")
    assert proc.returncode == 0, proc.stderr
    copies = 6 * 8 * 4096 * 64 * 4
    for mode, (peak, held) in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert held <= peak <= 2 * held + copies, (mode, peak, held)
