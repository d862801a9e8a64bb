"""attend.distributed: context parallel attention over torch.distributed, checked on CPU with gloo.

Each world size spawns its processes once (torch.multiprocessing, spawn) and every worker runs all the cases,
with both strategies ("allgather", "ring"): the sharded outputs and gradients must equal single-process
`attend.attention` on the unsharded tensors (the reference is computed in every worker from the same seed),
sliced to the worker's shard; and the communication of every call is counted (`_Counter`).
"""

from __future__ import annotations

import gc
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attend
import attend.distributed as attend_distributed
import attend.tiles as attend_tiles
from attend.distributed import context_parallel_attention, shard, unshard
from attend.testing import tolerance

LAYOUTS = ("contiguous", "headtail")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(job: str, world: int) -> None:
    mp.spawn(_worker, args=(world, _free_port(), job), nprocs=world, join=True)


def _worker(rank: int, world: int, port: int, job: str) -> None:
    torch.set_num_threads(1)
    backend = "gloo"
    if job.endswith("nccl"):
        backend = "nccl"
        torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference, as in the main process
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        JOBS[job](rank, world)
        dist.barrier()
    except BaseException:
        gc.collect()
        dist.destroy_process_group()
        raise  # (spawn reports it to the test)
    # every rank passed the barrier: leave without tearing gloo down. Its teardown has aborted at exit (SIGABRT,
    # "terminate called without an active exception", once in a full-suite run) and hung in
    # destroy_process_group (torch 2.4.1, world 3, in a matrix run); the job's checks are done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _Counter:
    """Counts the collectives and point-to-point ops `attend.distributed` calls (it looks them up on
    torch.distributed per call). `batch_isend_irecv` also counts the ops in its list ("p2p isend", "p2p irecv")
    and the elements they send ("sent elements")."""

    NAMES = (
        "all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter", "broadcast", "all_to_all",
        "all_to_all_single", "isend", "irecv", "send", "recv", "batch_isend_irecv",
    )  # fmt: skip

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.NAMES, 0)
        self.counts.update({"p2p isend": 0, "p2p irecv": 0, "sent elements": 0})
        self.originals = {name: getattr(dist, name) for name in self.NAMES}

    def __enter__(self) -> _Counter:
        for name, fn in self.originals.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.counts[name] += 1
            if name == "batch_isend_irecv":
                for op in args[0]:
                    send = op.op is dist.distributed_c10d.isend
                    self.counts["p2p isend" if send else "p2p irecv"] += 1
                    self.counts["sent elements"] += op.tensor.numel() if send else 0
            return fn(*args, **kwargs)

        return wrapped

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, fn)

    def take(self) -> dict[str, int]:
        out = {k: v for k, v in self.counts.items() if v}
        for k in self.counts:
            self.counts[k] = 0
        return out


def _prefixed(prefix: str) -> Callable[[str], str]:
    """An `assert_close` message that keeps its own report after `prefix`."""

    def msg(report: str) -> str:
        return f"{prefix}: {report}"

    return msg


def _case_inputs(n: int, feats: dict[str, Any], world: int, layout: str) -> dict[str, Any]:
    """Full (unsharded) inputs of one case, the same on every rank (seeded)."""
    gen = torch.Generator().manual_seed(1234 + n)
    b, h, g, d, e = 2, 4, (2 if feats.get("gqa") else 4), 8, 6
    full: dict[str, Any] = {
        "q": torch.randn(b, h, n, d, generator=gen),
        "k": torch.randn(b, g, n, d, generator=gen),
        "v": torch.randn(b, g, n, e, generator=gen),
        "w": torch.randn(b, h, n, e, generator=gen),  # the loss weights: loss = sum(out * w)
    }
    if feats.get("padding"):
        # element 0 ends on a shard border (the end of rank 0's first run of positions), element 1 inside one
        parts = world if layout == "contiguous" else 2 * world
        border = len(torch.arange(n).tensor_split(parts)[0])
        pad = torch.zeros(b, n, dtype=torch.bool)
        pad[0, :border] = True
        pad[1, : max(border - 1, 1)] = True
        full["mask"] = pad
    if feats.get("left_padding"):
        # padding first: under causal the rows before an element's first key see nothing (output and grads 0)
        parts = world if layout == "contiguous" else 2 * world
        border = len(torch.arange(n).tensor_split(parts)[0])
        pad = torch.ones(b, n, dtype=torch.bool)
        pad[0, :border] = False
        pad[1, : border + 1] = False
        full["mask"] = pad
    if feats.get("bool_mask"):
        full["mask"] = torch.rand(b, 1, n, n, generator=gen) > 0.3
    if feats.get("bias"):
        full["bias"] = torch.randn(1, h, n, n, generator=gen)
    if feats.get("documents"):
        if feats["documents"] == "unsorted":  # ids that come back: blocks compare them, no interval
            full["documents"] = torch.randint(0, 3, (b, n), generator=gen)
        else:
            starts = torch.rand(b, n, generator=gen) < 0.25
            starts[:, 0] = False
            full["documents"] = starts.long().cumsum(1)
    return full


