"""torch.compile over the `chunked` backend: fullgraph=True (so no graph break anywhere: no host read of
a tensor value, no data-dependent branch) with changing sequence lengths, static shapes (the default:
automatic dynamic) and dynamic=True, training and inference, causal + key padding + bias + grouped-query
heads (h=4, g=2), and dropout. Outputs and gradients equal eager.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

Lengths i = j in 9, 13, 64, 257 with the default CPU tiles (256 x 512): 9, 13 and 64 are one query tile,
257 is two. While tracing, the backend guards on the number of tiles of each length, never on the length
itself, so a graph is reused by every length with the same tile counts. What we measured (torch 2.13.0+cpu,
aot_eager, counted with CompileCounterWithBackend, which counts every graph dynamo hands over):

* default (automatic dynamic), frames after each length: 1, 2, 2, 3, for `attention` and `Attend`,
  training and inference. The first length compiles a static graph, the second
  recompiles once to a dynamic one, 64 reuses it, 257 (a second query tile) adds one.
* dynamic=True: 2, 2, 2, 3 (training and inference, `attention`, `Attend`, and
  `chunked_attention(validate(...))`), i.e. one graph per tile count; `Attend` in eval mode 1, 1, 1, 2. The first call counts 2 because dynamo restarts its first compile once, which is not a
  recompile: under dynamic=True the float `dropout_p` argument is symbolic, the first `dropout_p > 0`
  branch (the dispatcher's eligibility check, the backend's own) specialises it to 0.0, and the float
  tensorify pass then restarts the analysis (torch/fx/passes/_tensorify_python_scalars.py). `Attend` in
  eval mode passes the constant 0.0, and so does an `AttnInputs` built by hand: no restart.

Compilation on a 2-core CPU is slow (a training compile of one tile count: about 1.5 s with static shapes,
5 to 7 s with dynamic ones), so every test uses the "aot_eager" backend (dynamo and AOTAutograd, the parts
that could break the graph, without generating code), and each sweep runs once: `attention` with the
default compile, `Attend` with dynamic=True (the two share every line below `Attend.forward`).
"""

from __future__ import annotations

import pytest
import torch

from attend import Attend, attention
from attend.backends.chunked import chunked_attention, dropout_keep_mask
from attend.inputs import validate
from attend.testing import tolerance

from .helpers import compile_counter, fresh_dynamo, needs  # noqa: F401 (fresh_dynamo: a fixture, used by name)

# torch._dynamo.testing imports a deprecated torch.jit helper; not ours to fix
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("fresh_dynamo"),  # reset dynamo around every test
    needs("dynamo_traces_attend"),  # elsewhere attend runs eagerly under compile (tests/test_torch_features.py)
]

LENGTHS = (9, 13, 64, 257)
TILES = (256, 512)  # the default CPU tiles (attend.backends.chunked.TILES["cpu"])


# helpers


_counter = compile_counter


