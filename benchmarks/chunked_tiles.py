"""Tile-size sweep for `chunked` on CPU: (1, 8, 4096, 64) float32 forward, unmasked and causal, each
as a ratio to SDPA's CPU flash kernel measured in the same round-robin loop.

    PYTHONPATH=src python benchmarks/chunked_tiles.py [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attend.backends.chunked import chunked_attention
from attend.inputs import validate

CONFIGS = [(128, 512), (256, 256), (256, 512), (256, 1024), (512, 512), (512, 1024), (1024, 1024)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    q, k, v = (torch.randn(1, 8, args.n, 64) for _ in range(3))
    plain, causal = validate(q, k, v), validate(q, k, v, causal=True)

    def flash():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    fns = {"sdpa:flash": flash}
    for qt, kt in CONFIGS:
        fns[f"{qt}x{kt}"] = lambda qt=qt, kt=kt: chunked_attention(plain, q_tile=qt, k_tile=kt)
        fns[f"{qt}x{kt} causal"] = lambda qt=qt, kt=kt: chunked_attention(causal, q_tile=qt, k_tile=kt)
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(args.reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, (1, 8, {args.n}, 64) float32, median of {args.reps}")
    print(f"  sdpa:flash {med['sdpa:flash'] * 1e3:.0f} ms")
    for qt, kt in CONFIGS:
        u, c = med[f"{qt}x{kt}"], med[f"{qt}x{kt} causal"]
        print(f"  {qt:>4} x {kt:<4}  unmasked {u * 1e3:6.0f} ms ({med['sdpa:flash'] / u:.2f}x sdpa:flash)   "
              f"causal {c * 1e3:6.0f} ms ({u / c:.2f}x own unmasked)")


if __name__ == "__main__":
    main()