CASES: list[dict[str, Any]] = [
    {},
    {"causal": True},
    {"causal": True, "padding": True},
    {"gqa": True, "window": (2, 1)},
    {"gqa": True, "causal": True, "window": (3, None)},
    {"causal": True, "bias": True, "documents": True},
    {"documents": True, "padding": True, "window": (2, 2)},
    {"bool_mask": True, "causal": True},
    {"gqa": True, "causal": True, "left_padding": True, "bias": True},
    {"documents": "unsorted", "causal": True, "window": (None, 1)},
    # dropout: the keep-mask of one process's chunked call under rank 0's generator state
    {"dropout": 0.3, "causal": True, "padding": True},
    {"dropout": 0.2, "gqa": True, "bias": True, "documents": True, "window": (3, 1)},
]
_DROPOUT_SEED = 77  # the reference's and rank 0's generator seed; the other ranks' differ (rank 0's seed is used)


def _ring_counts(rank: int, lengths: list[int], kv: int, fields: int) -> tuple[dict[str, int], dict[str, int]]:
    """The communication of one ring call on this rank, forward and backward. `kv`: elements of k and v per
    position (b * g * (d + e)); `fields`: int64 elements of key padding / document ids per position.

    Forward: 1 all_gather (the shapes and options), then W-1 steps; at step s this rank holds the block of rank
    (rank - s) % W and passes it on in P pieces (`torch.tensor_split`'s rule), one exchange per piece: k, v (and
    the ids when given) of the piece sent, the same piece of the next block received; empty pieces are not
    sent. Backward: the same W-1 steps of k and v, and W exchanges of each piece's dk/dv accumulator (the last
    brings them home)."""
    world, pieces = len(lengths), attend_distributed._PIECES
    counts = [{"all_gather": 1}, {}]
    if world == 1:
        return counts[0], counts[1]

    def piece(step: int, p: int) -> int:  # length of piece p of the block held at `step`
        return len(torch.arange(lengths[(rank - step) % world]).tensor_split(pieces)[p])

    passes = [(0, world - 1, 2 + (1 if fields else 0), kv + fields), (1, world - 1, 2, kv), (1, world, 2, kv)]
    for which, steps, tensors, per_position in passes:  # forward k/v; backward k/v; backward dk/dv
        got = counts[which]
        for step in range(steps):
            for p in range(pieces):
                send, recv = piece(step, p), piece(step + 1, p)
                for name, value in (
                    ("batch_isend_irecv", int(send > 0 or recv > 0)), ("p2p isend", tensors * (send > 0)),
                    ("p2p irecv", tensors * (recv > 0)), ("sent elements", send * per_position),
                ):  # fmt: skip
                    if value:
                        got[name] = got.get(name, 0) + value
    return counts[0], counts[1]


