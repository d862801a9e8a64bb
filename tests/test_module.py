"""`Attend` as a drop-in for gigagan-pytorch's `Attend(dropout=0., flash=False)`."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import einsum, nn

from attend import Attend, explain, get_backend
from attend.testing import tolerance

from .helpers import make_qkv


class SeedAttend(nn.Module):
    """The seed's einsum path, transcribed: softmax in the input dtype, dropout on the probabilities."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, q, k, v):
        sim = einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
        attn = self.attn_dropout(sim.softmax(dim=-1))
        return einsum("b h i j, b h j d -> b h i d", attn, v)


@pytest.mark.parametrize("flash", [False, True, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_outputs_as_the_seed(flash, dtype):
    q, k, v = make_qkv(b=2, h=8, g=8, i=64, j=64, d=64, dtype=dtype)
    ours = Attend(flash=flash)(q, k, v)
    seed = SeedAttend()(q.double(), k.double(), v.double())
    torch.testing.assert_close(ours.double(), seed, **tolerance(dtype))
    assert ours.dtype == dtype


def test_no_warning_at_all():
    q, k, v = make_qkv(b=1, h=2, g=2, i=16, j=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for flash in (False, True, None):
            attn = Attend(dropout=0.1, flash=flash)
            attn(q, k, v)
            attn.eval()(q, k, v)
            attn.train()(q, k, v, mask=torch.ones(1, 16, dtype=torch.bool), causal=True)


def test_dropout_only_in_training():
    q, k, v = make_qkv(b=1, h=2, g=2, i=32, j=32)
    attn = Attend(dropout=0.5)
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), Attend()(q, k, v))
    assert attn.explain(q, k, v).backend == "sdpa:flash", "eval mode: no dropout, so the fused kernel"
    attn.train()
    assert attn.explain(q, k, v).backend == "sdpa:math", "CPU flash has no dropout"
    assert not torch.allclose(attn(q, k, v), Attend()(q, k, v))


def test_flash_false_runs_einsum(monkeypatch):
    ran = []
    einsum_backend = get_backend("einsum")
    monkeypatch.setattr(type(einsum_backend), "run", lambda self, inp: ran.append(1) or inp.q)
    Attend(flash=False)(*make_qkv())
    assert ran == [1]


def test_flash_true_runs_a_fused_kernel_or_says_why(caplog):
    q, k, v = make_qkv()
    attn = Attend(flash=True)
    report = attn.explain(q, k, v)
    assert report.backend == "sdpa:flash"
    assert report.reasons["einsum"][0].startswith("not a fused kernel")
    attn_drop = Attend(dropout=0.1, flash=True).train()
    with caplog.at_level("INFO", logger="attend"):
        out = attn_drop(q, k, v)
    assert out.shape == q.shape
    assert any("no fused kernel can run" in r.getMessage() for r in caplog.records)
    fallback = attn_drop.explain(q, k, v)
    assert fallback.backend == explain(q, k, v, dropout_p=0.1).backend, "explain names what forward runs"
    assert fallback.reasons["sdpa:flash"] == ["dropout_p=0.1 > 0; this backend has no dropout"]


def test_forward_arguments_override_module_defaults():
    q, k, v = make_qkv(i=12, j=20, dtype=torch.float64)
    attn = Attend(causal=True, scale=0.3)
    ref = Attend(backend="einsum", scale=0.3)
    torch.testing.assert_close(attn(q, k, v), ref(q, k, v, causal=True))
    torch.testing.assert_close(attn(q, k, v, causal=False), ref(q, k, v))


def test_an_attribute_set_after_a_call_takes_effect_on_the_next():
    """`Attend` builds the options of a plain call once; setting any attribute they read (or train/eval)
    drops them, so the next call sees it."""
    q, k, v = make_qkv(i=12, j=12, dtype=torch.float64)
    attn = Attend()
    ref = Attend(backend="einsum")
    torch.testing.assert_close(attn(q, k, v), ref(q, k, v))
    attn.causal, attn.scale = True, 0.3
    torch.testing.assert_close(attn(q, k, v), Attend(causal=True, scale=0.3, backend="einsum")(q, k, v))
    attn.window = (2, None)
    want = Attend(causal=True, scale=0.3, window=(2, None), backend="einsum")(q, k, v)
    torch.testing.assert_close(attn(q, k, v), want)
    attn.dropout = 0.5  # a new module is in training mode: dropout applies at once
    assert not torch.allclose(attn(q, k, v), want)
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), want)
    attn.train()
    assert not torch.allclose(attn(q, k, v), want)
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), want)


