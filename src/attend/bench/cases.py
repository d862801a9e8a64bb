"""Benchmark suites and the `attend check` grid, as data.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

Suites follow `shared/research/anchors-performance.md` section 3: tier 0 (GPU parity grid, CI subset),
tier 1 (GAN shapes from gigagan-pytorch), tier 2 (ViT / diffusion), tier 3 (LLM: grouped-query heads,
causal, decoding), tier 4 (the CPU development machine). `quick` is the default suite: the README's
headline shapes, sized to finish in under a minute on 2 CPU cores (no sdpa:math there: `SUITE_SKIPS`).
`smoke` is tiny, for tests.
Inputs come from the one factory the tests and `attend check` use (`attend.testing.Case.inputs`).

`STRUCTURED_SUITES` (`structured`, and the tiny `structured-smoke` for tests) are another kind of suite:
each row times different formulations of the same attention (packed documents vs a padded batch vs a
dense block-diagonal mask, say) on the same tokens, and reports each baseline's time over the subject's
against the issue's floor. Their candidates are built in `bench/structured.py`.

`DECODE_SUITES` (`decode`, and the tiny `decode-smoke` for tests): one decoding step (i = 1) against a KV
cache of j keys, `attend.kvcache.with_kvcache` on a contiguous and on a paged cache against a direct SDPA
call, each as GB/s of cache read and its fraction of a same-run copy's bandwidth. Built in `bench/decode.py`.

`CONTENTION_SUITES` (`contention`, and the tiny `contention-smoke` for tests): attend against a direct
`F.scaled_dot_product_attention` call, each row timed twice in one run, on a quiet machine and then beside
busy processes (`attend bench --load N`), with the floor on the loaded ratio over the quiet one. Built in
`bench/contention.py`.

`GPU_SUITES` (`gpu`): shapes sized for a GPU; `attend bench` refuses them where torch sees no CUDA device
unless `--device cpu` asks for them on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..testing import Case, case_flags

__all__ = [
    "BenchCase",
    "SUITES",
    "SUITE_SKIPS",
    "HIDDEN_SUITES",
    "StructuredCase",
    "STRUCTURED_SUITES",
    "DecodeCase",
    "DECODE_SUITES",
    "ContentionCase",
    "CONTENTION_SUITES",
    "CONTENTION_MIN_TIME",
    "GPU_SUITES",
    "SUITE_NAMES",
]


@dataclass(frozen=True)
class BenchCase:
    """One benchmark shape. `mask`: a kind of `attend.testing.MASK_KINDS` (key-bias: gigagan's per-key
    L2 bias); `pad`: the fraction of keys the last batch element loses to padding (the others lose
    proportionally less); `dtype`: None = the run's dtype; `modes`: the passes the suite runs by default
    ("fwd", "fwdbwd")."""

    name: str
    b: int
    h: int
    i: int
    d: int
    g: int | None = None  # None: g = h
    j: int | None = None  # None: j = i
    e: int | None = None  # None: e = d
    causal: bool = False
    mask: str = "none"
    pad: float = 0.25
    dtype: torch.dtype | None = None
    modes: tuple[str, ...] = ("fwd",)
    note: str = ""

    @property
    def shape(self) -> dict[str, int]:
        """The full (b, h, g, i, j, d, e) sizes."""
        return {
            "b": self.b,
            "h": self.h,
            "g": self.g or self.h,
            "i": self.i,
            "j": self.j or self.i,
            "d": self.d,
            "e": self.e or self.d,
        }

    def case(self, dtype: torch.dtype, device: torch.device | str) -> Case:
        """The case record whose `inputs()` this benchmark times."""
        s = self.shape
        return Case(
            s["b"], s["h"], s["g"], s["i"], s["j"], s["d"], s["e"],
            dtype=dtype, causal=self.causal, mask=self.mask, device=str(device), pad=self.pad,
        )

    def label(self) -> str:
        """Readable shape and flags: `(1, 8, 4096, 64) causal+padding`, with g, j, e where they differ."""
        s = self.shape
        dims = f"({s['b']}, {s['h']}, {s['i']}, {s['d']})"
        extra = []
        if s["g"] != s["h"]:
            extra.append(f"g={s['g']}")
        if s["j"] != s["i"]:
            extra.append(f"j={s['j']}")
        if s["e"] != s["d"]:
            extra.append(f"e={s['e']}")
        flags = case_flags(self.causal, self.mask)
        return " ".join([dims] + extra + ([flags] if flags else []))


def _c(name, b, h, i, d, **kw) -> BenchCase:
    return BenchCase(name, b, h, i, d, **kw)


BOTH = ("fwd", "fwdbwd")

SUITES: dict[str, list[BenchCase]] = {
    # tiny, for tests: one plain case, one ragged causal + padding case
    "smoke": [
        _c("S1", 1, 2, 64, 16),
        _c("S2", 1, 2, 48, 16, j=64, causal=True, mask="padding"),
        _c("S3", 1, 2, 96, 16),
    ],
    # the README's headline claims (vs direct SDPA >= 0.95x, vs the seed's einsum >= 3x). With gigagan's G6 and G7
    # (now in `gan` alone) and sdpa:math timed it took 74 s on a quiet 2-core machine (issue 25: keep it under
    # 60 s); sdpa:math's rounds were 10 s of that, G6 and G7 5 s each (`SUITE_SKIPS`; --backends times it again)
    "quick": [
        _c("Q1", 1, 8, 4096, 64, note="headline"),
        _c("Q2", 1, 8, 4096, 64, causal=True, note="headline"),
        _c("Q3", 1, 8, 4096, 64, causal=True, mask="padding", note="headline: key padding + causal"),
    ],
    # small calls, where per-call overhead shows: the seed's own GAN workload (attention at 4x4-16x16 feature
    # maps, many calls per training step); compare `attend` with `seed:sdpa` (a direct SDPA call) side by side
    "small": [
        _c("M1", 1, 8, 16, 64, modes=BOTH, note="4x4 map, one image: per-call overhead"),
        _c("M2", 8, 8, 64, 64, modes=BOTH, note="8x8 maps"),
        _c("M3", 4, 8, 256, 64, modes=BOTH, note="16x16 maps"),
    ],
    # tier 4: the 2-vCPU development machine
    "cpu": [
        _c("C1-256", 1, 8, 256, 64, dtype=torch.float32, modes=BOTH),
        _c("C1-1024", 1, 8, 1024, 64, dtype=torch.float32, modes=BOTH),
        _c("C1-2048", 1, 8, 2048, 64, dtype=torch.float32),
        _c("C1-4096", 1, 8, 4096, 64, dtype=torch.float32),
        _c("C1-256-bf16", 1, 8, 256, 64, dtype=torch.bfloat16),
        _c("C1-1024-bf16", 1, 8, 1024, 64, dtype=torch.bfloat16),
        _c("C1-4096-bf16", 1, 8, 4096, 64, dtype=torch.bfloat16),
        _c("C2", 2, 8, 1024, 64, j=1025, dtype=torch.float32, modes=BOTH, note="gigagan-like, unaligned KV"),
        _c("C3", 1, 25, 1024, 64, dtype=torch.float32, note="pytorch PR #105131 shape"),
    ],
    # tier 1: gigagan-pytorch (null KV gives j = i + 1; text keys <= 77 with padding)
    "gan": [
        _c("G1", 8, 8, 1024, 64, j=1025, modes=BOTH, note="gen self-attn 32x32, null KV"),
        _c("G2", 32, 8, 256, 64, j=257, modes=BOTH, note="gen self-attn 16x16, null KV"),
        _c("G3", 8, 8, 1024, 64, j=1025, mask="key-bias", modes=BOTH, note="disc L2 attn: per-key bias"),
        _c("G4", 8, 8, 1024, 64, j=77, mask="padding", pad=0.5, modes=BOTH, note="cross-attn 32x32 -> text"),
        _c("G5", 32, 8, 256, 64, j=77, mask="padding", pad=0.5, modes=BOTH, note="cross-attn 16x16 -> text"),
        _c("G6", 32, 8, 78, 64, j=79, mask="padding", modes=BOTH, note="text self-attn, null KV"),
        _c("G7", 8, 8, 64, 64, modes=BOTH, note="upsampler mid 8x8"),
        _c("G8", 4096, 8, 16, 64, modes=BOTH, note="temporal attention (video)"),
        _c("G9", 32, 12, 50, 64, modes=BOTH, note="CLIP ViT-B/32 vision"),
    ],
    # tier 2: ViT / diffusion (odd head dims on purpose)
    "vit": [
        _c("V1", 128, 12, 197, 64, modes=BOTH, note="ViT-B/16 @224"),
        _c("V2", 64, 16, 257, 64, modes=BOTH, note="ViT-L/14 @224"),
        _c("V3", 16, 16, 1370, 64, modes=BOTH, note="DINOv2-L/14 @518"),
        _c("V4", 32, 16, 256, 72, modes=BOTH, note="DiT-XL/2 @256, d=72"),
        _c("V5a", 16, 8, 4096, 40, note="SD1.5 UNet @512, d=40"),
        _c("V5b", 16, 8, 1024, 80, note="SD1.5 UNet, d=80"),
        _c("V5c", 16, 8, 256, 160, note="SD1.5 UNet, d=160"),
        _c("V5x", 16, 8, 4096, 40, j=77, note="SD1.5 cross-attn -> text"),
        _c("V6", 2, 10, 4096, 64, note="SDXL @1024"),
        _c("V7", 1, 24, 4608, 128, note="Flux / SD3 MM-DiT @1024"),
    ],
    # tier 3: LLM (grouped-query heads, causal, decoding). L5 (document masks) needs a varlen backend.
    "llm": [
        _c("L1", 16, 12, 1024, 64, causal=True, modes=BOTH, note="GPT-2 small"),
        _c("L2", 1, 32, 8192, 128, g=8, causal=True, modes=BOTH, note="Llama-3-8B"),
        _c("L3", 1, 64, 8192, 128, g=8, causal=True, note="Llama-3-70B"),
        _c("L4-4k", 32, 32, 1, 128, g=8, j=4096, causal=True, note="decode, bandwidth-bound"),
        _c("L4-32k", 32, 32, 1, 128, g=8, j=32768, causal=True, note="decode, bandwidth-bound"),
    ],
    # long sequences: memory must stay linear in N (tier 3, L6)
    "long": [
        _c("L6-32k", 1, 32, 32768, 128, causal=True, note="long context"),
        _c("L6-64k", 1, 32, 65536, 128, causal=True, note="long context"),
        _c("L6-128k", 1, 32, 131072, 128, causal=True, note="long context"),
    ],
    # tier 0 CI subset: hidden 2048 (d=128, H=16), 16k tokens per batch, bf16 on CUDA
    "gpu": [
        _c("P-1k", 16, 16, 1024, 128, modes=BOTH),
        _c("P-1k-causal", 16, 16, 1024, 128, causal=True, modes=BOTH),
        _c("P-4k", 4, 16, 4096, 128, modes=BOTH),
        _c("P-4k-causal", 4, 16, 4096, 128, causal=True, modes=BOTH),
        _c("P-16k", 1, 16, 16384, 128, modes=BOTH),
        _c("P-16k-causal", 1, 16, 16384, 128, causal=True, modes=BOTH),
        _c("G1", 8, 8, 1024, 64, j=1025, modes=BOTH, note="gigagan gen self-attn 32x32"),
        _c("G4", 8, 8, 1024, 64, j=77, mask="padding", pad=0.5, modes=BOTH, note="gigagan cross-attn"),
        _c("L2", 1, 32, 4096, 128, g=8, causal=True, mask="padding", modes=BOTH, note="GQA + padding + causal"),
    ],
}


# backends a suite does not time unless --backends names them (besides einsum, the reference, which no suite
# times by default): at 4096 positions on CPU SDPA's math path costs 0.3-0.7 s a call, and its rounds took a
# seventh of the default run, to show a path auto does not pick there
SUITE_SKIPS: dict[str, tuple[str, ...]] = {"quick": ("sdpa:math",)}


@dataclass(frozen=True)
class StructuredCase:
    """One row of a structured suite: a `subject` and the `baselines` it is timed against, interleaved, on
    the same tokens, each a candidate name of `bench/structured.py`'s `CANDIDATES[kind]`.

    `kind`: "documents" or "varlen": `lengths` are the packed sequences' lengths (one sequence of
    sum(lengths) tokens, or a padded batch of max(lengths)); "window" or "l2": a batch of len(lengths)
    sequences of one length. `window`: the sliding window's left extent (kind "window"). `floors`:
    (baseline, minimum of baseline time / subject time); `memory_floor_mb`: the subject's peak memory must
    stay below it. `needs`: "module:attribute" that must import at run time, else the row is left out
    with a note (a feature another change is still writing)."""

    name: str
    kind: str
    lengths: tuple[int, ...]
    h: int
    d: int
    subject: str
    baselines: tuple[str, ...]
    floors: tuple[tuple[str, float], ...] = ()
    window: int = 0
    memory_floor_mb: float | None = None
    modes: tuple[str, ...] = ("fwdbwd",)
    needs: str | None = None
    note: str = ""

    def __post_init__(self):
        if self.kind in ("window", "l2", *VOCABULARY_KINDS) and len(set(self.lengths)) != 1:
            raise ValueError(f"expected one length for a {self.kind} batch, got {self.lengths}")
        for name, _ in self.floors:
            if name not in self.baselines:
                raise ValueError(f"expected a floor on one of {self.baselines}, got {name!r}")

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def tiny(self) -> StructuredCase:
        """The same row at a few tokens per sequence: the warm-up (thread pools, kernel selection) that no
        row's timing or peak memory should pay."""
        return replace(self, lengths=tuple(max(4, n // 256) for n in self.lengths), window=min(self.window, 4))

    def label(self) -> str:
        if self.kind in ("documents", "varlen"):
            span = f"{max(self.lengths)}..{min(self.lengths)}"
            return f"{len(self.lengths)} seqs, {self.tokens} tokens ({span}), h={self.h}, d={self.d}, causal"
        dims = f"({len(self.lengths)}, {self.h}, {self.lengths[0]}, {self.d})"
        if self.kind == "window":
            return f"{dims} causal, window ({self.window}, 0)"
        return f"{dims} {VOCABULARY_KINDS.get(self.kind, 'score=l2')}"


DOC_LENGTHS = (4096, 3072, 2048, 2048, 1536, 1536, 1024, 1024)  # 16384 tokens, 8 documents
# issue 23's vocabulary rows (bench/structured.py builds their candidates): kind -> how the label reads
VOCABULARY_KINDS = {"lse": "return_lse=True", "sinks": "causal, sinks (h,)", "softcap": "causal, softcap=50"}
VARLEN = "attend.varlen:varlen_attn"

STRUCTURED_SUITES: dict[str, list[StructuredCase]] = {
    # the structured-attention issue's floors, float32 on CPU, fwd+bwd (about 2-4 minutes on 2 cores)
    "structured": [
        StructuredCase(
            "D1", "documents", DOC_LENGTHS, 8, 64, "attend:documents", ("attend:padded", "sdpa:dense-mask"),
            floors=(("attend:padded", 1.8), ("sdpa:dense-mask", 4.0)), memory_floor_mb=2048.0,
            note="packed documents, causal",
        ),
        StructuredCase(
            "W1", "window", (16384,), 8, 64, "attend:window", ("attend:causal",), floors=(("attend:causal", 4.0),),
            window=512, note="sliding window, causal",
        ),
        StructuredCase(
            "L1", "l2", (1024,) * 4, 8, 64, "attend:l2", ("attend:dot", "gigagan:einsum"),
            floors=(("attend:dot", 0.9), ("gigagan:einsum", 3.0)), note="gigagan's L2-distance attention",
        ),
        StructuredCase(
            "V1", "varlen", tuple(n // 4 for n in DOC_LENGTHS), 8, 64, "varlen_attn",
            ("attend:padded", "attend:documents"), floors=(("attend:padded", 0.9),), needs=VARLEN,
            note="varlen_attn, (total, heads, dim); D1's lengths / 4",
        ),
    ],
    # issue 23's floors, float32 on CPU: the log-sum-exp, sinks and soft-capping against the same call without
    # them (or Gemma 2's eager formula), and soft-capping's peak memory at 16k tokens (about 3 minutes on 2 cores)
    "vocabulary": [
        StructuredCase(
            "R1", "lse", (1024,) * 4, 8, 64, "attend:lse", ("attend:dot",), floors=(("attend:dot", 0.95),),
            modes=("fwd", "fwdbwd"), note="return_lse=True against the same call without it (<= 5 % more)",
        ),
        StructuredCase(
            "S1", "sinks", (1024,) * 4, 8, 64, "attend:sinks", ("attend:causal",), floors=(("attend:causal", 0.91),),
            note="sinks against the same causal call without them (<= 10 % more)",
        ),
        StructuredCase(
            "C1", "softcap", (4096,), 8, 128, "attend:softcap", ("gemma2:eager",), floors=(("gemma2:eager", 2.0),),
            note="soft-capping against Gemma 2's eager_attention_forward (>= 2x)",
        ),
        StructuredCase(
            "C2", "softcap", (16384,), 8, 128, "attend:softcap", ("attend:causal",), memory_floor_mb=2048.0,
            note="soft-capping at 16k tokens: peak memory <= 2 GiB (eager's scores alone are 8 GiB)",
        ),
    ],
    "vocabulary-smoke": [
        StructuredCase("R1", "lse", (32, 32), 2, 16, "attend:lse", ("attend:dot",), floors=(("attend:dot", 0.95),)),
        StructuredCase("S1", "sinks", (32,), 2, 16, "attend:sinks", ("attend:causal",)),
        StructuredCase("C1", "softcap", (48,), 2, 16, "attend:softcap", ("gemma2:eager",)),
    ],
    # the same rows at a few dozen tokens, for tests (the floors are shown, not expected to hold)
    "structured-smoke": [
        StructuredCase(
            "D1", "documents", (48, 32, 16, 16), 2, 16, "attend:documents", ("attend:padded", "sdpa:dense-mask"),
            floors=(("attend:padded", 1.8), ("sdpa:dense-mask", 4.0)), memory_floor_mb=2048.0,
        ),
        StructuredCase(
            "W1", "window", (96,), 2, 16, "attend:window", ("attend:causal",), floors=(("attend:causal", 4.0),),
            window=16,
        ),
        StructuredCase(
            "L1", "l2", (32, 32), 2, 16, "attend:l2", ("attend:dot", "gigagan:einsum"),
            floors=(("attend:dot", 0.9), ("gigagan:einsum", 3.0)),
        ),
        StructuredCase(
            "V1", "varlen", (24, 16, 8, 8), 2, 16, "varlen_attn", ("attend:padded", "attend:documents"),
            floors=(("attend:padded", 0.9),), needs=VARLEN,
        ),
    ],
}


@dataclass(frozen=True)
class DecodeCase:
    """One row of a decode suite: one decoding step, q (b, h, 1, d), against a cache of j keys per row,
    (b, g, j, d) keys and (b, g, j, d) values of `dtype`. The cache holds j - 1 tokens; the timed call appends
    the step's key and value at slot j - 1 and attends all j (candidates in `bench/decode.py`).

    `block_size`: the paged layout's page size (j a multiple of it); `copy_mb`: the size of the copy that
    measures the machine's bandwidth in the same run; `beyond_llc`: each call reads the next of enough
    layers' caches (and the copy is made large enough) that no call finds its bytes in the last-level cache,
    as in a model with many layers (False: one cache, read again and again; the tiny suite); `floors`:
    (what, minimum) with what "copy" (the subject's GB/s of cache read over the copy's, a fraction), a
    baseline (its time / the subject's) or "attend:paged" (the contiguous cache's time / the paged one's: the
    paged speed as a fraction of the contiguous); `needs`: "module:attribute" of the subject, which must
    import at run time, else the row is left out with the reason."""

    name: str
    b: int
    h: int
    g: int
    d: int
    j: int
    dtype: torch.dtype
    block_size: int = 256
    copy_mb: int = 256
    beyond_llc: bool = True
    floors: tuple[tuple[str, float], ...] = ()
    needs: str = "attend.kvcache:with_kvcache"
    note: str = ""

    def __post_init__(self):
        if self.j % self.block_size or self.h % self.g:
            raise ValueError(
                f"expected j a multiple of block_size and h of g, got j={self.j}, block_size={self.block_size}, "
                f"h={self.h}, g={self.g}"
            )

    @property
    def shape(self) -> dict[str, int]:
        return {"b": self.b, "h": self.h, "g": self.g, "i": 1, "j": self.j, "d": self.d, "e": self.d}

    @property
    def cache_bytes(self) -> int:
        """Bytes of keys and values one step reads: 2 * b * g * j * d * itemsize."""
        return 2 * self.b * self.g * self.j * self.d * torch.finfo(self.dtype).bits // 8

    def tiny(self) -> DecodeCase:
        """The same row at two pages of cache and a 1 MiB copy: the warm-up no row's timing should pay."""
        return replace(self, b=1, j=2 * self.block_size, copy_mb=1)

    def label(self) -> str:
        return f"({self.b}, {self.h}, 1, {self.d}) g={self.g}, j={self.j}"


def _decode_rows(
    lengths: tuple[int, ...], batches: tuple[int, ...], h: int, g: int, d: int, floored: tuple[int, int], **kw
) -> list[DecodeCase]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for b in batches:
            for j in lengths:
                k = f"{j // 1024}k" if j >= 1024 else str(j)
                floors = DECODE_FLOORS if (b, j) == floored else ()
                rows.append(DecodeCase(f"b{b}-{k}", b, h, g, d, j, dtype, floors=floors, **kw))
    return rows


# the KV-cache issue's floors, at b=1, 8k keys: the subject reads the cache at >= 50 % of the copy's bandwidth
# and >= 2x faster than SDPA on the valid slice; the paged cache runs at >= 0.8x the contiguous one's speed;
# with gpt-oss's sinks, >= 0.9x (issue 23)
DECODE_FLOORS = (("copy", 0.5), ("sdpa:gqa", 2.0), ("attend:paged", 0.8), ("attend:sinks", 0.9))
DECODE_SUITES: dict[str, list[DecodeCase]] = {
    # Llama-3-8B's attention (h=32, g=8, d=128), float32 and bfloat16: 12 rows, a few minutes on 2 CPU cores
    "decode": _decode_rows((1024, 8192, 32768), (1, 8), 32, 8, 128, (1, 8192)),
    # tiny, for tests (the floors are shown, not expected to hold)
    "decode-smoke": _decode_rows((64,), (1, 2), 4, 2, 16, (1, 64), block_size=16, copy_mb=4, beyond_llc=False),
}


@dataclass(frozen=True)
class ContentionCase:
    """One row of a contention suite: `subject` against a direct SDPA call (`baseline`) on (b, h, i, d)
    float32 inputs, timed interleaved twice in one run, quiet and beside busy processes.

    `kind`: "chunked" (the chunked backend pinned, plain forward, against plain SDPA) or "auto-train" (auto
    dispatch, causal with a (b, j) key padding mask that drops the last `pad` of the keys, forward and
    backward, against SDPA given the same mask as one bool (b, 1, i, j) attn_mask). `floor`: the least
    loaded ratio / quiet ratio (a ratio: the baseline's time / the subject's) the issue accepts."""

    name: str
    kind: str
    b: int
    h: int
    i: int
    d: int
    mode: str
    subject: str
    baseline: str = "sdpa"
    pad: float = 0.1
    floor: float = 0.8
    note: str = ""

    def __post_init__(self):
        if self.kind not in ("chunked", "auto-train"):
            raise ValueError(f"expected kind 'chunked' or 'auto-train', got {self.kind!r}")

    @property
    def shape(self) -> dict[str, int]:
        return {"b": self.b, "h": self.h, "g": self.h, "i": self.i, "j": self.i, "d": self.d, "e": self.d}

    @property
    def causal(self) -> bool:
        return self.kind == "auto-train"

    @property
    def mask(self) -> str:
        return "padding" if self.kind == "auto-train" else "none"

    def tiny(self) -> ContentionCase:
        """The same row at 32 positions: the warm-up no row's timing should pay."""
        return replace(self, i=32)

    def label(self) -> str:
        flags = case_flags(self.causal, self.mask)
        pad = f" (last {self.pad:.0%} of keys)" if self.mask == "padding" else ""
        return f"({self.b}, {self.h}, {self.i}, {self.d}){' ' + flags if flags else ''}{pad}"


CONTENTION_SUITES: dict[str, list[ContentionCase]] = {
    # issue 25's floor: under two busy processes per core, each ratio to direct SDPA stays >= 0.8x its quiet
    # ratio (about a minute on 2 CPU cores: each row quiet, then loaded, 2 s of samples per candidate)
    "contention": [
        ContentionCase("K1", "chunked", 1, 8, 2048, 64, "fwd", "attend:chunked", note="chunked pinned, plain"),
        ContentionCase(
            "K2", "auto-train", 1, 8, 2048, 64, "fwdbwd", "attend:auto", "sdpa:mask",
            note="auto, causal + key padding, training",
        ),
    ],
    # tiny, for tests (the floors are shown, not expected to hold)
    "contention-smoke": [
        ContentionCase("K1", "chunked", 1, 2, 64, 16, "fwd", "attend:chunked"),
        ContentionCase("K2", "auto-train", 1, 2, 64, 16, "fwdbwd", "attend:auto", "sdpa:mask"),
    ],
}
CONTENTION_MIN_TIME = 2.0  # seconds of samples per candidate and pass: a ratio under load needs many samples
GPU_SUITES = frozenset({"gpu"})
HIDDEN_SUITES = frozenset({"smoke", "structured-smoke", "decode-smoke", "contention-smoke"})
SUITE_NAMES = (*SUITES, *STRUCTURED_SUITES, *DECODE_SUITES, *CONTENTION_SUITES)
