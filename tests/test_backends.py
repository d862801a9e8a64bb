"""Registry-driven: every backend x every case of the grid, forward and dq, dk, dv, against the
float64 golden with earned tolerances. A case a backend cannot run is skipped with its own reasons."""

from __future__ import annotations

import pytest
import torch

from attend import get_backend, list_backends
from attend.inputs import validate
from attend.testing import check_backend

from .cases import grid
from .conftest import DEVICES

PARAMS = [
    pytest.param(name, case, id=case.id(name), marks=[pytest.mark.gpu] if case.device == "cuda" else [])
    for device in DEVICES
    for case in grid(device)
    for name in list_backends()
]


@pytest.mark.parametrize("name, case", PARAMS)
def test_backend_matches_reference(name, case):
    """Forward and backward; where the backend declares it cannot run the backward of a case it can run
    forward (CPU flash in half precision), the forward alone, so inference stays covered."""
    q, k, v, mask, bias = case.tensors()
    inp = validate(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask=mask, bias=bias, causal=case.causal)
    backend = get_backend(name)
    reasons = backend.reasons_unsupported(inp)
    grad = not reasons
    if reasons and (bias is None or not bias.requires_grad):
        with torch.no_grad():
            grad = False
            if not backend.reasons_unsupported(validate(q, k, v, mask=mask, bias=bias, causal=case.causal)):
                reasons = []
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    checks = check_backend(name, q, k, v, mask=mask, bias=bias, causal=case.causal, grad=grad)
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
            q, k, v, mask, bias = case.tensors()
            inp = validate(q.requires_grad_(), k, v, mask=mask, bias=bias, causal=case.causal)
            runnable += not backend.reasons_unsupported(inp)
        assert runnable >= len(cases) // 3, f"{name} runs only {runnable} of {len(cases)} cases"
