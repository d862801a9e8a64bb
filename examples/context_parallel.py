"""Context parallel training: a tiny causal transformer on one long padded sequence split across processes.

    torchrun --nproc-per-node 4 examples/context_parallel.py    # gloo on CPU; NCCL when CUDA is available
    python examples/context_parallel.py                         # one process (a world of 1)

The sequence is cut along its positions with `attend.distributed.shard` (layout "headtail": rank r holds chunks r
and 2W-1-r of 2W, so every rank gets the same causal work); every rank runs the whole (replicated) model on its
positions, and attention goes through `context_parallel_attention(..., strategy="ring")`: the key/value blocks
travel around the ranks, with the key padding mask of their positions. The loss is the mean over the real
tokens of the whole sequence (each rank's sum, all-reduced); the parameter gradients are all-reduced too, so
every rank takes the same optimizer step. Rank 0 prints the loss per step. Before training, the sharded loss is
checked once against the loss of the unsharded sequence in one process (`attend.attention`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import attend
from attend.distributed import context_parallel_attention, shard
from attend.testing import tolerance

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, attention: Attention) -> Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)  # (b, heads, n, dim // heads)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, dim))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token and learned absolute position embeddings (indexed by *global* positions), pre-norm blocks."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, max_len: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor, positions: Tensor, attention: Attention) -> Tensor:
        x = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x, attention)
        return self.head(self.norm(x))


def make_sequence(n: int, length: int, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens (1, n), targets (1, n), key padding (1, n)): a noisy periodic sequence of `length` real tokens
    padded to n; targets are the next token (-100 where there is none: padding and the last real token)."""
    gen = torch.Generator().manual_seed(0)
    tokens = (torch.arange(n) * 3 % 11 + (torch.rand(n, generator=gen) < 0.1).long() * 5) % vocab
    real = torch.arange(n) < length
    tokens = torch.where(real, tokens, 0)[None]
    targets = torch.full_like(tokens, -100)
    targets[0, : length - 1] = tokens[0, 1:length]
    return tokens, targets, real[None]


def init_distributed() -> tuple[int, int, torch.device]:
    """The default group: joined if torchrun (or the caller) set one up, else a world of one on this process."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if "RANK" not in os.environ:  # plain `python`: a group of one
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"})
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return rank, world, device


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description="context parallel training of a tiny causal transformer")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length, padding included")
    parser.add_argument("--length", type=int, default=None, help="real tokens (default: 90%% of n plus 3)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--layout", default="headtail", choices=("headtail", "contiguous"))
    args = parser.parse_args(argv)
    length = args.length if args.length is not None else min(args.seq_len, int(0.9 * args.seq_len) + 3)

    rank, world, device = init_distributed()
    torch.manual_seed(0)  # the same initial parameters on every rank
    model = TinyLM(args.vocab, args.dim, args.heads, args.layers, args.seq_len).to(device)
    tokens, targets, pad = (t.to(device) for t in make_sequence(args.seq_len, length, args.vocab))
    positions = torch.arange(args.seq_len, device=device)[None]
    layout = args.layout
    # this rank's positions: the tokens, their targets, their global positions and their key padding
    local = {
        name: shard(t, 1, layout) for name, t in {"tokens": tokens, "targets": targets, "positions": positions}.items()
    }
    local_pad = shard(pad, 1, layout)

    def ring(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return context_parallel_attention(q, k, v, mask=local_pad, causal=True, layout=layout, strategy="ring")

    def sharded_loss() -> tuple[Tensor, Tensor]:
        """(this rank's share of the mean loss (differentiable), the global mean loss (detached))."""
        logits = model(local["tokens"], local["positions"], ring)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), local["targets"].flatten(), reduction="sum")
        totals = torch.stack([loss_sum.detach(), (local["targets"] != -100).sum().to(loss_sum.dtype)])
        dist.all_reduce(totals)
        return loss_sum / totals[1], totals[0] / totals[1]

    # once: the sharded loss equals the loss of the whole sequence in one process
    with torch.no_grad():
        full = model(tokens, positions, lambda q, k, v: attend.attention(q, k, v, mask=pad, causal=True))
        single = F.cross_entropy(full.flatten(0, 1), targets.flatten(), ignore_index=-100)
        _, sharded = sharded_loss()
    difference = abs(float(sharded) - float(single))
    tol = tolerance(torch.float32)  # the float32 tolerance of attend's own tests (the same for every world size)
    if not math.isclose(float(sharded), float(single), rel_tol=tol["rtol"], abs_tol=tol["atol"]):
        raise AssertionError(
            f"expected the sharded loss to equal the single-process loss within {tol}, got {float(sharded)} vs "
            f"{float(single)}; hint: a mask or position lost across ranks changes the loss"
        )
    if rank == 0:
        print(
            f"world {world}, {args.seq_len} positions ({length} real tokens), layout {layout!r}, "
            f"{dist.get_backend()}: sharded loss {float(sharded):.6f} = single-process loss {float(single):.6f} "
            f"(|diff| {difference:.1e})"
        )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        share, loss = sharded_loss()
        share.backward()  # every rank: the ring backward passes blocks between all of them
        for p in model.parameters():  # the replicated parameters: sum the ranks' parts of the gradient
            if p.grad is not None:
                dist.all_reduce(p.grad)
        optimizer.step()
        losses.append(float(loss))
        if rank == 0:
            print(f"step {step}: loss {float(loss):.4f}")
    return {"losses": losses, "check": difference, "world": world}


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
