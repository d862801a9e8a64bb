"""What this torch offers that attend uses, found by capability, never by version strings.

attend runs on every torch `pyproject.toml` declares (>= 2.4). Some of what it uses came late or is private to
PyTorch (and may change in any release): each such thing is a `Feature` here, registered by the module that
uses it, with a probe that says whether this torch has it and what attend does without it. `attend info`
lists them; a backend or option that needs a missing one is ineligible with `Feature.reason()` as its reason
(shown by `explain`). The support table in the README lists, for each torch in the tested matrix, what
`missing()` gave there (docs/torch-matrix.json, written by `nox -s tests`).

    >>> from attend import features
    >>> [f.name for f in features.registered() if not f.present()]      # [] on torch 2.13
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Feature", "register", "registered", "missing", "get", "torch_release", "tested_status", "TESTED"]


@dataclass(frozen=True)
class Feature:
    """One thing attend uses that not every torch in the declared range has.

    name: a short key (`sdpa_enable_gqa`); api: what torch must offer, as a user would look it up;
    since: the first torch release known to have it (for people; nothing compares it); without: what attend
    does on a torch that lacks it; present: the probe (cheap: it runs when asked)."""

    name: str
    api: str
    since: str
    without: str
    present: Callable[[], bool]

    def reason(self) -> str:
        """The ineligibility reason for what needs this feature, naming what this torch lacks."""
        return f"this torch ({torch.__version__}) has no {self.api}"


_REGISTRY: dict[str, Feature] = {}


def register(name: str, *, api: str, since: str, without: str, present: Callable[[], bool]) -> Feature:
    """Declare a feature (once per name, at the using module's import) and return it."""
    if name in _REGISTRY:
        raise ValueError(f"expected each torch feature to be registered once, got {name!r} twice")
    feature = _REGISTRY[name] = Feature(name, api, since, without, present)
    return feature


def registered() -> list[Feature]:
    """Every feature attend's modules declare (all of them: importing `attend.features` imports `attend`,
    whose modules register theirs at import), by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get(name: str) -> Feature:
    """The feature called `name`; a KeyError names the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"expected one of {sorted(_REGISTRY)}, got {name!r}") from None


def missing() -> list[str]:
    """The names of the features this torch lacks, sorted ([] on a torch that has them all)."""
    return [f.name for f in registered() if not f.present()]


# The torch releases the whole suite passed on, in the last matrix run: written from docs/torch-matrix.json by
# docs/support_table.py (a test keeps the two equal). `attend info` says whether the running torch is one of them.
TESTED: tuple[str, ...] = ("2.4.1", "2.9.1", "2.13.0", "2.15.0")


@functools.lru_cache(maxsize=None)
def torch_release(version: str | None = None) -> tuple[int, ...]:
    """(major, minor, patch) of a torch version string, local part and pre-release tags dropped:
    `2.13.0+cpu` -> (2, 13, 0). For telling a user where their torch sits in the tested matrix only."""
    text = torch.__version__ if version is None else version
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if found is None:
        return ()
    return tuple(int(x or 0) for x in found.groups())


def tested_status(version: str | None = None) -> str:
    """One line for `attend info`: is this torch one the matrix ran, and where does it sit if not."""
    here = torch_release(version)
    tested = sorted(torch_release(v) for v in TESTED)
    names = ", ".join(TESTED)
    if not tested:
        return "untested: no torch release passed the last matrix run (docs/torch-matrix.json)"
    if here in tested:
        return f"tested (the suite passed on {names}: docs/torch-matrix.json)"
    if here and here > tested[-1]:
        return f"newer than the newest tested ({TESTED[-1]}); the tested releases are {names}"
    if here and here < tested[0]:
        return f"older than the lowest tested ({TESTED[0]}); pyproject.toml declares torch>=2.4"
    return f"not in the tested matrix ({names}); it lies between two tested releases"