def _check_case(
    rank: int, world: int, n: int, layout: str, feats: dict[str, Any], counter: _Counter, device: str = "cpu"
) -> None:
    full = {name: t.to(device) for name, t in _case_inputs(n, feats, world, layout).items()}
    opts = {"causal": feats.get("causal", False), "window": feats.get("window"), "dropout_p": feats.get("dropout", 0.0)}
    where = f"rank {rank}/{world}, n={n}, layout={layout}, case={feats}"

    # reference: the whole sequence in one process (with dropout: chunked's keep-mask, from the seeded generator)
    leaves = {name: full[name].clone().requires_grad_() for name in ("q", "k", "v", "bias") if name in full}
    torch.manual_seed(_DROPOUT_SEED)
    ref = attend.attention(
        leaves["q"], leaves["k"], leaves["v"], mask=full.get("mask"), bias=leaves.get("bias"),
        documents=full.get("documents"), backend="chunked" if opts["dropout_p"] else None, **opts,
    )  # fmt: skip
    (ref * full["w"]).sum().backward()
    want = {
        "out": shard(ref.detach(), 2, layout),
        **{f"d{name}": shard(leaf.grad, 2, layout) for name, leaf in leaves.items() if leaf.grad is not None},
    }
    mask = full.get("mask")
    if mask is not None:
        mask = shard(mask, 1, layout) if mask.dim() == 2 else shard(mask, 2, layout)
    documents = None if "documents" not in full else shard(full["documents"], 1, layout)
    lengths = [len(shard_of) for shard_of in _all_shards(n, world, layout)]
    tol = tolerance(torch.float32)
    atol, rtol = tol["atol"], tol["rtol"]

    for strategy in ("allgather", "ring"):
        here = f"{where}, strategy={strategy}"
        # this rank's shard
        local = {name: shard(t, 2, layout).clone().requires_grad_() for name, t in full.items() if name in leaves}
        counter.take()
        torch.manual_seed(_DROPOUT_SEED if rank == 0 else 1000 + rank)
        out = context_parallel_attention(
            local["q"], local["k"], local["v"], mask=mask, bias=local.get("bias"), documents=documents,
            layout=layout, strategy=strategy, **opts,
        )  # fmt: skip
        fwd = counter.take()
        (out * shard(full["w"], 2, layout)).sum().backward()
        bwd = counter.take()
        fields = int(mask is not None and mask.dim() == 2) + int(documents is not None)
        if strategy == "allgather":
            assert fwd == {"all_gather": 2 + (1 if fields else 0)}, here
            assert bwd == {"all_reduce": 1}, here
        else:
            b, g, d, e = local["k"].shape[0], local["k"].shape[1], local["k"].shape[3], local["v"].shape[3]
            want_fwd, want_bwd = _ring_counts(rank, lengths, b * g * (d + e), b * fields)
            assert fwd == want_fwd, f"forward communication, {here}: got {fwd}, expected {want_fwd}"
            assert bwd == want_bwd, f"backward communication, {here}: got {bwd}, expected {want_bwd}"

        got = {"out": out, **{f"d{name}": local[name].grad for name in leaves}}
        assert got.keys() == want.keys(), here
        for key, value in got.items():
            assert value is not None, f"{key} missing, {here}"
            torch.testing.assert_close(value, want[key], atol=atol, rtol=rtol, msg=_prefixed(f"{key}, {here}"))


def _all_shards(n: int, world: int, layout: str) -> list[list[int]]:
    """Every rank's global positions under `layout` (the rule `shard` follows)."""
    parts = world if layout == "contiguous" else 2 * world
    chunks = [c.tolist() for c in torch.arange(n).tensor_split(parts)]
    if layout == "contiguous":
        return chunks
    return [chunks[r] + chunks[2 * world - 1 - r] for r in range(world)]


def _job_attention(rank: int, world: int) -> None:
    with _Counter() as counter:
        for layout in LAYOUTS:
            for n in (4 * world, 4 * world + 3):
                # ring: the default tiles hold a whole block here; with n % 4 == 3 tiles of 2 queries x 3 keys,
                # so the runs are cut in several tiles (partly visible ones masked, invisible ones skipped)
                tiles = {"cpu": (2, 3)} if n % 4 else attend_distributed._RING_TILES
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(attend_distributed, "_RING_TILES", tiles)
                    for feats in CASES:
                        _check_case(rank, world, n, layout, feats, counter)
            # fewer positions than chunks: some ranks hold none (and still take part in every collective)
            for feats in CASES[:3]:
                _check_case(rank, world, 3, layout, feats, counter)
    _check_ring_skips(rank, world)
    _check_ring_q_grad_only(rank, world)


def _check_ring_q_grad_only(rank: int, world: int) -> None:
    """Ring with only q requiring grad (lengths that differ across ranks): dq as one process gives it, and no
    dk/dv accumulator travels (backward: only the W-1 steps of k and v)."""
    n, layout = 4 * world + 3, "headtail"
    full = _case_inputs(n, {"padding": True}, world, layout)
    q = full["q"].clone().requires_grad_()
    (attend.attention(q, full["k"], full["v"], mask=full["mask"], causal=True) * full["w"]).sum().backward()
    local_q = shard(full["q"], 2, layout).clone().requires_grad_()
    k, v, mask, w = (shard(full[name], 2 if name != "mask" else 1, layout) for name in ("k", "v", "mask", "w"))
    out = context_parallel_attention(local_q, k, v, mask=mask, causal=True, layout=layout)
    with _Counter() as counter:
        (out * w).sum().backward()
    # the backward's k/v steps are the forward's (without ids), and no dk/dv exchange follows them
    lengths = [len(positions) for positions in _all_shards(n, world, layout)]
    forward, _ = _ring_counts(rank, lengths, kv=1, fields=0)
    want = {name: count for name, count in forward.items() if name not in ("all_gather", "sent elements")}
    got = {name: count for name, count in counter.take().items() if name != "sent elements"}
    assert got == want, f"rank {rank}/{world}: backward communication {got}, expected {want}"
    assert q.grad is not None
    torch.testing.assert_close(local_q.grad, shard(q.grad, 2, layout), **tolerance(torch.float32))