def test_module_is_stateless_and_repr():
    attn = Attend(dropout=0.1, flash=True)
    assert attn.state_dict() == {} and list(attn.parameters()) == []
    assert "dropout=0.1, flash=True" in repr(attn)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dropout": 1.0}, ValueError, r"expected `dropout` in \[0, 1\), got 1.0"),
        ({"flash": "yes"}, TypeError, "expected `flash` to be True, False or None"),
        ({"flash": False, "backend": "sdpa:math"}, ValueError, "expected either flash=False"),
        ({"backend": "nope"}, ValueError, "expected a backend name among"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Attend(**kwargs)


def test_flash_true_in_training_on_cpu_runs_what_the_readme_says(monkeypatch):
    """`Attend(0.1, flash=True).train()` on CPU: no fused CPU kernel has dropout, so it falls back to auto, which runs
    `sdpa:math` where i * j < 256 * 256 and `chunked` from there on (`sdpa:flash` in eval mode). The backend whose
    `run` forward calls is recorded, and the README's migration section must say the same."""
    from pathlib import Path

    from attend import dispatch

    ran: list[str] = []
    for name in ("sdpa:flash", "sdpa:math", "chunked", "einsum"):
        cls = type(get_backend(name))
        monkeypatch.setattr(cls, "run", lambda self, inp, _run=cls.run: ran.append(self.name) or _run(self, inp))
    attn = Attend(0.1, flash=True).train()
    for n, j, want in ((64, 64, "sdpa:math"), (255, 256, "sdpa:math"), (256, 256, "chunked"), (128, 1024, "chunked")):
        dispatch.clear_cache()  # the first call of a signature goes through `run`
        ran.clear()
        q, k, v = make_qkv(b=1, h=2, g=2, i=n, j=j)
        attn(q, k, v)
        assert ran == [want], (n, j)
        assert attn.explain(q, k, v).backend == want
    attn.eval()
    dispatch.clear_cache()
    ran.clear()
    attn(q, k, v)
    assert ran == ["sdpa:flash"]

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("## Migrating from gigagan-pytorch's `Attend`")
    section = " ".join(readme[start : readme.index("\n## ", start + 1)].split())
    assert (
        "`Attend(0.1, flash=True).train()` on CPU runs `sdpa:math` where i * j < 256 * 256 and `chunked` from there on"
        in section
    )
    assert "In eval mode (no dropout) `sdpa:flash` runs." in section
    for gone in ("`attn_dropout`", "`cpu_config`", "`cuda_config`", "`flash_attn`"):
        assert gone in section
        assert not hasattr(attn, gone.strip("`")), f"{gone} is documented as gone"


def test_flash_fallback_explains_the_backend_it_runs_without_calling_it_unfused():
    """Attend(0.1, flash=True) in training on CPU falls back to auto (no fused CPU kernel has dropout): its
    report names that backend with no reason against it, and says why the fused kernels could not run."""
    q = k = v = torch.randn(1, 2, 300, 16)
    report = Attend(0.1, flash=True).train().explain(q, k, v)
    assert report.reasons[report.backend] == []
    assert "not a fused kernel" not in str(report)
    assert any("dropout" in r for r in report.reasons["sdpa:flash"])
