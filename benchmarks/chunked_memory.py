"""Long sequences through the `chunked` backend on CPU: completes, matches the reference on sampled rows,
and the peak memory of the process stays bounded.

    PYTHONPATH=src python benchmarks/chunked_memory.py [--cases fwdbwd16k,fwd32k]

Shapes (b, h, i, d) = (1, 8, n, 64) float32, causal plus a key padding mask (the last eighth of the keys
is padding). Each case runs in a fresh child process; its peak RSS is read from
`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` after it exits (it includes torch itself, ~0.3 GiB).

Sampled-row check: a few query rows are recomputed in float64 from their own logits (einsum on the
sliced queries, the reference's semantics: bottom-right causal, padding, softmax). For the backward, the
upstream gradient is zero except on those rows, so dq on the rows and all of dk, dv depend on those rows
only and are checked exactly the same way. The einsum path would need an (8, n, n) float32 matrix:
8 GiB at 16k, 32 GiB at 32k.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = {"fwdbwd16k": (16384, True), "fwd32k": (32768, False), "fwdbwd4k": (4096, True)}


def child(name: str) -> None:
    import torch

    from attend.backends.chunked import chunked_attention
    from attend.inputs import validate

    n, backward = CASES[name]
    torch.manual_seed(0)
    b, h, d = 1, 8, 64
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    pad = torch.ones(b, n, dtype=torch.bool)
    pad[:, n - n // 8 :] = False
    k[:, :, n - n // 8 :] = 1e4  # garbage in the padding: must not leak
    v[:, :, n - n // 8 :] = -1e4
    rows = torch.tensor([0, 1, n // 3, n // 2 + 7, n - 1])
    for t in (q, k, v):
        t.requires_grad_(backward)

    t0 = time.perf_counter()
    inp = validate(q, k, v, mask=pad, causal=True)
    out = chunked_attention(inp)
    t_fwd = time.perf_counter() - t0
    grads = None
    if backward:
        dout = torch.zeros_like(out)
        dout[:, :, rows] = torch.randn(b, h, len(rows), d)
        t0 = time.perf_counter()
        grads = torch.autograd.grad(out, (q, k, v), dout)
        t_bwd = time.perf_counter() - t0

    # reference on the sampled rows, float64
    q64, k64, v64 = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    sim = torch.einsum("b h i d, b h j d -> b h i j", q64[:, :, rows], k64) * d**-0.5
    keep = (torch.arange(n)[None, :] <= rows[:, None]) & pad[0][None, :]  # i == j: plain lower triangle
    sim = sim.masked_fill(~keep, float("-inf"))
    ref = torch.einsum("b h i j, b h j e -> b h i e", sim.softmax(dim=-1), v64)
    errs = {"out": float((out.detach()[:, :, rows].double() - ref.detach()).abs().max())}
    if backward:
        rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), dout[:, :, rows].double())
        errs["dq"] = float((grads[0][:, :, rows].double() - rq[:, :, rows]).abs().max())
        errs["dk"] = float((grads[1].double() - rk).abs().max())
        errs["dv"] = float((grads[2].double() - rv).abs().max())
        errs["grads_finite"] = bool(all(torch.isfinite(g).all() for g in grads))
    result = {"case": name, "n": n, "forward_s": round(t_fwd, 2), "max_abs_err": errs}
    if backward:
        result["backward_s"] = round(t_bwd, 2)
    # the auto dispatcher must land on chunked here too (every other CPU path needs the (i, j) matrix)
    from attend import explain

    result["auto_picks"] = explain(q.detach(), k.detach(), v.detach(), mask=pad, causal=True).backend
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="fwdbwd16k,fwd32k")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, (1, 8, n, 64) float32, causal + key padding")
    for name in args.cases.split(","):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far
        if proc.returncode != 0:
            print(f"{name}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        note = "" if peak_kib > before else " (peak not above an earlier child's: run cases one at a time)"
        print(f"{proc.stdout.strip()}\n  {name}: wall {wall:.1f} s, peak RSS {peak_kib / 2**20:.2f} GiB{note}")


if __name__ == "__main__":
    main()
