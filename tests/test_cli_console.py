"""The `attend` console script as a user runs it: a subprocess per command, checking the exit code and what it
prints (tests/test_cli.py drives `attend.cli.main` in-process for the rest). One test per item of the "first
ten minutes" issue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the console script installed beside this interpreter (pip install -e .), else `python -m attend`
_SCRIPT = shutil.which("attend", path=os.path.dirname(sys.executable))
_COMMAND = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "attend"]
_CPU_ONLY = not torch.cuda.is_available()


def attend(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")  # rich wraps tables at the terminal's width
    return subprocess.run([*_COMMAND, *argv], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def test_import_prints_no_numpy_warning():
    proc = subprocess.run(
        [sys.executable, "-c", "import torch, attend; attend.attention(*(torch.randn(1, 2, 4, 8),) * 3)"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "NumPy" not in proc.stderr


@pytest.mark.skipif(not _CPU_ONLY, reason="checks how a CUDA-only kernel reads on a CPU-only machine")
def test_info_says_what_runs_on_this_machine():
    proc = attend("info")
    assert proc.returncode == 0, proc.stderr
    efficient = next(line for line in proc.stdout.splitlines() if "sdpa:efficient" in line)
    assert "not on this machine (needs cuda)" in efficient and "available" not in efficient


def test_explain_with_a_named_backend_that_cannot_run_exits_nonzero():
    proc = attend("explain", "--shape", "2,8,16,64", "--backend", "sdpa:efficient" if _CPU_ONLY else "sdpa:flash",
                  *([] if _CPU_ONLY else ["--dtype", "float32"]))  # fmt: skip
    assert proc.returncode == 1
    assert "cannot run these inputs" in proc.stdout and "cannot run these inputs" in proc.stderr


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["bench", "--threshold", "-1"], "--threshold"),
        (["bench", "--compare", "a.json", "b.json", "--plot", "x.png"], "--plot"),
        (["bench", "--fail-on-regression"], "--compare"),
        (["bench", "--json", "/etc/hostname/out.json"], "--json"),
        (["bench", "--markdown", "."], "--markdown"),
    ],
    ids=["negative-threshold", "plot-with-two-saved-runs", "fail-on-regression-alone", "json-under-a-file", "md-a-folder"],
)
def test_bad_option_combinations_fail_before_any_work(argv, needle):
    """Exit 2 with one line naming the option, at once (the suite never starts: no table is printed)."""
    proc = attend(*argv, timeout=60)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert "auto picks" not in proc.stdout


def test_no_memory_plot_writes_a_png(tmp_path):
    png = tmp_path / "p.png"
    proc = attend("bench", "--suite", "smoke", "--no-memory", "--min-time", "0.01", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_compare_fails_on_regression_when_asked(tmp_path):
    new = tmp_path / "new.json"
    proc = attend("bench", "--suite", "smoke", "--no-memory", "--min-time", "0.01", "--json", str(new))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(new.read_text())
    for res in doc["rows"][0]["results"].values():
        if res["median_ms"] is not None:
            res["median_ms"] /= 3  # the "old" run was 3x faster on S1
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    plain = attend("bench", "--compare", str(old), str(new))
    strict = attend("bench", "--compare", str(old), str(new), "--fail-on-regression")
    assert plain.returncode == 0 and "REGRESSED" in plain.stdout
    assert strict.returncode == 1 and "regressed by more than 10%" in strict.stdout


def test_bench_table_caption_explains_the_matmul_column():
    proc = attend("bench", "--suite", "smoke", "--no-memory", "--min-time", "0.01")
    assert proc.returncode == 0, proc.stderr
    assert "% matmul: attend's GFLOP/s over the unfused pair" in " ".join(proc.stdout.split())


@pytest.mark.skipif(not _CPU_ONLY, reason="sdpa:efficient runs where CUDA is")
def test_check_says_why_once_and_fails_when_nothing_was_checked():
    proc = attend("check", "--backends", "sdpa:efficient", "--grid", "smoke")
    assert proc.returncode == 1
    assert proc.stdout.count("device=cpu (supported: cuda)") == 1


def test_attend_flash_rule_is_symmetric():
    from attend import Attend

    with pytest.raises(ValueError, match="expected a fused backend with flash=True"):
        Attend(flash=True, backend="einsum")
    with pytest.raises(ValueError, match="expected either flash=False"):
        Attend(flash=False, backend="sdpa:flash")
    assert Attend(flash=True, backend="sdpa:flash").backend == "sdpa:flash"


def test_recipes_page_states_its_timing():
    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    assert "a second or two" not in text and "1-2 s" in text
