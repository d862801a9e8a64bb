"""The child process of `memory.cpu_peak_bytes`: `python -m attend.bench.memory_child` reads one spec as JSON
on stdin, builds its candidates and prints `memory.measure_peaks`'s figures as one JSON line.

A suite's case (`spec["shape"]`, mask, pad, causal) is built through `impls.make_call`; a structured
suite's row (`spec["structured"]`, the `StructuredCase` as a dict) through `structured.build`, each
candidate in its own layout of the row's tokens. It is its own module so that `memory`, which `run` and
`structured` import, imports neither of them.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch

from ..testing import Case
from .impls import make_call
from .memory import measure_peaks
from .structured import build, case_from_json

__all__ = ["main"]


def main() -> None:
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    dtype = getattr(torch, spec["dtype"])
    grad = spec["mode"] != "fwd"

    def suite_calls(tiny: bool) -> dict[str, Callable[[], object]]:
        shape = spec["shape"]
        sh = dict(shape, b=1, i=min(shape["i"], 8), j=min(shape["j"], 8)) if tiny else shape
        case = Case(**sh, dtype=dtype, causal=spec["causal"], mask=spec["mask"], pad=spec["pad"])
        tensors = case.inputs(grad=grad)
        go = torch.randn(sh["b"], sh["h"], sh["i"], sh["e"], dtype=dtype) if grad else None
        return {n: make_call(n, tensors, spec["causal"], spec["mode"], go) for n in spec["impls"]}

    def structured_calls(tiny: bool) -> dict[str, Callable[[], object]]:
        # a structured suite's row (bench/structured.py): each candidate builds its own layout of the row's tokens
        case = case_from_json(spec["structured"])
        built, _ = build(case.tiny() if tiny else case, spec["mode"], "cpu", dtype, spec["impls"])
        return {n: b.call for n, b in built.items()}

    print(json.dumps(measure_peaks(structured_calls if "structured" in spec else suite_calls)))


if __name__ == "__main__":
    main()
