"""Issue 23's floors, side by side in one process (interleaved rounds, medians):
`python benchmarks/issue23_floors.py`. `attend bench --suite vocabulary` times the same calls; the gpt-oss
decode row (sinks in with_kvcache) is here only."""
import statistics
import time

import torch

from attend import attention, with_kvcache

torch.manual_seed(0)

def pair(fa, fb, n, rounds=7):
    for f in (fa, fb):
        f()
    ta, tb = [], []
    for r in range(rounds):
        for f, acc in ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta)):
            f()
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            acc.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(ta), statistics.median(tb)

def report(name, a, b, what):
    print(f"{name:60s} {a:9.2f} ms  {b:9.2f} ms  {what} {b / a:.3f}", flush=True)

q, k, v = (torch.randn(4, 8, 1024, 64) for _ in range(3))
a, b = pair(lambda: attention(q, k, v), lambda: attention(q, k, v, return_lse=True), 3)
report("return_lse fwd (4,8,1024,64): plain | lse", a, b, "lse/plain")
qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
a, b = pair(lambda: attention(qg, kg, vg).sum().backward(),
            lambda: attention(qg, kg, vg, return_lse=True)[0].sum().backward(), 2)
report("return_lse fwd+bwd (4,8,1024,64): plain | lse", a, b, "lse/plain")
sinks = torch.zeros(8, requires_grad=True)
a, b = pair(lambda: attention(qg, kg, vg, causal=True).sum().backward(),
            lambda: attention(qg, kg, vg, causal=True, sinks=sinks).sum().backward(), 2)
report("sinks causal fwd+bwd (4,8,1024,64): plain | sinks", a, b, "sinks/plain")

def gemma_eager(q, k, v, cap):  # transformers' Gemma 2 eager_attention_forward, causal, fp32
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    s = torch.tanh(s / cap) * cap
    n = s.shape[-1]
    s = s + torch.full((n, n), float("-inf")).triu(1)
    return s.softmax(-1) @ v

q4, k4, v4 = (torch.randn(1, 8, 4096, 128, requires_grad=True) for _ in range(3))
a, b = pair(lambda: gemma_eager(q4, k4, v4, 50.0).sum().backward(),
            lambda: attention(q4, k4, v4, causal=True, softcap=50.0).sum().backward(), 1, rounds=3)
report("softcap causal fwd+bwd (1,8,4096,128): eager | attend", a, b, "attend/eager (speedup = 1/x)")

kc, vc = torch.randn(1, 8, 8192, 128), torch.randn(1, 8, 8192, 128)
qd, kn, vn = torch.randn(1, 64, 1, 128), torch.randn(1, 8, 1, 128), torch.randn(1, 8, 1, 128)
s64 = torch.randn(64)
with torch.no_grad():
    a, b = pair(lambda: with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=8191),
                lambda: with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=8191, sinks=s64), 20)
report("gpt-oss decode b1 8k cache (h=64, g=8, d=128): plain | sinks", a, b, "sinks/plain")
print("load", open("/proc/loadavg").read().split()[:3], "threads", torch.get_num_threads(), torch.__version__)
