"""Registry-driven: every backend x every case of the grid, forward and dq, dk, dv, against the
float64 golden with earned tolerances. A case a backend cannot run is skipped with its own reasons."""

from __future__ import annotations

import pytest
import torch

from attend import get_backend, list_backends
from attend.inputs import validate
from attend.testing import backends_for, check_backend, checkable, grid

from .conftest import DEVICES

PARAMS = [
    pytest.param(name, case, id=case.id(name), marks=[pytest.mark.gpu] if case.device == "cuda" else [])
    for device in DEVICES
    for case in grid(device)
    for name in backends_for(device)
]


@pytest.mark.parametrize("name, case", PARAMS)
def test_backend_matches_reference(name, case):
    """Forward and backward; where the backend declares it cannot run the backward of a case it can run
    forward (CPU flash in half precision), the forward alone, so inference stays covered."""
    q, k, v, mask, bias = case.inputs()
    kw = dict(mask=mask, bias=bias, causal=case.causal, **case.options())
    grad, reasons = checkable(name, q, k, v, **kw)
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    checks = check_backend(name, q, k, v, grad=grad, **kw)
    assert [c.name for c in checks][:4] == (["out", "dq", "dk", "dv"] if grad else ["out"])
    if grad and bias is not None and bias.requires_grad:
        assert checks[-1].name == "dbias"


def test_grid_is_not_all_skipped():
    """Every backend available on CPU runs at least a third of the grid there."""
    cases = grid("cpu")
    for name in list_backends():
        backend = get_backend(name)
        if "cpu" not in backend.caps:
            continue
        runnable = 0
        for case in cases:
            q, k, v, mask, bias = case.inputs()
            inp = validate(q.requires_grad_(), k, v, mask=mask, bias=bias, causal=case.causal, **case.options())
            runnable += not backend.reasons_unsupported(inp)
        assert runnable >= len(cases) // 3, f"{name} runs only {runnable} of {len(cases)} cases"


# torch.jit.trace (and the TorchScript ONNX exporter built on it)

_TRACE_SCRIPT = """
import sys, warnings, torch, attend
warnings.simplefilter("ignore")
q = torch.randn(2, 4, 5, 8); k = torch.randn(2, 2, 6, 8); v = torch.randn(2, 2, 6, 8)
m = torch.ones(2, 6, dtype=torch.bool); m[1, 4:] = False
for name in sys.argv[1:]:
    f = lambda q, k, v, m: attend.attention(q, k, v, mask=m, causal=True, backend=name)
    traced = torch.jit.trace(f, (q, k, v, m), check_trace=False)  # cold probes: the first call ever
    m2 = m.clone(); m2[0, 3:] = False
    for mask in (m, m2):
        torch.testing.assert_close(traced(q, k, v, mask), f(q, k, v, mask))
print("ok")
"""


def test_jit_trace_with_cold_probes_does_not_crash():
    """The SDPA dead-row probe calls backward; recorded by the tracer that segfaulted the process. Run
    in a fresh interpreter so the probes are cold (the first call is the traced one)."""
    import subprocess
    import sys

    names = [n for n in list_backends() if get_backend(n).caps_for(torch.device("cpu")) is not None]
    proc = subprocess.run(
        [sys.executable, "-c", _TRACE_SCRIPT, *names], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