def _tile_counts(n: int) -> tuple[int, int]:
    return -(-n // TILES[0]), -(-n // TILES[1])


def _inputs(n: int, training: bool, seed: int = 0):
    """q (2, 4, n, 8), k, v (2, 2, n, 8): grouped-query heads; a key padding mask (batch 1 padded from
    2n/3 on) and a float bias (1, 4, n, n), learned (requires grad) in training."""
    gen = torch.Generator().manual_seed(seed + n)
    q = torch.randn(2, 4, n, 8, generator=gen).requires_grad_(training)
    k = torch.randn(2, 2, n, 8, generator=gen).requires_grad_(training)
    v = torch.randn(2, 2, n, 8, generator=gen).requires_grad_(training)
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[1, (2 * n) // 3 :] = False
    bias = torch.randn(1, 4, n, n, generator=gen).requires_grad_(training)
    return q, k, v, pad, bias


def _run(fn, inputs, training: bool):
    """fn's output and, in training, the gradients of every leaf (q, k, v, bias) under one fixed dout."""
    q, k, v, pad, bias = inputs
    if not training:
        with torch.no_grad():
            return [fn(q, k, v, pad, bias)]
    leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
    out = fn(*leaves[:3], pad, leaves[3])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def _assert_same(got, want):
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, **tolerance(a.dtype), msg=name)


def _sweep(fn, compiled, counter, training: bool) -> list[int]:
    """Run every length through the compiled and the eager fn; outputs and grads must match. Returns the
    frame count after each length."""
    counts = []
    for n in LENGTHS:
        inputs = _inputs(n, training)
        _assert_same(_run(compiled, inputs, training), _run(fn, inputs, training))
        counts.append(counter.frame_count)
    return counts


def _assert_one_graph_per_tile_count(counts: list[int]) -> None:
    """dynamic=True: after the first call (which may count a restart, see the module docstring), a new
    graph only where the tile counts change; never one per length."""
    new_graphs = len({_tile_counts(n) for n in LENGTHS}) - 1  # 257 is the only length with two query tiles
    assert counts[1:3] == [counts[0]] * 2, counts  # 13 and 64: no recompile
    assert counts[3] == counts[0] + new_graphs, counts
    assert counts[0] <= 2, counts  # one graph, plus at most one restart


def _attention(q, k, v, pad, bias):
    return attention(q, k, v, mask=pad, bias=bias, causal=True, backend="chunked")


# changing lengths


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_attention_fullgraph_changing_lengths(training):
    """`attention(..., backend="chunked")` under the default compile: one static graph, one dynamic
    recompile, then a new graph only for a new tile count (1, 2, 2, 3 frames)."""
    counter = _counter()
    compiled = torch.compile(_attention, fullgraph=True, backend=counter)
    counts = _sweep(_attention, compiled, counter, training)
    assert counts == [1, 2, 2, 3], counts


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_attend_dynamic_changing_lengths(training):
    """`Attend(backend="chunked")` compiled with dynamic=True: one graph per tile count, not per length."""
    attn = Attend(causal=True, backend="chunked").train(training)
    counter = _counter()
    compiled = torch.compile(attn, fullgraph=True, dynamic=True, backend=counter)
    counts = _sweep(
        lambda q, k, v, pad, bias: attn(q, k, v, mask=pad, bias=bias),
        lambda q, k, v, pad, bias: compiled(q, k, v, mask=pad, bias=bias),
        counter,
        training,
    )
    _assert_one_graph_per_tile_count(counts)


def test_backend_alone_dynamic_lengths_share_a_graph():
    """The backend without validate and dispatch (`AttnInputs` built by hand, so dropout_p is the constant
    0.0, not a symbolic float), dynamic=True, inference, two lengths of one tile count: exactly one graph,
    no restart (see the module docstring)."""
    from attend.inputs import AttnInputs

    def fn(q, k, v, pad, bias):
        inp = AttnInputs(q, k, v, mask=pad[:, None, None], bias=bias, causal=True, scale=8**-0.5)
        return chunked_attention(inp)

    from torch._dynamo.utils import counters

    counter = _counter()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    before = dict(counters["aot_autograd"])  # process-wide: earlier tests' compiles are counted there too
    frames = []
    for n in (13, 64):
        inputs = _inputs(n, training=False)
        _assert_same(_run(compiled, inputs, False), _run(fn, inputs, False))
        frames.append(counter.frame_count)
    # one graph, no restart: on torch 2.9.1 aot_eager fails its first attempt and dynamo restarts the frame once
    # (counters: aot_autograd total 2, ok 1; attend's code before this change did the same); the second length
    # shares the graph on every torch
    after = counters["aot_autograd"]
    restarts = (after["total"] - before.get("total", 0)) - (after["ok"] - before.get("ok", 0))
    assert frames == [1 + restarts, 1 + restarts], (frames, before, dict(after))


# what the sweeps do not cover: other masks, i != j, small tiles, -inf bias


@pytest.mark.parametrize("kind", ["bool-mask", "kv-cache", "neg-inf-bias", "small-tiles"], ids=lambda kind: kind)
def test_fullgraph_variants_match_eager(kind):
    """One length each, training: a bool (b, 1, i, j) mask; i != j (bottom-right causal, a 5-key cache); a
    bias with -inf entries and 3e38 garbage in the keys it rules out; many small tiles (ragged, causal
    tiles above the diagonal skipped, padding tiles masked instead of skipped)."""
    n = 9 if kind == "small-tiles" else 13  # 9 x 9 in tiles of 4 x 5: 3 x 2 tiles, ragged, one skipped
    q, k, v, mask, bias = (t.detach().clone() for t in _inputs(n, training=False))  # `_run` makes leaves
    q_tile, k_tile = (4, 5) if kind == "small-tiles" else (None, None)
    if kind == "bool-mask":
        mask = torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(1)) > 0.3
    if kind == "kv-cache":
        q, bias = q[:, :, 5:], bias[:, :, 5:]
    if kind == "neg-inf-bias":
        bias[..., 4] = float("-inf")
        k[:, :, 4] = 3e38

    def fn(q, k, v, mask, bias):
        inp = validate(q, k, v, mask=mask, bias=bias, causal=True, check_finite=False)
        return chunked_attention(inp, q_tile=q_tile, k_tile=k_tile)

    counter = _counter()
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    _assert_same(_run(compiled, (q, k, v, mask, bias), True), _run(fn, (q, k, v, mask, bias), True))
    assert counter.frame_count == 1


