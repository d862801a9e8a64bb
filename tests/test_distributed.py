"""attend.distributed: context parallel attention over torch.distributed, checked on CPU with gloo.

Each world size spawns its processes once (torch.multiprocessing, spawn) and every worker runs all the cases:
the sharded outputs and gradients must equal single-process `attend.attention` on the unsharded tensors (the
reference is computed in every worker from the same seed), sliced to the worker's shard.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attend
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
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        JOBS[job](rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


class _Counter:
    """Counts the collectives `attend.distributed` calls (it looks them up on torch.distributed per call)."""

    def __init__(self) -> None:
        self.counts = {"all_gather": 0, "all_gather_into_tensor": 0, "all_reduce": 0, "reduce_scatter": 0}
        self.originals = {name: getattr(dist, name) for name in self.counts}

    def __enter__(self) -> _Counter:
        for name, fn in self.originals.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.counts[name] += 1
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
    if feats.get("bool_mask"):
        full["mask"] = torch.rand(b, 1, n, n, generator=gen) > 0.3
    if feats.get("bias"):
        full["bias"] = torch.randn(1, h, n, n, generator=gen)
    if feats.get("documents"):
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
]


def _check_case(rank: int, world: int, n: int, layout: str, feats: dict[str, Any], counter: _Counter) -> None:
    full = _case_inputs(n, feats, world, layout)
    opts = {"causal": feats.get("causal", False), "window": feats.get("window")}
    where = f"rank {rank}/{world}, n={n}, layout={layout}, case={feats}"

    # reference: the whole sequence in one process
    leaves = {name: full[name].clone().requires_grad_() for name in ("q", "k", "v", "bias") if name in full}
    ref = attend.attention(
        leaves["q"], leaves["k"], leaves["v"], mask=full.get("mask"), bias=leaves.get("bias"),
        documents=full.get("documents"), **opts,
    )  # fmt: skip
    (ref * full["w"]).sum().backward()

    # this rank's shard
    local = {name: shard(t, 2, layout).clone().requires_grad_() for name, t in full.items() if name in leaves}
    mask = full.get("mask")
    if mask is not None:
        mask = shard(mask, 1, layout) if mask.dim() == 2 else shard(mask, 2, layout)
    documents = None if "documents" not in full else shard(full["documents"], 1, layout)
    counter.take()
    out = context_parallel_attention(
        local["q"], local["k"], local["v"], mask=mask, bias=local.get("bias"), documents=documents,
        layout=layout, strategy="allgather", **opts,
    )  # fmt: skip
    gathered = 1 if (mask is not None and mask.dim() == 2) or documents is not None else 0
    assert counter.take() == {"all_gather": 2 + gathered}, where
    (out * shard(full["w"], 2, layout)).sum().backward()
    assert counter.take() == {"all_reduce": 1}, where

    tol = tolerance(torch.float32)
    atol, rtol = tol["atol"], tol["rtol"]
    got = {"out": out, **{f"d{name}": local[name].grad for name in leaves}}
    want = {
        "out": shard(ref.detach(), 2, layout),
        **{f"d{name}": shard(leaf.grad, 2, layout) for name, leaf in leaves.items() if leaf.grad is not None},
    }
    assert got.keys() == want.keys(), where
    for key, value in got.items():
        assert value is not None, f"{key} missing, {where}"
        torch.testing.assert_close(value, want[key], atol=atol, rtol=rtol, msg=_prefixed(f"{key}, {where}"))


def _job_attention(rank: int, world: int) -> None:
    with _Counter() as counter:
        for layout in LAYOUTS:
            for n in (4 * world, 4 * world + 3):
                for feats in CASES:
                    _check_case(rank, world, n, layout, feats, counter)
            # fewer positions than chunks: some ranks hold none (and still take part in every collective)
            for feats in CASES[:3]:
                _check_case(rank, world, 3, layout, feats, counter)


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
    with pytest.raises(NotImplementedError, match="'ring' strategy is not built yet"):
        context_parallel_attention(q, q, q)
    with pytest.raises(NotImplementedError, match="dropout is not supported yet"):
        context_parallel_attention(q, q, q, strategy="allgather", dropout_p=0.1)
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
        out = context_parallel_attention(ql, ql, ql, strategy="allgather", causal=True)
        full = unshard(ql, 2)
        torch.testing.assert_close(out, attention_rows(full, rank, [4 + 2 * (r == 0) for r in range(world)]))
    with pytest.raises(ValueError, match="key padding"):
        context_parallel_attention(q, q, q, mask=torch.ones(1, 3, dtype=torch.bool), strategy="allgather")


def attention_rows(full: torch.Tensor, rank: int, lengths: list[int]) -> torch.Tensor:
    start = sum(lengths[:rank])
    return attend.attention(full, full, full, causal=True)[:, :, start : start + lengths[rank]]


JOBS = {"attention": _job_attention, "shard": _job_shard, "errors": _job_errors}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_single_process_attention(world):
    """Outputs and gradients (q, k, v, bias) equal attend.attention on the full sequence, every layout and
    mask, lengths divisible by 2W and not; and the collectives per call: 2 all_gathers (+1 for a key padding
    mask or documents) forward, 1 all_reduce backward."""
    _spawn("attention", world)


@pytest.mark.parametrize("world", [1, 3])
def test_shard_unshard_round_trip(world):
    _spawn("shard", world)


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
