"""Test-only helpers: spies on the SDPA call and a tiny input factory."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F


def make_qkv(b=2, h=4, g=2, i=16, j=24, d=32, e=None, dtype=torch.float32, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    e = e or d
    q = torch.randn(b, h, i, d, generator=gen).to(dtype)
    k = torch.randn(b, g, j, d, generator=gen).to(dtype)
    v = torch.randn(b, g, j, e, generator=gen).to(dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def sdp_flags() -> dict[str, bool]:
    """Which SDPA kernels the global flags allow right now (what `sdpa_kernel` scopes)."""
    return {
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
        "math": torch.backends.cuda.math_sdp_enabled(),
    }


@contextlib.contextmanager
def spy_sdpa(monkeypatch):
    """Record every F.scaled_dot_product_attention call: its tensors' shapes, kwargs and the SDPA flags."""
    from torch.nn.attention import SDPBackend

    from attend.backends import sdpa

    # run the once-per-process capability probes first, so only the library's real calls are recorded
    sdpa.has_enable_gqa()
    for variant in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        sdpa.zeroes_dead_rows(variant, "cpu")
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        calls.append(
            {
                "q": tuple(q.shape),
                "k": tuple(k.shape),
                "attn_mask": attn_mask,
                "is_causal": is_causal,
                "kwargs": kw,
                "flags": sdp_flags(),
            }
        )
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    monkeypatch.setattr(sdpa, "_sdpa", spy)
    yield calls


@pytest.fixture
def fresh_dynamo():
    """Compile tests build new functions and modules: reset dynamo around each one, so its per-code recompile
    limit never trips and one test's graphs never serve another's."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_counter():
    """A torch.compile backend that counts the graphs dynamo hands over and runs them with aot_eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend("aot_eager")


def skip_unless_runs(name: str, inp) -> None:
    """Skip the test, with backend `name`'s own reasons, where it cannot run the validated inputs `inp`."""
    from attend import get_backend

    reasons = get_backend(name).reasons_unsupported(inp)
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")


def _cpu_backends() -> list[str]:
    from attend.testing import backends_for

    return backends_for("cpu")


CPU_BACKENDS = _cpu_backends()  # every backend that declares the CPU: the ones a CPU test runs


def dense_formula(q, k, v, *, mask=None, bias=None, causal=False, scale=None, score="dot", softcap=None, sinks=None):
    """The vocabulary's semantics as one dense float64 computation, written from the README's table (not from
    attend's code): (out (b, h, i, e), lse (b, h, i)). Scaled logits (or GigaGAN's l2 score), soft-capping,
    bias, the key padding / causal (bottom-right) masks, then softmax over the visible keys and the sink column
    (gpt-oss's eager formula); a row with no key gives 0 (lse: -inf, or its sink)."""
    import math

    q, k, v = q.double(), k.double(), v.double()
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if score == "l2":
        s = -(q.square().sum(-1, keepdim=True) + k.square().sum(-1)[..., None, :] - 2 * q @ k.transpose(-1, -2)) * scale
    else:
        s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()
    keep = torch.ones(s.shape, dtype=torch.bool)
    if mask is not None:
        keep = keep & (mask[:, None, None, :] if mask.dim() == 2 else mask)
    if causal:
        i, j = s.shape[-2:]
        keep = keep & (torch.arange(j)[None] <= torch.arange(i)[:, None] + (j - i))
    s = s.masked_fill(~keep, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.double().reshape(-1, s.shape[1], 1, 1).expand(*s.shape[:-1], 1)], -1)
    lse = s.logsumexp(-1)
    p = torch.where(torch.isfinite(lse)[..., None], (s - lse.clamp(min=-1e300)[..., None]).exp(), 0.0)
    p = p[..., :-1] if sinks is not None else p
    return p @ v, lse


def transformers_or_skip():
    """`transformers`, or skip the calling module with the reason it cannot run here: not installed, or (on an
    older torch, e.g. transformers 5 on torch < 2.6) installed with its PyTorch models disabled."""
    import pytest

    transformers = pytest.importorskip("transformers")
    if not transformers.utils.is_torch_available():
        pytest.skip(
            f"transformers {transformers.__version__} disables its PyTorch models on torch {torch.__version__}",
            allow_module_level=True,
        )
    return transformers


def needs(feature: str):
    """A skip mark for a test that needs a torch feature (`attend.features`), with the feature's own reason."""
    import pytest

    from attend import features

    found = features.get(feature)
    return pytest.mark.skipif(not found.present(), reason=found.reason())
