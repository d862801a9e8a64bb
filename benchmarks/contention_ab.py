"""The loops split across threads (`attend._helpers.run_split`: chunked's tiles, sdpa's query blocks) against
the old single-thread loops, quiet and loaded.

    python benchmarks/contention_ab.py [--load N] [--rounds R]

One process; for each state (quiet, then N busy processes) times, interleaved round by round:
direct SDPA, chunked and auto with the split, and without it (the `per_thread_intra_op` feature switched off), on
(1, 8, 2048, 64) float32: plain forward, and causal + key padding forward+backward. Prints medians and the
ratios to SDPA. The busy processes are `while True: pass` Python loops, stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import attend
from attend import _helpers


def timed(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def cases():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2048, 64) for _ in range(3))
    pad = torch.ones(1, 2048, dtype=torch.bool)
    pad[:, -205:] = False
    keep = torch.ones(2048, 2048, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def train(fn):
        def run():
            out = fn()
            out.sum().backward()
            qg.grad = kg.grad = vg.grad = None

        return run

    return {
        "plain fwd": {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "chunked": lambda: attend.attention(q, k, v, backend="chunked"),
        },
        "causal+pad fwd+bwd": {
            "sdpa": train(lambda: F.scaled_dot_product_attention(qg, kg, vg, attn_mask=keep)),
            "chunked": train(lambda: attend.attention(qg, kg, vg, mask=pad, causal=True, backend="chunked")),
            "auto": train(lambda: attend.attention(qg, kg, vg, mask=pad, causal=True)),
        },
    }


def measure(rounds: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, list[float]]] = {}
    for name, fns in cases().items():
        got = results.setdefault(name, {})
        for _ in range(rounds):
            for split in (True, False):  # split: as shipped (it engages only on a contended CPU); False: never
                _helpers._STATE["per_thread"] = split
                for label, fn in fns.items():
                    if label == "sdpa" and not split:
                        continue
                    key = label if label == "sdpa" else f"{label} {'split' if split else 'one thread'}"
                    got.setdefault(key, []).append(timed(fn, 2))
        _helpers._STATE.pop("per_thread")
    return {n: {k: statistics.median(v) for k, v in d.items()} for n, d in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", type=int, default=2 * (os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    states = {}
    print(f"quiet: load average {os.getloadavg()[0]:.2f}, contended: {_helpers.cpu_contended()}")
    states["quiet"] = measure(args.rounds)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        time.sleep(12)  # PSI (the split's signal) averages over 10 s
        print(f"loaded ({args.load} busy processes): load average {os.getloadavg()[0]:.2f}, "
              f"contended: {_helpers.cpu_contended()}")
        states["loaded"] = measure(args.rounds)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    for state, res in states.items():
        print(f"\n{state}")
        for name, times in res.items():
            sdpa = times["sdpa"]
            parts = [f"{k} {t * 1e3:.1f} ms ({sdpa / t:.2f}x sdpa)" for k, t in times.items() if k != "sdpa"]
            print(f"  {name}: sdpa {sdpa * 1e3:.1f} ms; " + "; ".join(parts))
    print("\nloaded ratio / quiet ratio (floor 0.8):")
    for name in states["quiet"]:
        for key in states["quiet"][name]:
            if key == "sdpa":
                continue
            q_ratio = states["quiet"][name]["sdpa"] / states["quiet"][name][key]
            l_ratio = states["loaded"][name]["sdpa"] / states["loaded"][name][key]
            print(f"  {name} {key}: {q_ratio:.2f}x -> {l_ratio:.2f}x = {l_ratio / q_ratio:.2f}")


if __name__ == "__main__":
    main()
