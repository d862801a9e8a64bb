"""`attend bench --load N`: N busy processes on the machine while the cases run (a dataloader, a second job).

Each one is a child interpreter spinning a pure-Python loop (`sys.executable -c ...`: no torch, no imports,
a few MB each). They are started before the first case and stopped, for sure, when the `busy` block ends,
however it ends (an exception, KeyboardInterrupt): terminate, wait, then kill. A child also stops by itself
when this process dies without stopping it (it checks its parent a few times a second), so no spinner
outlives a killed bench.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

__all__ = ["SPIN", "busy", "running"]

# spin until the parent goes away (the child is re-parented: its parent id changes)
SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(200000): pass\n"

_RUNNING: list[subprocess.Popen] = []


def running() -> list[subprocess.Popen]:
    """The busy processes started by `busy` that have not been stopped yet (for tests and reports)."""
    return [p for p in _RUNNING if p.poll() is None]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p in _RUNNING:
            _RUNNING.remove(p)


@contextlib.contextmanager
def busy(n: int) -> Iterator[list[subprocess.Popen]]:
    """Start `n` busy processes (none for n <= 0), yield them, stop them all when the block ends."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(max(0, n)):
            p = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", SPIN],  # isolated, no site: starts in a few ms
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(p)
            _RUNNING.append(p)
        yield procs
    finally:
        _stop(procs)
