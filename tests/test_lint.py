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
