"""The torch range `pyproject.toml` declares, proven: one nox session per torch release, the whole suite in each.

    pip install nox && nox -s tests                      # every torch below, one after another
    nox -s "tests(torch='2.4.1')"                        # one of them
    nox -s tests -- tests/test_compat.py -x              # arguments after -- go to pytest
    nox -s support_table                                 # README's table from docs/torch-matrix.json

Each session installs its torch and `.[test]` in one resolve, without the project's constraints file (and
without a machine-wide pip constraint, which would hide the newest release), runs the whole suite, and writes
its counts, time and install size into `docs/torch-matrix.json`. `newest` is whatever the package index
offers today, not a hard-coded number.

On a CPU machine the index's Linux wheels for torch 2.4 to 2.12 and 2.14 onward are CUDA builds: about
0.8 GB of torch plus 2.5 to 3.5 GB of NVIDIA libraries per session (docs/torch-matrix.json records each
venv's size and install time). They run on the CPU.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nox

ROOT = Path(__file__).parent
MATRIX = ROOT / "docs" / "torch-matrix.json"
TORCHES = [
    "2.4.1",  # the lowest pyproject.toml declares (torch>=2.4)
    "2.9.1",  # the middle of the range
    "2.13.0",  # CI's (constraints.txt)
    "newest",  # the newest release on the index
]

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def _size_mb(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            p = Path(dirpath, name)
            if not p.is_symlink():
                total += p.stat().st_size
    return round(total / 2**20)


def _counts(junit: Path) -> dict[str, int]:
    suite = ET.parse(junit).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    tests, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": tests - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped}


def _commit() -> str:
    """The commit the session tested, with "+changes" when the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        # (the matrix file itself, which the sessions before this one rewrote, is not a change to the code tested)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":!{MATRIX.relative_to(ROOT)}"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _record(torch_spec: str, entry: dict) -> None:
    data = json.loads(MATRIX.read_text()) if MATRIX.exists() else {"sessions": {}}
    data["sessions"][torch_spec] = entry
    MATRIX.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@nox.session
@nox.parametrize("torch", TORCHES)
def tests(session: nox.Session, torch: str) -> None:
    """The whole suite on one torch release (`newest`: the newest the index offers)."""
    session.env["PIP_CONSTRAINT"] = os.devnull  # neither constraints.txt nor a machine-wide cap
    session.env["ATTEND_TORCH_MATRIX"] = torch  # (the one test that reads this matrix's own record waits for it)
    spec = "torch" if torch == "newest" else f"torch=={torch}"
    start = time.perf_counter()
    session.install("--upgrade", spec, "-e", ".[test]")
    installed = time.perf_counter() - start
    version = session.run("python", "-c", "import torch; print(torch.__version__)", silent=True, log=False)
    if version is None:  # `nox --install-only`: the downloads, nothing run
        return
    version = version.strip().splitlines()[-1]
    features = session.run(
        "python", "-c", "import json, attend.features as f; print(json.dumps(f.missing()))", silent=True, log=False
    ).strip().splitlines()[-1]
    junit = Path(session.create_tmp()) / "junit.xml"
    start = time.perf_counter()
    failed = None
    try:
        session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *session.posargs)
    except nox.command.CommandFailed as err:
        failed = err
    ran = time.perf_counter() - start
    if not session.posargs and junit.exists():  # a partial run (arguments after --) is not the matrix's record
        _record(torch, {
            "torch": version,
            "date": datetime.date.today().isoformat(),
            "commit": _commit(),
            "result": "pass" if failed is None else "fail",
            **_counts(junit),
            "tests_s": round(ran),
            "install_s": round(installed),
            "venv_mb": _size_mb(Path(session.virtualenv.location)),
            "lacks": json.loads(features),
            "cpu_count": os.cpu_count(),
            "load_after": round(os.getloadavg()[0], 2),
        })  # fmt: skip
    if failed is not None:
        raise failed


@nox.session(venv_backend="none")
def support_table(session: nox.Session) -> None:
    """Rewrite README.md's torch support table and `attend.features.TESTED` from docs/torch-matrix.json."""
    session.run("python", str(ROOT / "docs" / "support_table.py"), external=True)