# dropout


def test_dropout_compiled_matches_eager_with_the_same_seed():
    """Training with dropout: the compiled call draws its seed as a tensor (no host read, no graph break)
    from the same generator as eager, so after the same `torch.manual_seed` both drop the same entries
    (aot_eager runs the draw eagerly; inductor would generate its own random numbers)."""
    inputs = _inputs(13, training=True)
    attn = Attend(dropout=0.3, causal=True, backend="chunked").train()

    def fn(q, k, v, pad, bias):
        return attention(q, k, v, mask=pad, bias=bias, causal=True, dropout_p=0.3, backend="chunked")

    for eager in (fn, lambda q, k, v, pad, bias: attn(q, k, v, mask=pad, bias=bias)):
        counter = _counter()
        compiled = torch.compile(eager, fullgraph=True, backend=counter)
        torch.manual_seed(11)
        got = _run(compiled, inputs, True)
        torch.manual_seed(11)
        want = _run(eager, inputs, True)
        _assert_same(got, want)
        assert counter.frame_count == 1
        torch.manual_seed(12)
        assert not torch.equal(_run(compiled, inputs, True)[0], got[0])  # a new draw, not a baked-in seed
        assert counter.frame_count == 1


def test_dropout_with_a_given_seed_rebuilds_with_dropout_keep_mask():
    """A seed given to `chunked_attention` is a constant of the graph: the compiled output equals eager's,
    and the dense keep-mask `dropout_keep_mask` rebuilds gives the same output through the reference."""
    q, k, v = _inputs(13, training=False)[:3]

    def fn(q, k, v):
        return chunked_attention(validate(q, k, v, causal=True, dropout_p=0.25), seed=1234, q_tile=4, k_tile=5)

    out = torch.compile(fn, fullgraph=True, backend=_counter())(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))
    inp = validate(q, k, v, causal=True, dropout_p=0.25)
    keep = dropout_keep_mask(inp, 1234)
    kk, vv = (t.repeat_interleave(2, dim=1) for t in (k, v))
    sim = torch.einsum("b h i d, b h j d -> b h i j", q, kk) * inp.scale
    sim = sim.masked_fill(~torch.ones(13, 13, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("b h i j, b h j e -> b h i e", sim.softmax(-1) * keep / 0.75, vv)
    torch.testing.assert_close(out, ref)
