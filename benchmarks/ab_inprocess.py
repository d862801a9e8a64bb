"""Two versions of attend side by side in one process, calls interleaved block by block.

    python benchmarks/ab_inprocess.py OLD_SRC NEW_SRC [ROUNDS] [FILTER]

OLD_SRC and NEW_SRC are `src/` folders of two checkouts (`git worktree add /tmp/old <commit>`). Each package is
copied under its own name (attend's imports inside the package are relative), both are imported, and every case
runs as alternating timed blocks (the order swapped each round, an untimed call before each block). Per case:
each side's median block time and the median and interquartile range of new/old over the rounds. Run it with
NEW_SRC = OLD_SRC to see this machine's null spread. Shape legend: b batch, h query heads, i, j positions, d dim.
"""

from __future__ import annotations

import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def load(src: str, name: str, into: Path):
    shutil.copytree(Path(src) / "attend", into / name)
    return importlib.import_module(name)


def cases(m):
    att, kv = m.attention, m.with_kvcache
    q, k, v = (torch.randn(1, 8, 16, 64) for _ in range(3))
    qg, kg, vg = (torch.randn(1, 8, 16, 64, requires_grad=True) for _ in range(3))
    q4, k4, v4 = (torch.randn(4, 8, 256, 64) for _ in range(3))
    pad = torch.ones(4, 256, dtype=torch.bool)
    pad[1, 200:] = False
    docs = torch.repeat_interleave(torch.arange(4), 512)[None]
    q2, k2, v2 = (torch.randn(1, 8, 2048, 64) for _ in range(3))
    kc, vc = torch.randn(1, 8, 1024, 128), torch.randn(1, 8, 1024, 128)
    kc8, vc8 = torch.randn(1, 8, 8192, 128), torch.randn(1, 8, 8192, 128)
    qd, kn, vn = torch.randn(1, 32, 1, 128), torch.randn(1, 8, 1, 128), torch.randn(1, 8, 1, 128)
    w = torch.randn(1, 8, 1024, 64, requires_grad=True)
    cu = torch.tensor([0, 300, 700, 1024], dtype=torch.int32)
    qv, kvv = torch.randn(1024, 8, 64), torch.randn(1024, 2, 64)

    def nograd(f):
        def g():
            with torch.no_grad():
                return f()

        return g

    return {
        "small: (1,8,16,64) fwd": (lambda: att(q, k, v), 300),
        "small: (1,8,16,64) fwd+bwd": (lambda: att(qg, kg, vg).sum().backward(), 150),
        "padded causal (4,8,256,64) fwd": (lambda: att(q4, k4, v4, mask=pad, causal=True), 10),
        "structured: l2 padded (4,8,256,64) fwd": (lambda: att(q4, k4, v4, mask=pad, score="l2"), 6),
        "structured: documents causal (1,8,2048,64) fwd": (lambda: att(q2, k2, v2, documents=docs, causal=True), 2),
        "structured: window (1,8,1024,64) fwd+bwd": (
            lambda: att(w, w, w, causal=True, window=(128, 0)).sum().backward(), 2,
        ),
        "structured: varlen (1024 tokens, 3 seqs) fwd": (
            lambda: m.varlen_attn(qv, kvv, kvv, cu, cu, 400, 400, window_size=(-1, 0), enable_gqa=True), 4,
        ),
        "decode: with_kvcache b1 1k": (nograd(lambda: kv(qd, kc, vc, kn, vn, cache_seqlens=1023)), 60),
        "decode: with_kvcache b1 8k split-KV": (nograd(lambda: kv(qd, kc8, vc8, kn, vn, cache_seqlens=8191)), 8),
    }  # fmt: skip


def main() -> None:
    old_src, new_src = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 15
    only = sys.argv[4] if len(sys.argv) > 4 else ""
    tmp = Path(tempfile.mkdtemp())
    sys.path.insert(0, str(tmp))
    torch.manual_seed(0)
    ca, cb = cases(load(old_src, "attend_old", tmp)), cases(load(new_src, "attend_new", tmp))
    load_avg = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else "?"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds, load {load_avg}")
    for name in [n for n in ca if only in n]:
        fa, n = ca[name]
        fb, _ = cb[name]
        for f in (fa, fb, fa, fb):
            f()
        ta: list[float] = []
        tb: list[float] = []
        for r in range(rounds):
            order = [(fa, ta), (fb, tb)] if r % 2 == 0 else [(fb, tb), (fa, ta)]
            for f, acc in order:
                f()  # untimed: the other side's data leaves the caches
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                acc.append((time.perf_counter() - t0) / n * 1e6)
        ratios = sorted(b / a for a, b in zip(ta, tb))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        print(
            f"{name:48s} old {statistics.median(ta):10.1f} us  new {statistics.median(tb):10.1f} us  "
            f"new/old median {statistics.median(ratios):.3f} (IQR {q1:.3f}-{q3:.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
