"""The command line: every command's happy path and error path, the JSON schema, the PNG, `--compare`.

Runs `attend.cli.main([...])` in-process with tiny shapes (the hidden `smoke` suite and check grid);
one test goes through `python -m attend` to prove the real entry point.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import attend
from attend import explain
from attend.bench.flops import attended_pairs, attention_flops
from attend.bench.report import REQUIRED_KEYS, RESULT_KEYS, ROW_KEYS
from attend.cli import main
from attend.inputs import validate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# helpers


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# info and explain


def test_info(capsys):
    rc, out, _ = run(capsys, "info")
    assert rc == 0
    assert torch.__version__ in out
    for name in ("einsum", "sdpa:flash", "sdpa:math"):
        assert name in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 5}
    assert "runs here on cpu" in rows["einsum"]
    if not torch.cuda.is_available():  # a CUDA-only kernel on a CPU-only machine is not "available"
        assert "not on this machine (needs cuda)" in rows["sdpa:efficient"]
        assert "available" not in rows["sdpa:efficient"]


def test_info_says_whether_this_torch_was_tested_and_what_it_lacks(capsys, monkeypatch):
    from attend import features
    from attend.backends import sdpa

    monkeypatch.setattr(sdpa, "flash_lse_op", None)  # as on a torch without PyTorch's CPU flash op
    monkeypatch.setattr(features, "TESTED", ("0.1.0",))
    rc, out, _ = run(capsys, "info")
    assert rc == 0
    text = " ".join(out.split())  # rich wraps long cells
    assert f"{torch.__version__}: newer than the newest tested (0.1.0)" in text
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") == 5}
    here = next(f.name for f in features.registered() if f.present())
    assert "missing" in rows["cpu_flash_lse"] and "yes" in rows[here]
    assert "return_lse and sinks on CPU run on chunked" in text


def test_explain_matches_python(capsys):
    q = torch.randn(2, 8, 33, 64, requires_grad=True)
    k = torch.randn(2, 2, 40, 64, requires_grad=True)
    v = torch.randn(2, 2, 40, 32, requires_grad=True)
    pad = torch.ones(2, 40, dtype=torch.bool)
    want = str(explain(q, k, v, mask=pad, causal=True))
    rc, out, _ = run(
        capsys, "explain", "--shape", "2,8,33,64", "--kv-heads", "2", "--kv-len", "40", "--v-dim", "32",
        "--dtype", "float32", "--device", "cpu", "--causal", "--mask", "padding", "--grad",
    )
    assert rc == 0
    assert out == want + "\n"


def test_explain_accepts_every_cli_hint(capsys):
    """`AttnInputs.cli_hint()` (printed by NoBackendError) must be a command the CLI accepts."""
    q = torch.randn(1, 4, 5, 16, requires_grad=True)
    kv = torch.randn(1, 2, 7, 16)
    docs = torch.tensor([[0, 0, 1, 1, 1, 2, 2]])
    for kwargs in (
        {"mask": torch.ones(1, 7, dtype=torch.bool)}, {"bias": torch.randn(1, 4, 5, 7)}, {"dropout_p": 0.25},
        {"window": (3, None), "score": "l2"},
    ):  # fmt: skip
        hint = validate(q, kv, kv, causal=True, **kwargs).cli_hint()
        rc, out, err = run(capsys, *hint.split()[1:])
        assert rc == 0, err
        assert "SELECTED" in out
    for structure in ({"documents": docs}, {"documents": docs, "window": (2, 2), "score": "l2"}):
        hint = validate(kv[:, :1].expand(1, 4, 7, 16), kv, kv, causal=True, **structure).cli_hint()
        assert "--documents 2,3,2" in hint
        rc, out, err = run(capsys, *hint.split()[1:])
        assert rc == 0, err
        assert "SELECTED" in out


@pytest.mark.parametrize("spelling", ["separate", "joined"])
def test_a_value_that_starts_with_minus_follows_its_flag(capsys, spelling):
    """`--scale -1e-05` and `--window -1,0` are a flag and its value, as `--scale=-1e-05` is (argparse alone reads
    a value starting with '-' that is not a plain number as the next flag: "expected one argument"). -1 is not
    unbounded in `--window` (attend's unbounded side is 'none'): the message says so."""

    def flag(name: str, value: str) -> list[str]:
        return [name, value] if spelling == "separate" else [f"{name}={value}"]

    q = k = v = torch.randn(1, 2, 8, 16)
    rc, out, err = run(capsys, "explain", "--shape", "1,2,8,16", "--device", "cpu", *flag("--scale", "-1e-05"))
    assert (rc, err) == (0, "")
    assert out == str(explain(q, k, v, scale=-1e-05)) + "\n"
    rc, out, err = run(capsys, "explain", "--shape", "1,2,8,16", "--causal", *flag("--window", "-1,4"), "--grad")
    assert (rc, out) == (2, "")
    assert err == (
        "attend explain: error: --window: expected `window` left to be an int >= 0 or 'none' (unbounded), got -1 "
        "in --window -1,4; hint: flash-attn's -1 (unbounded) is 'none' here: --window none,4\n"
    )
    rc, out, err = run(capsys, "explain", "--shape", "1,2,8,16", *flag("--window", "-3,-1"))
    assert "got -3 in --window -3,-1; hint: flash-attn's -1 (unbounded) is 'none' here: --window none,none\n" in err


# errors: one line on stderr, exit 2, no traceback


ERRORS = [
    (["explain", "--shape", "2,8,x"], "--shape"),
    (["explain", "--shape", "2,8,16"], "--shape"),
    (["explain"], "--shape"),
    (["explain", "--shape", "2,8,16,64", "--kv-heads", "3"], "h % g == 0"),
    (["explain", "--shape", "2,8,16,64", "--kv-heads", "0"], "--kv-heads"),
    (["explain", "--shape", "2,8,16,64", "--dropout", "1.5"], "dropout_p"),
    (["explain", "--shape", "2,8,16,64", "--dtype", "int8"], "--dtype"),
    (["explain", "--shape", "2,8,16,64", "--backend", "nope"], "backend"),
    (["explain", "--shape", "2,8,16,64", "--window", "4"], "--window LEFT,RIGHT"),
    (["explain", "--shape", "2,8,16,64", "--window", "a,b"], "--window LEFT,RIGHT"),
    (["explain", "--shape", "2,8,16,64", "--window=-1,0"], "expected `window` left"),
    (["explain", "--shape", "2,8,16,64", "--documents", "4,4"], "add up to the query and key length 16"),
    (["bench", "--backends", "sdpa:flash,nope"], "nope"),
    (["bench", "--suite", "nope"], "--suite"),
    (["bench", "--compare", "/nonexistent/old.json"], "old.json"),
    (["check", "--dtype", "float8"], "--dtype"),
    (["frobnicate"], "invalid choice"),
]
if not torch.cuda.is_available():
    ERRORS += [
        (["explain", "--shape", "1,2,3,4", "--device", "cuda"], "CUDA"),
        (["check", "--device", "cuda"], "CUDA"),
        (["bench", "--suite", "gpu", "--device", "cuda"], "CUDA"),
    ]


@pytest.mark.parametrize("argv, needle", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_error_is_one_line_exit_2(capsys, argv, needle):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("attend")
    assert needle in lines[0]


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "attend", "explain", "--shape", "1,2,3,x"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "--shape" in proc.stderr


def test_plot_without_matplotlib_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, _, err = run(capsys, "bench", "--suite", "smoke", "--device", "cpu", "--plot", str(tmp_path / "x.png"))
    assert rc == 2
    assert "matplotlib" in err and len(err.strip().splitlines()) == 1


# check


def test_check_happy_path(capsys):
    rc, out, _ = run(capsys, "check", "--grid", "smoke", "--device", "cpu", "--dtype", "float32,bfloat16")
    assert rc == 0
    assert " 0 failed" in out
    assert "sdpa:flash" in out and "ok" in out


def test_check_failure_exits_1(capsys, monkeypatch):
    import attend.testing

    def broken(name, *args, **kwargs):
        if name == "sdpa:math":
            raise AssertionError("sdpa:math does not match the float64 reference: out FAIL")
        return []

    monkeypatch.setattr(attend.testing, "check_backend", broken)
    rc, out, _ = run(capsys, "check", "--grid", "smoke", "--device", "cpu", "--dtype", "float32")
    assert rc == 1
    assert "FAIL" in out and "does not match" in out


# bench


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One smoke run writing JSON, markdown and PNG, compared against a doctored older run."""
    tmp = tmp_path_factory.mktemp("bench")
    old = {
        "schema": 1, "suite": "smoke", "device": "cpu", "device_name": "old machine", "torch": "0.0",
        "threads": 1, "date": "2020-01-01", "rows": [
            {"case": "S1", "mode": "fwd", "dtype": "float32", "results": {"attend": {"median_ms": 1e6}}},
        ],
    }
    (tmp / "old.json").write_text(json.dumps(old))
    argv = [
        "bench", "--suite", "smoke", "--device", "cpu", "--mode", "fwd", "--min-time", "0.01",
        "--json", str(tmp / "new.json"), "--plot", str(tmp / "new.png"), "--markdown", str(tmp / "new.md"),
        "--compare", str(tmp / "old.json"),
    ]
    import contextlib
    import io

    import attend.bench.harness

    out, err = io.StringIO(), io.StringIO()
    # a quiet machine in the file whatever the test machine's load: a busy one makes --compare INCONCLUSIVE
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
        mp.setattr(attend.bench.harness, "load_average", lambda: 0.5)
        rc = main(argv)
    return rc, out.getvalue(), tmp


def test_bench_happy_path(bench_run):
    rc, out, tmp = bench_run
    assert rc == 0
    for needle in ("S1", "S2", "auto picks", "× seed:einsum", "× seed:sdpa", "× sdpa:flash", "★"):
        assert needle in out
    assert "IMPROVED  S1 fwd float32" in out  # against the doctored old run
    assert "warning: device_name differs" in out
    assert (tmp / "new.md").read_text().startswith("| case | shape |")


def test_bench_json_schema(bench_run):
    _, _, tmp = bench_run
    doc = json.loads((tmp / "new.json").read_text())
    for key, typ in REQUIRED_KEYS.items():
        assert isinstance(doc[key], typ), key
    assert doc["device"] == "cpu" and doc["torch"] == torch.__version__ and doc["threads"] == torch.get_num_threads()
    assert doc["command"].startswith("attend bench --suite smoke")
    assert [r["case"] for r in doc["rows"]] == ["S1", "S2", "S3"]
    for row in doc["rows"]:
        for key, typ in ROW_KEYS.items():
            assert isinstance(row[key], typ), (row["case"], key)
        assert row["auto"] == "sdpa:flash"
        assert {"attend", "attend:unchecked", "seed:einsum", "seed:sdpa", "sdpa:flash", "sdpa:math"} <= set(
            row["results"]
        )
        assert "sdpa:efficient" in row["skipped"]  # CUDA only, with its reason
        for name, res in row["results"].items():
            assert set(RESULT_KEYS) <= set(res), name
            assert res["error"] is None, (name, res["error"])
            assert res["median_ms"] > 0 and res["gflops"] > 0 and res["runs"] >= 2
            assert res["peak_mb"] is None or res["peak_mb"] >= 0
        assert row["fastest"] in row["results"] and row["fastest"] != "attend:unchecked"  # a cost, not a kernel
        assert row["speedup"]["seed:einsum"] == pytest.approx(
            row["results"]["seed:einsum"]["median_ms"] / row["results"]["attend"]["median_ms"]
        )
    assert doc["rows"][1]["flops"] == attention_flops(doc["rows"][1]["shape"], True, "fwd")
    assert any(res["peak_mb"] is not None for res in doc["rows"][0]["results"].values())


def test_bench_plot_is_png(bench_run):
    _, _, tmp = bench_run
    data = (tmp / "new.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_compare_two_saved_files(bench_run, capsys, tmp_path):
    _, _, tmp = bench_run
    doc = json.loads((tmp / "new.json").read_text())
    doc["load_average"] = 0.5  # a quiet machine in every file: the busy-machine warning is tested on its own
    for row in doc["rows"]:  # a spread of 5 %: 2x is beyond it (the spread's own test: test_bench_runs.py)
        row["results"]["attend"]["spread"] = 0.05
    faster, slower = copy.deepcopy(doc), copy.deepcopy(doc)
    faster["rows"][0]["results"]["attend"]["median_ms"] /= 2
    slower["rows"][0]["results"]["attend"]["median_ms"] *= 2
    for name, d in (("base.json", doc), ("faster.json", faster), ("slower.json", slower)):
        (tmp_path / name).write_text(json.dumps(d))
    rc, out, _ = run(capsys, "bench", "--compare", str(tmp_path / "base.json"), str(tmp_path / "faster.json"))
    assert rc == 0
    assert out.splitlines()[0].startswith("IMPROVED  S1 fwd float32")
    assert "SAME      S2 fwd float32" in out
    rc, out, _ = run(capsys, "bench", "--compare", str(tmp_path / "base.json"), str(tmp_path / "slower.json"))
    assert rc == 0
    assert out.splitlines()[0].startswith("REGRESSED S1 fwd float32")


# FLOP counting


@pytest.mark.parametrize("i, j", [(5, 2), (2, 5), (1, 7), (7, 1), (129, 257), (129, 64), (48, 64)])
def test_causal_pairs_exact_when_unaligned(i, j):
    brute = sum(min(j, max(0, r + (j - i) + 1)) for r in range(i))
    assert attended_pairs(i, j, True) == brute


def test_flops_convention():
    shape = {"b": 2, "h": 8, "i": 1024, "j": 1024, "d": 64, "e": 64}
    fwd = 4 * 2 * 8 * 1024 * 1024 * 64
    assert attention_flops(shape, False, "fwd") == fwd
    assert attention_flops(shape, True, "fwd") == fwd / 2  # FA convention: halved, not i(i+1)/2
    assert attention_flops(shape, False, "fwdbwd") == 3.5 * fwd


# CUDA (skipped without a GPU; benchmarks/gpu_check.sh runs them)


@pytest.mark.gpu
def test_cuda_check_and_bench(capsys, tmp_path):
    rc, out, _ = run(capsys, "check", "--grid", "smoke", "--device", "cuda")
    assert rc == 0, out
    rc, out, _ = run(
        capsys, "bench", "--suite", "smoke", "--device", "cuda", "--min-time", "0.01", "--json", str(tmp_path / "g.json")
    )
    assert rc == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["device"] == "cuda" and "capability" in doc
    assert all("torch:sdpa" in r["results"] for r in doc["rows"])


def test_explain_with_a_named_backend_that_cannot_run_fails(capsys):
    """The report shows the named backend's reasons; the command says the named backend cannot run and exits 1."""
    rc, out, err = run(capsys, "explain", "--shape", "2,8,16,64", "--backend", "sdpa:efficient")
    assert rc == 1
    assert "device=cpu (supported: cuda)" in out
    assert "the named backend 'sdpa:efficient' cannot run these inputs" in out
    assert "backend 'sdpa:efficient' cannot run these inputs" in err


def test_python_error_hint_for_a_named_backend_reproduces_it(capsys):
    """The `Hint: attend explain ...` of a pinned backend's ValueError includes --backend, so it reproduces."""
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError) as info:
        attend.attention(q, q, q, dropout_p=0.1, backend="sdpa:flash")
    hint = str(info.value).rsplit("Hint: `", 1)[1].rstrip("`")
    assert "--backend sdpa:flash" in hint
    rc, out, _ = run(capsys, *hint.split()[1:])
    assert rc == 1 and "dropout_p=0.1 > 0" in out


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bench_rejects_a_negative_threshold(capsys, value):
    rc, _, err = run(capsys, "bench", "--suite", "smoke", "--threshold", value)
    assert rc == 2 and "--threshold" in err


def test_plot_without_memory_measurements_writes_a_png(capsys, tmp_path):
    """--no-memory --plot used to run the whole suite and then crash in matplotlib ("Data cannot be log-scaled")."""
    png = tmp_path / "out.png"
    rc, _, err = run(capsys, "bench", "--suite", "smoke", "--no-memory", "--min-time", "0.01", "--plot", str(png))
    assert rc == 0, err
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_compare_two_saved_runs_rejects_output_files_before_any_work(capsys, tmp_path):
    rc, _, err = run(capsys, "bench", "--compare", "a.json", "b.json", "--plot", str(tmp_path / "x.png"))
    assert rc == 2 and "--plot" in err and not (tmp_path / "x.png").exists()


def test_check_says_once_why_a_backend_cannot_run_and_fails_when_nothing_was_checked(capsys):
    if torch.cuda.is_available():
        pytest.skip("sdpa:efficient runs on this machine")
    rc, out, _ = run(capsys, "check", "--backends", "sdpa:efficient", "--grid", "smoke")
    assert rc == 1
    assert out.count("device=cpu (supported: cuda)") == 1
    assert "nothing checked for sdpa:efficient on cpu" in out


def test_bench_memory_for_attend_alone(capsys, tmp_path):
    """--memory attend (the quick suite's default) measures attend's peak only: the table's column, at a
    fraction of the cost of rerunning every candidate in the memory child."""
    out = tmp_path / "m.json"
    rc, _, err = run(capsys, "bench", "--suite", "smoke", "--memory", "attend", "--min-time", "0.01", "--json", str(out))
    assert rc == 0, err
    for row in json.loads(out.read_text())["rows"]:
        measured = {name for name, res in row["results"].items() if res["peak_mb"] is not None}
        assert measured <= {"attend"} and "attend" in measured


def test_bench_table_explains_the_matmul_column(bench_run):
    """The "% matmul" column is named in the caption: what the ceiling is and why it can be exceeded."""
    _, out, tmp = bench_run
    markdown = (tmp / "new.md").read_text()
    for text in (out, markdown):
        assert "% matmul: attend's GFLOP/s" in " ".join(text.split())


def test_compare_can_fail_on_regression_and_warns_about_a_busy_machine(capsys, bench_run):
    """Two saved runs, the newer one 3x slower on one row: REGRESSED, exit 0 by default, exit 1 with
    --fail-on-regression (for CI); a run made at load average >= 1.5 is flagged as noisy (above the CPU count
    the comparison is INCONCLUSIVE instead: test_bench_runs.py)."""
    _, _, tmp = bench_run
    new = json.loads((tmp / "new.json").read_text())
    new["cpu_count"] = 4
    old = copy.deepcopy(new)
    old["load_average"] = 2.5
    for res in old["rows"][0]["results"].values():
        if res["median_ms"] is not None:
            res["median_ms"] /= 3
    (tmp / "fast.json").write_text(json.dumps(old))
    (tmp / "new4.json").write_text(json.dumps(new))
    argv = ["bench", "--compare", str(tmp / "fast.json"), str(tmp / "new4.json")]
    rc, out, _ = run(capsys, *argv)
    assert rc == 0 and "REGRESSED" in out and "busy machine" in out
    rc, out, _ = run(capsys, *argv, "--fail-on-regression")
    assert rc == 1 and "regressed by more than 10%" in out
    rc, _, err = run(capsys, "bench", "--suite", "smoke", "--fail-on-regression")
    assert rc == 2 and "--compare" in err


def test_plot_of_unrelated_cases_draws_grouped_bars(tmp_path):
    """Cases that are no sweep are drawn as grouped bars (attend, direct SDPA, the seed), not joined by lines."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from attend.bench.report import save_plot

    row = {"mode": "fwd", "dtype": "float32", "causal": False, "mask": "none",
           "shape": {"b": 1, "h": 2, "g": 2, "i": 8, "j": 8, "d": 8, "e": 8}}
    results = {n: {"gflops": g, "peak_mb": 1.0} for n, g in (("attend", 3.0), ("seed:sdpa", 2.0), ("seed:einsum", 1.0))}
    doc = {"suite": "x", "device_name": "cpu", "torch": "t", "threads": 2, "date": "d",
           "rows": [dict(row, case="A", results=results), dict(row, case="B", mask="padding", results=results)]}
    drawn = []
    real = plt.Axes.bar
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Axes, "bar", lambda self, *a, **kw: drawn.append(kw.get("label")) or real(self, *a, **kw))
        mp.setattr(plt.Axes, "plot", lambda self, *a, **kw: pytest.fail("unrelated cases joined by a line"))
        save_plot(doc, tmp_path / "bars.png")
    assert set(drawn) == {"attend", "seed:sdpa", "seed:einsum"}
    assert (tmp_path / "bars.png").read_bytes()[:8] == PNG_MAGIC