def _check_ring_skips(rank: int, world: int) -> None:
    """Ring, causal, contiguous: rank r computes only on the blocks of ranks 0..r (the later ones hold keys
    after all its queries), forward and backward; every block still travels (the counts in `_check_case`)."""
    calls = {"forward": 0, "backward": 0}
    real_forward, real_backward = attend_tiles.forward, attend_tiles.backward_into

    def forward(*args: Any) -> Any:
        calls["forward"] += 1
        return real_forward(*args)

    def backward(*args: Any) -> Any:
        calls["backward"] += 1
        return real_backward(*args)

    q = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    attend_tiles.forward, attend_tiles.backward_into = forward, backward  # the ring calls them as `tiles.<name>`
    try:
        context_parallel_attention(q, q, q, causal=True).sum().backward()
    finally:
        attend_tiles.forward, attend_tiles.backward_into = real_forward, real_backward
    # each block in P pieces of consecutive positions: a kernel call per (non-empty) piece of blocks 0..r
    want = (rank + 1) * min(attend_distributed._PIECES, q.shape[2])
    assert calls == {"forward": want, "backward": want}, f"rank {rank}/{world}: {calls}"


def _job_shard(rank: int, world: int) -> None:
    for layout in LAYOUTS:
        for n in (2 * world, 2 * world + 1, 5 * world + 3):
            x = torch.arange(3 * n * 2, dtype=torch.float32).reshape(3, n, 2)
            local = shard(x, 1, layout)
            # the shard sizes: torch.tensor_split's rule (contiguous), chunks r and 2W-1-r of 2W (headtail)
            if layout == "contiguous":
                assert torch.equal(local, x.tensor_split(world, dim=1)[rank])
            else:
                chunks = x.tensor_split(2 * world, dim=1)
                assert torch.equal(local, torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=1))
            with _Counter() as counter:
                leaf = local.clone().requires_grad_()
                back = unshard(leaf, 1, layout)
                assert counter.take() == {"all_gather": 2}
                assert torch.equal(back, x), f"round trip, layout={layout}, n={n}"
                # each rank's own loss; the gradient of a shard sums every rank's gradient at its positions
                weights = [torch.randn(3, n, 2, generator=torch.Generator().manual_seed(r)) for r in range(world)]
                (back * weights[rank]).sum().backward()
                assert counter.take() == {"all_reduce": 1}
            assert leaf.grad is not None
            torch.testing.assert_close(leaf.grad, shard(sum(weights), 1, layout))  # type: ignore[arg-type]
            assert torch.equal(unshard(shard(x, -2, layout), -2, layout), x)


