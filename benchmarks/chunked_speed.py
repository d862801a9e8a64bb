"""Speed of the `chunked` backend on CPU against SDPA and einsum, side by side in one process.

    PYTHONPATH=src python benchmarks/chunked_speed.py [--n 4096] [--reps 7] [--q-tile 256 --k-tile 512]

Shapes (b, h, i, d) = (1, 8, n, 64) float32. Every figure is the median of `reps` runs after one warm-up
(the minimum is printed beside it); the forward variants are run round-robin (one rep of each in turn), so
machine noise hits them alike; the training steps in blocks (see the comment there). Prints ratios as
the acceptance criteria of issue 3 state them. Key padding: the last eighth of the keys.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attend.backends.chunked import chunked_attention
from attend.backends.einsum import einsum_attention
from attend.dispatch import get_backend
from attend.inputs import validate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--q-tile", type=int, default=None)
    ap.add_argument("--k-tile", type=int, default=None)
    ap.add_argument("--only", default="", help="comma-separated subset of variant names")
    ap.add_argument("--train", action="store_true", help="include the forward+backward comparison")
    args = ap.parse_args()
    torch.manual_seed(0)
    n = args.n
    q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
    pad = torch.ones(1, n, dtype=torch.bool)
    pad[:, n - n // 8 :] = False  # the last eighth of the keys is padding
    dense = (torch.ones(n, n, dtype=torch.bool).tril() & pad[:, None, :])[:, None]  # (1, 1, i, j)
    tiles = dict(q_tile=args.q_tile, k_tile=args.k_tile)

    def flash(**kw):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    plain = validate(q, k, v)
    causal = validate(q, k, v, causal=True)
    causal_pad = validate(q, k, v, mask=pad, causal=True)
    variants = {
        "sdpa_flash": lambda: flash(),
        "sdpa_flash_causal": lambda: flash(is_causal=True),
        "sdpa_flash_dense_mask": lambda: flash(attn_mask=dense),
        "attend_sdpa_flash_causal_pad": lambda: get_backend("sdpa:flash").run(causal_pad),
        "chunked": lambda: chunked_attention(plain, **tiles),
        "chunked_causal": lambda: chunked_attention(causal, **tiles),
        "chunked_causal_pad": lambda: chunked_attention(causal_pad, **tiles),
    }
    if args.train:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        train = validate(qg, kg, vg)
        grad = torch.randn_like(q)

        def step(fn):
            def go():
                out = fn(train)
                torch.autograd.grad(out, (qg, kg, vg), grad)
            return go

        variants["einsum_train"] = step(einsum_attention)
        variants["chunked_train"] = step(lambda inp: chunked_attention(inp, **tiles))
    if args.only:
        keep = set(args.only.split(","))
        variants = {k: fn for k, fn in variants.items() if k in keep}

    times: dict[str, list[float]] = {name: [] for name in variants}
    load_before = os.getloadavg()[0]
    forward = [name for name in variants if "train" not in name]
    for name in forward:  # warm-up
        variants[name]()
    for _ in range(args.reps):
        for name in forward:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    # Training steps are timed in blocks, not round-robin: right after einsum frees its ~2 GiB of (i, j)
    # tensors, the next chunked step on this VM ran up to 20x slower (24 s instead of 0.8 s, measured
    # 2026-11-27), an OS memory effect that a real training loop, which never alternates, does not see.
    with torch.enable_grad():
        for name in [n for n in variants if "train" in n]:
            variants[name]()
            for _ in range(args.reps):
                t0 = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, (1, 8, {n}, 64) float32, "
          f"median of {args.reps}, tiles {args.q_tile or 'default'}x{args.k_tile or 'default'}, "
          f"1-min load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} (2 cores: above 2 the runs compete)")
    for name, t in med.items():
        print(f"  {name:<30} {t * 1e3:9.1f} ms   (min {min(times[name]) * 1e3:9.1f} ms)")

    def ratio(label, fast, slow):
        if fast in med and slow in med:
            print(f"  {label:<52} {med[slow] / med[fast]:.2f}x")

    print("ratios (throughput, higher is better):")
    ratio("chunked unmasked / sdpa:flash unmasked (>= 0.6)", "chunked", "sdpa_flash")
    ratio("chunked causal / chunked unmasked (>= 1.6)", "chunked_causal", "chunked")
    ratio("chunked causal+pad / SDPA flash dense mask (>= 1.3)", "chunked_causal_pad", "sdpa_flash_dense_mask")
    ratio("chunked causal+pad / attend sdpa:flash causal+pad", "chunked_causal_pad", "attend_sdpa_flash_causal_pad")
    ratio("chunked causal / sdpa:flash is_causal", "chunked_causal", "sdpa_flash_causal")
    ratio("chunked train / einsum train (>= 1.0)", "chunked_train", "einsum_train")


if __name__ == "__main__":
    main()
