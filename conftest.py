"""The documentation tests: pytest-markdown-docs runs every ```python block of README.md and docs/*.md
(`--markdown-docs` and `testpaths` in pyproject.toml; a fence marked `python notest` is skipped; a block whose
first line is `# requires: NAME` is skipped, with the reason, where NAME cannot run).

Each block runs as written, in a fresh namespace, in the pytest process. This fixture keeps one block's
process-wide state from reaching the next block or a later test: dynamo's compile caches are reset before it
(as a script starts with none; a block with `torch.compile(fullgraph=True)` would otherwise inherit every
earlier test's recompilations), the RNG is seeded as in tests/conftest.py, and `os.environ` is restored after
it (the context-parallel block sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for a world of one).
"""

from __future__ import annotations

import os

import pytest
import torch


def _requires(code: str) -> None:
    """A block whose first line is `# requires: NAME[, NAME]` runs only where each NAME can: a torch feature of
    `attend.features` this torch has, transformers with its PyTorch models (installed, and not disabled on this
    torch), or another importable module; skipped with the reason otherwise."""
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    if not first.startswith("# requires:"):
        return
    for name in (n.strip() for n in first.split(":", 1)[1].split(",")):
        from attend import features

        if name in {f.name for f in features.registered()}:  # a torch feature attend probes
            found = features.get(name)
            if not found.present():
                pytest.skip(found.reason())
        elif name == "transformers":
            from tests.helpers import transformers_or_skip

            transformers_or_skip()
        else:
            pytest.importorskip(name)


@pytest.fixture(autouse=True)
def _isolate_doc_block(request):
    if request.node.get_closest_marker("markdown-docs") is None:
        yield
        return
    _requires(getattr(request.node, "code", ""))
    torch._dynamo.reset()
    torch.manual_seed(0)
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)
