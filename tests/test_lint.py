"""The linter (ruff) and the type checker (mypy) pass: run as tests so the README's test command covers them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> list[str]:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        pytest.fail(f"`{name}` is not installed: it is part of the `test` extra (pip install -e '.[test]')")
    return [exe]


@pytest.mark.parametrize(
    "cmd",
    [["ruff", "check", "src", "tests"], ["mypy"]],
    ids=["ruff", "mypy"],
)
def test_tool_passes(cmd):
    result = subprocess.run(_tool(cmd[0]) + cmd[1:], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"


def _modules_with_tensors() -> list[Path]:
    src = Path(__file__).resolve().parents[1] / "src" / "attend"
    return sorted(p for p in src.rglob("*.py") if p.name not in ("__main__.py", "_helpers.py") and p.stat().st_size > 0)


@pytest.mark.parametrize("path", _modules_with_tensors(), ids=lambda p: p.name)
def test_shape_legend_is_the_one_in_helpers(path):
    """The shape legend lives once, `attend._helpers.DIM_LEGEND`; a module docstring that states one states
    exactly that (a module may add its own letters after it, as `; here also r = h // g`)."""
    import ast

    from attend._helpers import DIM_LEGEND

    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    flat = " ".join(doc.split())
    if "legend" not in flat.lower():
        return
    assert f"Shape legend: {DIM_LEGEND}" in flat, f"{path.name}: its shape legend differs from DIM_LEGEND"


def test_every_module_that_shapes_tensors_states_the_legend():
    missing = []
    for path in _modules_with_tensors():
        text = path.read_text()
        if "(b, h, i, d)" in text and "Shape legend" not in text:
            missing.append(path.name)
    assert not missing, f"modules that name shapes without the legend: {missing}"
