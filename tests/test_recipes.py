"""Every ```python block in docs/recipes.md runs as written, each in a fresh namespace.

A block whose first line is `# requires: NAME` is skipped when NAME cannot be imported.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    text = RECIPES.read_text()
    out: list[tuple[str, str]] = []
    for m in BLOCK.finditer(text):
        heading = re.findall(r"^## (.+)$", text[: m.start()], re.M)[-1]
        slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")[:40]
        out.append((f"{len(out)}-{slug}", m.group(1)))
    return out


BLOCKS = _blocks()


def test_recipes_have_code():
    assert len(BLOCKS) >= 7


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_recipe_runs(code, capsys):
    first = code.splitlines()[0]
    if first.startswith("# requires:"):
        for name in first.split(":", 1)[1].split(","):
            if importlib.util.find_spec(name.strip()) is None:
                pytest.skip(f"needs {name.strip()}")
    torch._dynamo.reset()
    exec(compile(code, str(RECIPES), "exec"), {"__name__": "__recipe__"})
