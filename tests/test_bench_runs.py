"""`attend bench` as a run that never loses its results and never cries wolf (issue 25), and `--load`:

* output paths are checked before the first case (also where `os.access` says yes to root: /proc);
* --json and --markdown are rewritten after every row (`complete` false), so a later error or an
  interrupt keeps what was measured;
* the cost is said before the first case; a GPU suite without a GPU, or a long CPU run without --yes, is
  refused; progress is one plain line per row when stderr is no terminal;
* `--load N` runs N busy processes during the rows and none after; `--suite contention` times each row quiet,
  then loaded, against the floor loaded ratio >= 0.8x quiet ratio;
* `--compare`: a regression must exceed the runs' spread; a busy run is INCONCLUSIVE (exit 3); files of
  different suites (or no row in common) are an error; older files without the new fields still compare.

Every run here is a hidden smoke suite with --no-memory and a tiny --min-time, or has its cases stubbed out.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

import attend.bench.contention as contention
import attend.bench.cost as cost
import attend.bench.harness as harness
import attend.bench.run as bench_run
from attend.bench import load
from attend.bench.cases import CONTENTION_SUITES, HIDDEN_SUITES
from attend.cli import EXIT_INCONCLUSIVE, main

FAST = ["--no-memory", "--min-time", "0.01"]

# helpers


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


class Started(Exception):
    """Raised by a stubbed `run_suite`: the command got past every check to the first case."""


def no_run(*_args, **_kwargs):
    raise Started


def doc(suite="smoke", rows=(("S1", 1.0, 0.02), ("S2", 2.0, 0.02)), **fields) -> dict:
    """A saved run: rows (case, attend's ms, spread), as `--json` writes them (the fields compare reads)."""
    out = {
        "schema": 1, "suite": suite, "device": "cpu", "device_name": "cpu", "torch": "t", "threads": 2,
        "cpu_count": 2, "date": "d", "load_average": 0.5, "load_average_end": 0.6,
        "rows": [
            {"case": c, "mode": "fwd", "dtype": "float32", "results": {"attend": {"median_ms": ms, "spread": sp}}}
            for c, ms, sp in rows
        ],
    }  # fmt: skip
    out.update(fields)
    return out


def save(tmp_path, name: str, d: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return str(path)


@pytest.fixture
def quiet_machine(monkeypatch):
    """Every run here records a 1-minute load average of 0.5: its verdicts do not depend on the test machine."""
    monkeypatch.setattr(harness, "load_average", lambda: 0.5)
    monkeypatch.setattr(contention, "load_average", lambda: 0.5)


# output paths, and results as they come


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_an_output_path_that_cannot_be_written_fails_before_the_first_case(monkeypatch, flag):
    """`--json /proc/nope/out.json` ran the whole quick suite (475 s) and then lost it in a traceback: root's
    `os.access` says /proc is writable. Now the folder is tried before any case."""
    pytest.importorskip("matplotlib") if flag == "--plot" else None
    monkeypatch.setattr(bench_run, "run_suite", no_run)
    rc, out, err = run("bench", "--suite", "quick", flag, "/proc/nope/out.json")
    assert rc == 2 and not out
    assert err.startswith(f"attend bench: error: expected {flag} in a folder that can be written, got ")
    assert "/proc/nope/out.json" in err and "hint:" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("stop", [RuntimeError("a later case broke"), KeyboardInterrupt()])
def test_rows_are_saved_as_they_come_and_kept_when_a_later_row_stops_the_run(monkeypatch, tmp_path, stop):
    real = bench_run._measure
    calls = []

    def measure(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 2:
            raise stop
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_run, "_measure", measure)
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["bench", "--suite", "smoke", "--mode", "fwd", *FAST, "--json", str(out_json), "--markdown", str(out_md)]
    if isinstance(stop, KeyboardInterrupt):
        rc, _, err = run(*argv)
        assert rc == 130 and "interrupted" in err
    else:
        with pytest.raises(RuntimeError, match="a later case broke"):
            run(*argv)
    saved = json.loads(out_json.read_text())
    assert saved["complete"] is False and [r["case"] for r in saved["rows"]] == ["S1"]
    assert saved["rows"][0]["results"]["attend"]["median_ms"] > 0
    assert saved["command"].startswith("attend bench --suite smoke")
    text = out_md.read_text()
    assert "| S1 |" in text and "| S2 |" not in text and "incomplete" in text


def test_a_finished_run_is_marked_complete_and_records_each_timings_spread(tmp_path):
    out_json = tmp_path / "r.json"
    rc, _, err = run("bench", "--suite", "smoke", "--mode", "fwd", *FAST, "--json", str(out_json))
    assert rc == 0, err
    saved = json.loads(out_json.read_text())
    assert saved["complete"] is True and [r["case"] for r in saved["rows"]] == ["S1", "S2", "S3"]
    assert saved["load"] == 0 and saved["cpu_count"] == os.cpu_count()
    for row in saved["rows"]:
        res = row["results"]["attend"]
        s = sorted(res["samples_ms"])
        assert res["spread"] is not None and 0 <= res["spread"] <= (s[-1] - s[0]) / res["median_ms"] + 1e-6


# what a run costs, said before it starts


def test_the_cost_is_said_before_the_first_case_and_progress_is_one_line_per_row(tmp_path):
    rc, _, err = run("bench", "--suite", "smoke", "--mode", "fwd", *FAST)
    assert rc == 0, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("attend bench --suite smoke on cpu: 3 rows, about ") and " s here" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["[1/3] S1 fwd float32", "[2/3] S2 fwd float32",
                                                        "[3/3] S3 fwd float32"]  # fmt: skip
    assert all(line.endswith(" s") for line in lines[1:])


def test_the_estimate_follows_what_the_timer_does():
    """Three candidates of 1/1024 s with min_time 1/8: a warm-up of 4 calls each, then 128 rounds of one call each."""
    t = 2.0**-10
    assert cost.timer_seconds([t] * 3, 2.0**-3) == pytest.approx(3 * 4 * t + 3 * 128 * t)
    # a call of 2 * min_time or more: one warm-up call and 2 samples
    assert cost.timer_seconds([1.0], 0.3) == pytest.approx(3.0)
    fixed = cost.Machine(flops_per_s=20e9, bytes_per_s=5e9)
    small = cost.estimate_seconds(harness.BenchConfig(suite="quick", memory="attend"), fixed)
    large = cost.estimate_seconds(harness.BenchConfig(suite="llm", memory="attend"), fixed)
    assert small[0] == 3 and large[0] == 7 and 10 < small[1] < 120 < 600 < large[1]


def test_the_default_suite_leaves_sdpa_math_out_unless_asked(monkeypatch, tmp_path):
    """The quick suite (the default run, under 60 s on 2 quiet cores) does not time SDPA's math path (0.3-0.7 s a
    call at its 4096 positions); --backends names it back. Here its rows are the smoke suite's first."""
    from attend.bench.cases import SUITES

    monkeypatch.setitem(SUITES, "quick", SUITES["smoke"][:1])
    path = tmp_path / "q.json"
    for extra, timed in (((), False), (("--backends", "sdpa:flash,sdpa:math"), True)):
        rc, _, err = run("bench", *FAST, "--json", str(path), *extra)
        assert rc == 0, err
        row = json.loads(path.read_text())["rows"][0]
        assert ("sdpa:math" in row["results"]) is timed and "sdpa:flash" in row["results"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_a_gpu_suite_without_a_gpu_is_refused_with_a_way_to_run_it_anyway(monkeypatch):
    monkeypatch.setattr(bench_run, "run_suite", no_run)
    rc, out, err = run("bench", "--suite", "gpu")
    assert rc == 2 and not out and len(err.strip().splitlines()) == 1
    assert "expected a CUDA device for --suite gpu" in err and "torch.cuda.is_available() is False" in err
    assert "hint: `--device cpu --yes` runs its shapes on the CPU anyway, about " in err


def test_a_long_cpu_run_needs_yes(monkeypatch):
    monkeypatch.setattr(cost, "calibrate", lambda *a, **k: cost.Machine(flops_per_s=20e9, bytes_per_s=5e9))
    monkeypatch.setattr(bench_run, "run_suite", no_run)
    rc, out, err = run("bench", "--suite", "llm", "--device", "cpu")
    assert rc == 2 and not out and len(err.strip().splitlines()) == 1
    assert "expected --yes to start a run of about " in err and "--suite llm on the CPU" in err
    with pytest.raises(Started):
        run("bench", "--suite", "llm", "--device", "cpu", "--yes")


# --load and the contention suite


def _spinning(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in "RS"


@pytest.mark.parametrize("fail", [False, True])
def test_load_runs_busy_processes_during_the_rows_and_none_after(monkeypatch, tmp_path, fail):
    real = bench_run._measure
    seen: list[list] = []

    def measure(*args, **kwargs):
        procs = load.running()
        seen.append(procs)
        assert all(p.poll() is None for p in procs)
        if os.path.isdir("/proc"):
            assert all(_spinning(p.pid) for p in procs)
        if fail and len(seen) == 2:
            raise RuntimeError("a later case broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_run, "_measure", measure)
    out_json = tmp_path / "l.json"
    argv = ["bench", "--suite", "smoke", "--mode", "fwd", *FAST, "--load", "2", "--json", str(out_json)]
    if fail:
        with pytest.raises(RuntimeError):
            run(*argv)
    else:
        rc, out, err = run(*argv)
        assert rc == 0, err
        assert "--load 2: 2 busy processes" in " ".join(out.split())  # the table's title
        assert "beside 2 busy processes" in err
    assert [len(procs) for procs in seen] == [2] * len(seen) and len(seen) == (2 if fail else 3)
    assert len({p.pid for procs in seen for p in procs}) == 2  # the same two for every row
    assert all(p.poll() is not None for procs in seen for p in procs) and load.running() == []
    saved = json.loads(out_json.read_text())
    assert saved["load"] == 2 and saved["cpu_count"] == os.cpu_count()
    assert saved["load_average"] is not None and saved["load_average_end"] is not None


def test_busy_stops_its_processes_when_the_block_raises():
    with pytest.raises(KeyboardInterrupt), load.busy(3) as procs:
        assert len(procs) == 3 and all(p.poll() is None for p in procs)
        raise KeyboardInterrupt
    assert all(p.poll() is not None for p in procs) and load.running() == []


@pytest.mark.parametrize("case", CONTENTION_SUITES["contention-smoke"], ids=lambda c: c.name)
def test_contention_candidates_compute_the_same_attention(case):
    """The baseline is the same attention: auto's causal + key padding equals SDPA given keep AND bottom-right
    causal as one bool mask, forward and gradients."""
    built = contention.build(case, "cpu", torch.float64)
    subject, baseline = built[case.subject], built[case.baseline]
    torch.testing.assert_close(subject.forward(), baseline.forward())
    if case.mode == "fwdbwd":
        for a, b in zip(subject.call(), baseline.call()):
            torch.testing.assert_close(a, b)
    if case.kind == "auto-train":
        keep = contention.keep_mask(case, "cpu")
        assert keep[0, :58].all() and not keep[0, 58:].any()  # the last ~10 % of 64 keys (6) padded


def test_contention_smoke_times_each_row_quiet_then_loaded(monkeypatch, tmp_path, quiet_machine):
    real = contention._timings
    phases = []

    def timings(case, cfg, status, phase):
        phases.append((case.name, phase, len(load.running())))
        return real(case, cfg, status, phase)

    monkeypatch.setattr(contention, "_timings", timings)
    monkeypatch.setattr(contention, "SETTLE_S", 0.0)
    out_json, out_md = tmp_path / "c.json", tmp_path / "c.md"
    rc, out, err = run(
        "bench", "--suite", "contention-smoke", "--load", "2", "--min-time", "0.02",
        "--json", str(out_json), "--markdown", str(out_md),
    )  # fmt: skip
    assert rc == 0, err
    assert phases == [("K1", "quiet", 0), ("K2", "quiet", 0), ("K1", "loaded", 2), ("K2", "loaded", 2)]
    saved = json.loads(out_json.read_text())
    assert saved["kind"] == "contention" and saved["load"] == 2 and saved["complete"] is True
    assert [r["case"] for r in saved["rows"]] == ["K1", "K2"]
    for row in saved["rows"]:
        for results in (row["results"], row["loaded"]):
            assert set(results) == {row["subject"], row["baseline"]}
        q, lo = (r[row["baseline"]]["median_ms"] / r[row["subject"]]["median_ms"] for r in (row["results"], row["loaded"]))  # fmt: skip
        assert row["ratio_quiet"] == pytest.approx(q) and row["ratio_loaded"] == pytest.approx(lo)
        assert row["retained"] == pytest.approx(lo / q) and row["floor"]["min"] == 0.8
        assert row["pass"] == (row["retained"] >= 0.8)
    assert "[4/4] K2 fwd+bwd float32 loaded" in err
    assert "loaded / quiet" in out and "| K1 | (1, 2, 64, 16) | fwd | attend:chunked | sdpa |" in out_md.read_text()


def _fake_timings(ratio_loaded: float):
    def timings(case, cfg, status, phase):
        own = 1.0 if phase == "quiet" else 1.0 / ratio_loaded
        return {case.subject: {"median_ms": own, "spread": 0.0, "error": None},
                case.baseline: {"median_ms": 1.0, "spread": 0.0, "error": None}}  # fmt: skip

    return timings


@pytest.mark.parametrize("ratio_loaded, verdict", [(0.5, "FAIL"), (0.9, "PASS")])
def test_contention_floor_and_fail_on_floor(monkeypatch, tmp_path, ratio_loaded, verdict):
    """Quiet ratio 1.0; a loaded ratio of 0.5 keeps half of it (FAIL against 0.8), 0.9 keeps 90 % (PASS).
    Without --load the suite starts two busy processes per core. A quiet pass on a machine already busy (load
    average above the CPU count) is flagged."""
    monkeypatch.setattr(contention, "_timings", _fake_timings(ratio_loaded))
    monkeypatch.setattr(harness, "load_average", lambda: 4.0 * os.cpu_count())
    monkeypatch.setattr(contention, "_warm_up", lambda cfg: None)
    monkeypatch.setattr(contention, "SETTLE_S", 0.0)
    busy = []
    monkeypatch.setattr(contention, "busy", lambda n: busy.append(n) or load.busy(0))
    path = tmp_path / "f.json"
    rc, out, _ = run("bench", "--suite", "contention-smoke", "--json", str(path))
    assert rc == 0 and busy == [2 * os.cpu_count()]
    saved = json.loads(path.read_text())
    assert saved["load"] == 2 * os.cpu_count() and saved["min_time_s"] == 2.0
    assert [r["pass"] for r in saved["rows"]] == [verdict == "PASS"] * 2
    assert [r["retained"] for r in saved["rows"]] == [pytest.approx(ratio_loaded)] * 2
    assert verdict in out and "warning: the quiet pass was not quiet" in " ".join(out.split())
    rc, out, _ = run("bench", "--suite", "contention-smoke", "--fail-on-floor")
    assert rc == (1 if verdict == "FAIL" else 0)
    if verdict == "FAIL":
        assert "2 row(s) below a floor: K1, K2" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--suite", "contention-smoke", "--load", "0"], "expected --load N >= 1"),
        (["--suite", "smoke", "--load", "-1"], "expected --load N >= 0"),
        (["--suite", "contention-smoke", "--mode", "fwd"], "--mode fwd"),
        (["--suite", "contention-smoke", "--backends", "chunked"], "--backends"),
    ],
)
def test_load_and_contention_usage_errors(monkeypatch, argv, needle):
    monkeypatch.setattr(bench_run, "run_suite", no_run)
    rc, out, err = run("bench", *argv)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and not out


def test_help_lists_the_contention_suite_and_load():
    rc, out, _ = run("bench", "--help")
    text = " ".join(out.split())
    assert rc == 0 and "contention" in text and "--load N" in text and "--yes" in text
    assert f"INCONCLUSIVE (exit {EXIT_INCONCLUSIVE})" in text
    assert "contention-smoke" in HIDDEN_SUITES and "contention-smoke" not in text
    rc, _, err = run("bench", "--suite", "nope")
    assert rc == 2 and "contention" in err and "contention-smoke" not in err


# --compare


def test_a_slowdown_within_the_runs_spread_is_no_regression(tmp_path):
    """Both runs' S1 times spread by 30 % (p75 - p25 over the median): 1.5x slower is within their 60 %, SAME;
    2x slower is beyond it, REGRESSED."""
    from attend.bench.report import compare

    before, after = doc(rows=[("S1", 1.0, 0.3), ("S2", 1.0, 0.3)]), doc(rows=[("S1", 1.5, 0.3), ("S2", 2.0, 0.3)])
    assert compare(before, after) == [("SAME", "S1 fwd float32", 1.0, 1.5), ("REGRESSED", "S2 fwd float32", 1.0, 2.0)]
    old, new = save(tmp_path, "old.json", before), save(tmp_path, "new.json", after)
    rc, out, _ = run("bench", "--compare", old, new, "--fail-on-regression")
    lines = out.splitlines()
    assert lines[0].startswith("SAME      S1 fwd float32") and "50% slower, within the runs' spread of 60%" in lines[0]
    assert lines[1].startswith("REGRESSED S2 fwd float32") and "spread 60%" in lines[1]
    assert rc == 1 and "1 row(s) regressed" in out


@pytest.mark.parametrize("which", ["old", "new"])
@pytest.mark.parametrize("fail", [False, True])
def test_a_busy_run_makes_the_comparison_inconclusive(tmp_path, which, fail):
    busy = {"load_average": 0.9, "load_average_end": 2.6}  # ends above its 2 CPUs
    old = doc(**(busy if which == "old" else {}))
    new = doc(rows=[("S1", 3.0, 0.02), ("S2", 2.0, 0.02)], **(busy if which == "new" else {}))
    argv = ["bench", "--compare", save(tmp_path, "old.json", old), save(tmp_path, "new.json", new)]
    rc, out, _ = run(*argv, *(["--fail-on-regression"] if fail else []))
    assert rc == EXIT_INCONCLUSIVE == 3
    text = " ".join(out.split())
    assert "REGRESSED S1" in text  # the rows are still shown
    busy_text = f"INCONCLUSIVE: the {which} run's 1-minute load average was 0.90 at the start and 2.60 at the end"
    assert f"{busy_text}, above its 2 CPUs" in text


def test_runs_of_different_suites_or_without_common_rows_are_an_error(tmp_path):
    smoke = save(tmp_path, "smoke.json", doc())
    quick = save(tmp_path, "quick.json", doc(suite="quick", rows=[("Q1", 1.0, 0.0)]))
    rc, out, err = run("bench", "--compare", smoke, quick)
    assert rc == 2 and not out
    assert "expected runs of the same suite, got smoke vs quick; hint:" in err
    other = doc()
    for row in other["rows"]:
        row["dtype"] = "bfloat16"
    rc, out, err = run("bench", "--compare", smoke, save(tmp_path, "bf16.json", other))
    assert rc == 2 and "with rows in common" in err and "got none in common" in err


def test_compare_with_a_file_of_another_suite_fails_before_the_first_case(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_run, "run_suite", no_run)
    quick = save(tmp_path, "quick.json", doc(suite="quick", rows=[("Q1", 1.0, 0.0)]))
    rc, _, err = run("bench", "--suite", "smoke", "--compare", quick)
    assert rc == 2 and "expected runs of the same suite, got quick vs smoke" in err


def test_an_older_file_without_spread_or_load_still_compares(tmp_path):
    """A file written before spread and load were recorded: its spread counts as 0 (and the lines say it is
    unknown), its load as unknown (no INCONCLUSIVE verdict from it)."""
    old = doc()
    for key in ("cpu_count", "load_average", "load_average_end"):
        del old[key]
    for row in old["rows"]:
        del row["results"]["attend"]["spread"]
    new = doc(rows=[("S1", 2.0, 0.02), ("S2", 2.0, 0.02)])
    rc, out, _ = run("bench", "--compare", save(tmp_path, "old.json", old), save(tmp_path, "new.json", new),
                     "--fail-on-regression")  # fmt: skip
    text = " ".join(out.split())
    assert rc == 1 and "REGRESSED S1 fwd float32" in text and "SAME S2 fwd float32" in text
    assert "the run-to-run spread is unknown for some rows of the old file" in text
    # its samples still give the spread where the file has them
    for row in old["rows"]:
        row["results"]["attend"]["samples_ms"] = [0.5, 1.0, 1.0, 1.5]
    rc, out, _ = run("bench", "--compare", save(tmp_path, "old.json", old), save(tmp_path, "new.json", new))
    assert rc == 0 and "spread is unknown" not in out and "spread 27%" in out