def _job_errors(rank: int, world: int) -> None:
    q = torch.randn(1, 2, 4, 8)
    for strategy in ("allgather", "ring"):
        # a failed local check raises without a reference cycle (an exception kept by its own frame would keep
        # the process group alive past destroy_process_group, and gloo aborted at interpreter exit, 2 in 40 runs)
        gc.collect()
        gc.disable()
        try:
            with pytest.raises(ValueError, match=r"expected `dropout_p` in \[0, 1\), got 1.5"):
                context_parallel_attention(q, q, q, strategy=strategy, dropout_p=1.5)
            assert gc.collect() == 0, "a failed check left a reference cycle"
        finally:
            gc.enable()
        if world > 1:
            with pytest.raises(ValueError, match=r"the same dropout_p \(in units of 2\*\*-24\)"):
                context_parallel_attention(q, q, q, strategy=strategy, dropout_p=0.1 if rank else 0.2)
    # ring: first-order only; every rank raises in its backward before any communication
    leaf = q.clone().requires_grad_()
    out = context_parallel_attention(leaf, leaf, leaf, causal=True)
    with pytest.raises(RuntimeError, match="expected a first-order backward"):
        torch.autograd.grad(out.sum(), leaf, create_graph=True)
    with pytest.raises(ValueError, match="expected `strategy` to be one of"):
        context_parallel_attention(q, q, q, strategy="alltoall")
    with pytest.raises(ValueError, match="i_local == j_local"):
        context_parallel_attention(q, q[:, :, :3], q[:, :, :3], strategy="allgather")
    if world > 1:
        # shapes that differ across ranks: every rank raises (no rank waits on a collective)
        heads = 2 if rank == 0 else 4
        qh = torch.randn(1, heads, 4, 8)
        with pytest.raises(ValueError, match="the same h, got"):
            context_parallel_attention(qh, qh, qh, strategy="allgather")
        # a rank whose own checks fail: it raises its error, the others say which rank failed
        bias = torch.randn(1, 2, 4 if rank else 3, 4 * world)
        with pytest.raises(ValueError, match="broadcastable to" if rank == 0 else r"errors on rank\(s\) \[0\]"):
            context_parallel_attention(q, q, q, bias=bias, strategy="allgather")
        # a key axis that does not match the whole sequence on one rank: every rank raises
        bias = torch.randn(1, 2, 4, 4 * world + (rank == 0))
        with pytest.raises(ValueError, match="got a key axis of"):
            context_parallel_attention(q, q, q, bias=bias, strategy="allgather")
        # headtail lengths that do not follow the rule
        ql = torch.randn(1, 2, 4 + 2 * (rank == 0), 8)
        with pytest.raises(ValueError, match="'headtail' rule"):
            context_parallel_attention(ql, ql, ql, strategy="allgather", layout="headtail")
        with pytest.raises(ValueError, match="'headtail' rule"):
            unshard(ql, 2, layout="headtail")
        # ...which contiguous takes as it is: the global positions are the prefix sums of the lengths
        full = unshard(ql, 2)
        for strategy in ("allgather", "ring"):
            out = context_parallel_attention(ql, ql, ql, strategy=strategy, causal=True)
            torch.testing.assert_close(out, attention_rows(full, rank, [4 + 2 * (r == 0) for r in range(world)]))
    with pytest.raises(ValueError, match="key padding"):
        context_parallel_attention(q, q, q, mask=torch.ones(1, 3, dtype=torch.bool), strategy="allgather")


def attention_rows(full: torch.Tensor, rank: int, lengths: list[int]) -> torch.Tensor:
    start = sum(lengths[:rank])
    return attend.attention(full, full, full, causal=True)[:, :, start : start + lengths[rank]]


def _job_example(rank: int, world: int) -> None:
    """examples/context_parallel.py's main at a tiny size, in this (already initialised) group: it checks the
    sharded loss against one process's itself; here also that training lowers the loss."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "context_parallel.py"
    spec = importlib.util.spec_from_file_location("context_parallel_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--seq-len", "37", "--steps", "3", "--dim", "16", "--heads", "2", "--layers", "1"])
    assert result["world"] == world
    losses = result["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0], f"rank {rank}: losses {losses}"


def _job_nccl(rank: int, world: int) -> None:
    """NCCL on CUDA (world 1 on a one-GPU machine: a loopback group): the cases with padding, GQA, bias,
    documents, window and dropout, both layouts and strategies, against one process's attention on the GPU."""
    with _Counter() as counter:
        for layout in LAYOUTS:
            for feats in (CASES[2], CASES[8], *[case for case in CASES if "dropout" in case]):
                _check_case(rank, world, 4 * world + 3, layout, feats, counter, device="cuda")


