"""The exact text of every bad-input message named in the foundation issue."""

from __future__ import annotations

import re

import pytest
import torch

from attend import attention

from .helpers import make_qkv

q, k, v = make_qkv(b=2, h=4, g=2, i=16, j=24, d=32)

CASES = [
    ("wrong rank", (q[0], k, v), {}, ValueError,
     "expected `q` of shape (b, h, i, d), got a 3-D tensor of shape (4, 16, 32), dtype float32; hint: "),
    ("batch mismatch", (q, k[:1], v[:1]), {}, ValueError,
     "expected one batch size `b` for q, k, v, got 2, 1, 1 (q (2, 4, 16, 32), k (1, 2, 24, 32), v (1, 2, 24, 32))"),
    ("h % g", (q[:, :3], k, v), {}, ValueError,
     "expected query heads `h` to be a multiple of key/value heads `g` (h % g == 0), got h=3, g=2"),
    ("head dim", (q[..., :16], k, v), {}, ValueError,
     "expected q and k with the same head dim `d`, got 16 and 32"),
    ("k/v length", (q, k, v[:, :, :20]), {}, ValueError,
     "expected k and v with the same length `j`, got 24 and 20"),
    ("k/v heads", (q, k, v[:, :1]), {}, ValueError,
     "expected k and v with the same number of heads `g`, got 2 and 1"),
    ("float mask", (q, k, v), {"mask": torch.ones(2, 24)}, TypeError,
     "expected `mask` of dtype bool (True = may attend), got float32; hint: pass additive float masks as `bias=` instead"),
    ("int mask", (q, k, v), {"mask": torch.ones(2, 24, dtype=torch.int64)}, TypeError,
     "expected `mask` of dtype bool (True = may attend), got int64; hint: convert it with `mask.bool()`"),
    ("2-D mask not (b, j)", (q, k, v), {"mask": torch.ones(16, 24, dtype=torch.bool)}, ValueError,
     "expected a 2-D `mask` to be a key padding mask (b, j) = (2, 24), got shape (16, 24)"),
    ("mask unbroadcastable", (q, k, v), {"mask": torch.ones(2, 3, 16, 24, dtype=torch.bool)}, ValueError,
     "expected `mask` broadcastable to (b, h, i, j) = (2, 4, 16, 24), got shape (2, 3, 16, 24) (dim `h` is 3, must be 1 or 4)"),
    ("bias unbroadcastable", (q, k, v), {"bias": torch.zeros(1, 4, 16, 25)}, ValueError,
     "expected `bias` broadcastable to (b, h, i, j) = (2, 4, 16, 24), got shape (1, 4, 16, 25) (dim `j` is 25, must be 1 or 24)"),
    ("bool bias", (q, k, v), {"bias": torch.ones(24, dtype=torch.bool)}, TypeError,
     "expected `bias` of a floating dtype (added to the logits), got bool; hint: boolean masks go in `mask=`"),
    ("dtype mismatch", (q, k.double(), v), {}, TypeError,
     "expected q, k, v of one dtype, got q float32, k float64, v float32"),
    ("device mismatch", (q, k.to("meta"), v), {}, ValueError,
     "expected q, k, v on one device, got q on cpu, k on meta, v on cpu"),
    ("integer q", (q.long(), k, v), {}, TypeError,
     "expected `q` of a floating dtype (float16, bfloat16, float32, float64), got integer or bool dtype int64"),
    ("dropout >= 1", (q, k, v), {"dropout_p": 1.0}, ValueError, "expected `dropout_p` in [0, 1), got 1.0"),
    ("dropout < 0", (q, k, v), {"dropout_p": -0.1}, ValueError, "expected `dropout_p` in [0, 1), got -0.1"),
    ("nan scale", (q, k, v), {"scale": float("nan")}, ValueError, "expected a finite `scale`, got nan"),
    ("unknown backend", (q, k, v), {"backend": "xformers"}, ValueError,
     "expected a backend name among: einsum, sdpa:flash"),
]


@pytest.mark.parametrize("desc, args, kwargs, error, text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_message(desc, args, kwargs, error, text):
    with pytest.raises(error, match=re.escape(text)):
        attention(*args, **kwargs)


def test_views_work():
    """Non-contiguous, expanded and transposed inputs are valid input, not errors."""
    base = torch.randn(2, 16, 4, 32)
    qt = base.transpose(1, 2)  # (b, h, i, d) view of (b, i, h, d)
    kx = torch.randn(2, 1, 24, 32).expand(2, 2, 24, 32)
    out = attention(qt, kx, kx)
    ref = attention(qt.contiguous(), kx.contiguous(), kx.contiguous(), backend="einsum")
    torch.testing.assert_close(out, ref)


def test_empty_lengths():
    q0, k0, v0 = make_qkv(i=1, j=1)
    assert attention(q0[:, :, :0], k0, v0).shape == (2, 4, 0, 32)
    out = attention(q0, k0[:, :, :0], v0[:, :, :0])
    assert out.shape == (2, 4, 1, 32) and (out == 0).all()


def test_the_vocabulary_is_the_options_record():
    """`Options`, `AttnInputs`, `attention`/`explain`'s keywords and `attend explain`'s flags come from one table:
    every row is a field of each, in order, with its default."""
    import dataclasses
    import inspect

    from attend import explain
    from attend.inputs import VOCABULARY, AttnInputs, Options

    assert Options._fields == tuple(t.name for t in VOCABULARY)
    assert Options() == tuple(t.default for t in VOCABULARY)
    fields = {f.name for f in dataclasses.fields(AttnInputs)}
    for fn in (attention, explain):
        params = inspect.signature(fn).parameters
        for term in VOCABULARY:
            assert term.name in fields
            assert params[term.name].default == term.default, (fn.__name__, term.name)


@pytest.mark.parametrize(
    "options",
    [
        {"causal": True, "scale": 0.25},
        {"dropout_p": 0.125, "deterministic": True},
        {"window": (3, None), "score": "l2", "check_finite": False},
        {"window": (0, 2), "check_finite": True},
        {"scale": -1e-05, "return_lse": True},
    ],
    ids=str,
)
def test_cli_hint_round_trips_every_option(options, monkeypatch, capsys):
    """The hint `describe`s errors end with is an `attend explain` command that rebuilds the same options."""
    import attend.cli
    from attend.dispatch import explain_inputs
    from attend.inputs import VOCABULARY, validate

    q, k, v = make_qkv(b=1, h=2, g=2, i=5, j=7, d=8)
    inp = validate(q, k, v, **options)
    hint = inp.cli_hint()
    for term in VOCABULARY:
        if term.name in options and term.name != "causal":
            assert term.flag in hint, (term.flag, hint)
    seen = {}

    def capture(rebuilt, backend=None):
        seen["inp"] = rebuilt
        return explain_inputs(rebuilt, backend)

    monkeypatch.setattr(attend.cli, "explain_inputs", capture)
    assert attend.cli.main(hint.split()[1:]) == 0
    again = seen["inp"]
    for term in VOCABULARY:
        assert getattr(again, term.name) == getattr(inp, term.name), term.name
    assert again.describe() == inp.describe()
