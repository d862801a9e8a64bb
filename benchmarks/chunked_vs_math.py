"""Where `chunked` overtakes `sdpa:math` on CPU (the evidence for dispatch.PROMOTE).

    PYTHONPATH=src python benchmarks/chunked_vs_math.py

(1, 8, n, 64) float32 forward with dropout_p=0.1 (which sdpa:flash on CPU cannot run, so auto chooses
between these two), medians of round-robin runs after a warm-up, in one process.
"""

from __future__ import annotations

import statistics
import time

import torch

from attend.dispatch import get_backend
from attend.inputs import validate


def main() -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'n':>6} {'sdpa:math ms':>13} {'chunked ms':>11} {'math/chunked':>13}")
    for n in (64, 128, 256, 512, 1024, 2048):
        q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
        inp = validate(q, k, v, dropout_p=0.1)
        fns = {name: (lambda b=get_backend(name), inp=inp: b.run(inp)) for name in ("sdpa:math", "chunked")}
        reps = max(5, int(2e8 // (n * n * 8 * 64)))
        times = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        m, c = (statistics.median(times[x]) for x in ("sdpa:math", "chunked"))
        print(f"{n:>6} {m * 1e3:>13.2f} {c * 1e3:>11.2f} {m / c:>13.2f}")


if __name__ == "__main__":
    main()