def _job_windows(rank: int, world: int) -> None:
    """A window side of any Python int equals an unbounded one, across ranks: saturated at the global length,
    never at a rank's own or at one run of keys' (a side of n - 2 with n / world local positions still hides
    keys) and never wrapped. Runs of many keys (n = 32 * world) as well as one-key runs (n = 4 * world)."""
    import sys

    for n in (4 * world, 32 * world):
        q, k, v = (torch.randn(1, 2, n, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
        for layout in LAYOUTS:
            ql, kl, vl = (shard(t, 2, layout) for t in (q, k, v))
            cases = [
                ((sys.maxsize, 1), (None, 1)), ((1, 10**20), (1, None)), ((n, n), (None, None)),
                ((n - 2, 0), (n - 2, 0)), ((n // 2 + 3, 1), (n // 2 + 3, 1)), ((0, n // 2), (0, n // 2)),
            ]  # fmt: skip
            for strategy in ("allgather", "ring"):
                for causal in (False, True):
                    for given, same in cases:
                        want = shard(attend.attention(q, k, v, causal=causal, window=same), 2, layout)
                        got = context_parallel_attention(
                            ql, kl, vl, causal=causal, window=given, layout=layout, strategy=strategy
                        )
                        what = f"n={n} {layout} {strategy} causal={causal} {given}"
                        torch.testing.assert_close(got, want, msg=_prefixed(what))


def _job_vocabulary(rank: int, world: int) -> None:
    """sinks, softcap and return_lse across ranks: out, lse and the gradients of q, k, v and sinks (a loss on
    both outputs) equal one process's attention on the full sequence, sliced to this rank, both strategies."""
    n = 6 * world + 1
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, n, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    sinks = torch.randn(4, generator=gen, dtype=torch.float64)
    pad = torch.ones(1, n, dtype=torch.bool)
    pad[0, -2:] = False
    kw = {"causal": True, "softcap": 2.0, "return_lse": True}
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out, lse = attend.attention(*leaves[:3], mask=pad, sinks=leaves[3], **kw)
    (out.square().sum() + lse.sum()).backward()
    for layout in LAYOUTS:
        for strategy in ("allgather", "ring"):
            mine = [shard(t.detach(), 2, layout).requires_grad_() for t in (q, k, v)]
            s = sinks.clone().requires_grad_()
            got_out, got_lse = context_parallel_attention(
                *mine, mask=shard(pad, 1, layout), sinks=s, layout=layout, strategy=strategy, **kw
            )
            (got_out.square().sum() + got_lse.sum()).backward()
            what = f"{layout} {strategy}"
            torch.testing.assert_close(got_out, shard(out.detach(), 2, layout), msg=_prefixed(f"{what} out"))
            torch.testing.assert_close(got_lse, shard(lse.detach(), 2, layout), msg=_prefixed(f"{what} lse"))
            for name, got, full in zip("qkv", mine, leaves[:3]):
                torch.testing.assert_close(got.grad, shard(full.grad, 2, layout), msg=_prefixed(f"{what} d{name}"))
            # the sinks' gradient: this rank's rows' share, summed over the ranks equals one process's
            total = s.grad.clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, leaves[3].grad, msg=_prefixed(f"{what} dsinks"))


JOBS = {
    "attention": _job_attention, "shard": _job_shard, "errors": _job_errors, "example": _job_example,
    "attention nccl": _job_nccl, "windows": _job_windows, "vocabulary": _job_vocabulary,
}  # fmt: skip


@pytest.mark.parametrize("world", [1, 2])
def test_sinks_softcap_and_lse_across_ranks(world):
    _spawn("vocabulary", world)


@pytest.mark.parametrize("world", [2, 3])
def test_window_sides_of_any_size_across_ranks(world):
    _spawn("windows", world)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_single_process_attention(world):
    """Outputs and gradients (q, k, v, bias) equal attend.attention on the full sequence, both strategies, every
    layout and mask, lengths divisible by 2W and not (and fewer positions than ranks); the communication per
    call: allgather 2 all_gathers (+1 for a key padding mask or documents) forward, 1 all_reduce backward; ring
    1 all_gather (shapes) and only point-to-point exchanges of pieces of k/v (`_ring_counts`); ring skips the
    blocks no local query sees, and with only q requiring grad no dk/dv travels."""
    _spawn("attention", world)


@pytest.mark.parametrize("world", [1, 3])
def test_shard_unshard_round_trip(world):
    _spawn("shard", world)


def test_example_trains_across_ranks():
    """`torchrun --nproc-per-node 4 examples/context_parallel.py` at a tiny size, world 2: the example's own
    check (sharded loss = single-process loss) passes and the loss goes down."""
    _spawn("example", 2)


def test_errors_across_ranks():
    _spawn("errors", 2)


def test_errors_without_a_process_group():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        context_parallel_attention(q, q, q, strategy="allgather")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        shard(q, 2)
    with pytest.raises(ValueError, match="expected `layout` to be one of"):
        shard(q, 2, layout="zigzag")
    with pytest.raises(ValueError, match="expected `layout` to be one of"):
        context_parallel_attention(q, q, q, layout="stripe")


@pytest.mark.gpu
def test_nccl_matches_single_process_attention_on_cuda():
    """The same checks over NCCL on the GPUs there are (one: a world of 1). benchmarks/gpu_check.sh runs it."""
    _spawn("attention nccl", max(1, min(torch.cuda.device_count(), 2)))
