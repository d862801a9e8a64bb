"""`attend bench --suite structured`: the hidden `structured-smoke` suite (the same rows at a few dozen
tokens) through the CLI's own code path: rows, ratios, floors and verdicts in the JSON and markdown; a row
whose feature does not import is left out with a note; `--fail-on-floor`; the candidates of a row compute
the same attention.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace

import pytest
import torch

from attend.bench.cases import HIDDEN_SUITES, STRUCTURED_SUITES
from attend.bench.report import compare
from attend.bench.structured import CANDIDATES, build
from attend.cli import main

SMOKE = "structured-smoke"
# baselines that are another attention on purpose (the work the subject replaces), not the same one
DIFFERENT = {"attend:causal", "attend:dot"}

# helpers


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def smoke_case(name: str):
    return next(c for c in STRUCTURED_SUITES[SMOKE] if c.name == name)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("structured")
    rc, out, err = run(
        "bench", "--suite", SMOKE, "--device", "cpu", "--min-time", "0.01",
        "--json", str(tmp / "s.json"), "--markdown", str(tmp / "s.md"),
    )
    return rc, out, err, tmp


# tests


def test_structured_smoke_rows_ratios_and_floors(smoke_run):
    rc, out, err, tmp = smoke_run
    assert rc == 0, err
    doc = json.loads((tmp / "s.json").read_text())
    assert doc["kind"] == "structured" and doc["suite"] == SMOKE and doc["command"].startswith("attend bench")
    assert doc["device"] == "cpu" and doc["threads"] == torch.get_num_threads() and "load_average" in doc
    expected = [c.name for c in STRUCTURED_SUITES[SMOKE] if c.name not in doc["omitted"]]
    assert [r["case"] for r in doc["rows"]] == expected and {"D1", "W1", "L1"} <= set(expected)
    for row in doc["rows"]:
        case = smoke_case(row["case"])
        assert row["mode"] == "fwdbwd" and row["dtype"] == "float32" and row["subject"] == case.subject
        assert list(row["results"]) == [case.subject, *case.baselines], row["skipped"]
        own = row["results"][case.subject]["median_ms"]
        for name, res in row["results"].items():
            assert res["error"] is None, (row["case"], name, res["error"])
            assert res["median_ms"] > 0 and res["runs"] >= 2 and res["note"]
        for name in case.baselines:
            assert row["speedup"][name] == pytest.approx(row["results"][name]["median_ms"] / own)
        assert [(f["baseline"], f["min"]) for f in row["floors"]] == list(case.floors)
        for f in row["floors"]:
            assert f["ratio"] == row["speedup"][f["baseline"]] and f["pass"] == (f["ratio"] >= f["min"])
        assert row["pass"] == all(f["pass"] for f in row["floors"]) and (
            row["memory_floor"] is None or row["memory_floor"]["pass"] is not None
        )
    d1 = doc["rows"][0]
    assert d1["case"] == "D1" and 0 <= d1["memory_floor"]["peak_mb"] < 2048  # the subject's, from the memory child
    assert d1["results"]["attend:padded"]["peak_mb"] is None  # --memory defaults to the subject alone here
    markdown = (tmp / "s.md").read_text()
    assert markdown.startswith("| case | shape | pass | candidate |")
    for needle in ("attend:documents", "sdpa:dense-mask", "gigagan:einsum", "≥ 1.8×", "< 2048 MB", "load average"):
        assert needle in markdown and needle in out
    assert "PASS" in markdown or "FAIL" in markdown


def test_structured_rows_compare_with_their_subject(smoke_run):
    _, _, _, tmp = smoke_run
    doc = json.loads((tmp / "s.json").read_text())
    slower = json.loads(json.dumps(doc))
    slower["rows"][0]["results"][slower["rows"][0]["subject"]]["median_ms"] *= 3
    verdicts = [v for v, *_ in compare(doc, slower)]
    assert verdicts[0] == "REGRESSED" and set(verdicts[1:]) == {"SAME"}


@pytest.mark.parametrize("case", STRUCTURED_SUITES[SMOKE], ids=lambda c: c.name)
def test_candidates_compute_the_same_attention(case):
    """A row's candidates are formulations of one attention (packed, padded, dense mask, varlen, gigagan's
    einsum): same outputs on the same tokens, in the row's common layout."""
    built, skipped = build(case, "fwd", "cpu", torch.float64)
    if case.subject not in built:
        pytest.skip(f"{case.subject}: {skipped[case.subject]}")
    want = built[case.subject].forward()
    for name, b in built.items():
        if name not in DIFFERENT:
            torch.testing.assert_close(b.forward(), want, msg=f"{case.name}: {name} vs {case.subject}")
    assert set(built) | set(skipped) == {case.subject, *case.baselines} <= set(CANDIDATES[case.kind])


def test_a_row_whose_feature_does_not_import_is_left_out_and_fail_on_floor(monkeypatch, tmp_path):
    impossible = replace(smoke_case("L1"), floors=(("attend:dot", 1e6),))
    missing = replace(smoke_case("V1"), needs="attend.no_such_module:varlen_attn")
    monkeypatch.setitem(STRUCTURED_SUITES, SMOKE, [impossible, missing])
    argv = ["bench", "--suite", SMOKE, "--no-memory", "--min-time", "0.01", "--json", str(tmp_path / "x.json")]
    rc, out, err = run(*argv)
    assert rc == 0, err  # floors are reported, not enforced, by default
    doc = json.loads((tmp_path / "x.json").read_text())
    assert [r["case"] for r in doc["rows"]] == ["L1"] and doc["rows"][0]["pass"] is False
    assert "attend.no_such_module.varlen_attn is not importable here" in doc["omitted"]["V1"]
    assert "V1: left out" in out
    rc, out, _ = run(*argv, "--fail-on-floor")
    assert rc == 1 and "1 row(s) below a floor: L1" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--suite", "structured", "--plot", "x.png"], "--plot"),
        (["--suite", "structured", "--backends", "sdpa:flash"], "--backends"),
        (["--suite", "smoke", "--fail-on-floor"], "--fail-on-floor"),
    ],
)
def test_structured_usage_errors(argv, needle):
    rc, out, err = run("bench", *argv)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and not out


def test_help_lists_the_structured_suite():
    rc, out, _ = run("bench", "--help")
    assert rc == 0 and "structured" in out and "--fail-on-floor" in out
    assert SMOKE in HIDDEN_SUITES and SMOKE not in out
    rc, _, err = run("bench", "--suite", "nope")
    assert rc == 2 and "structured" in err and SMOKE not in err
