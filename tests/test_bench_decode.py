"""`attend bench --suite decode`: the hidden `decode-smoke` suite (the same rows with a 64-key cache) through the
CLI's own code path: rows, GB/s and % of the copy's bandwidth, floors and verdicts in the JSON and markdown; the
candidates compute the same attention and append in place; a row whose subject does not import is left out
with the reason; `--fail-on-floor`; the usage errors.

The tests that need `attend.kvcache` skip without it; the machinery is also run against a stand-in
`with_kvcache` (a plain reference written here), so it is tested either way.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from attend.bench.cases import DECODE_SUITES, HIDDEN_SUITES
from attend.bench.decode import COPY, SUBJECT, build
from attend.bench.report import compare
from attend.cli import main

SMOKE = "decode-smoke"
STANDIN = "attend_bench_decode_standin"

try:
    from attend.kvcache import with_kvcache  # noqa: F401

    NO_KVCACHE = None
except Exception as exc:  # noqa: BLE001 - another change is still writing it
    NO_KVCACHE = f"attend.kvcache.with_kvcache is not importable yet ({type(exc).__name__}: {exc})"
needs_kvcache = pytest.mark.skipif(NO_KVCACHE is not None, reason=str(NO_KVCACHE))

# helpers


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def reference_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None, causal=True, scale=None, sinks=None, **_
):
    """The API's meaning, spelled out row by row: append k, v at cache_seqlens[r] (in place, into the row's
    pages with a block table), then attend the first cache_seqlens[r] + i keys, causal bottom-right (with
    gpt-oss's sinks: one more logit per head in each softmax denominator, as its eager formula)."""
    b, h, i, _ = q.shape
    outs = []
    for r in range(b):
        n = int(cache_seqlens[r])
        if block_table is None:
            keys, values = k_cache[r], v_cache[r]  # (g, max_len, d) views
            if k is not None:
                keys[:, n : n + i], values[:, n : n + i] = k[r], v[r]
        else:
            bs = k_cache.shape[2]
            pages = block_table[r].long()
            if k is not None:
                for t in range(i):
                    p, o = divmod(n + t, bs)
                    k_cache[pages[p], :, o], v_cache[pages[p], :, o] = k[r, :, t], v[r, :, t]
            keys = k_cache[pages].transpose(0, 1).flatten(1, 2)  # (g, pages * bs, d)
            values = v_cache[pages].transpose(0, 1).flatten(1, 2)
        j = n + (i if k is not None else 0)
        keep = torch.ones(i, j, dtype=torch.bool, device=q.device)
        if causal:
            keep = keep.tril(j - i)
        if sinks is None:
            rep = h // keys.shape[0]  # k, v repeated to the query heads (enable_gqa's meaning; torch 2.4 lacks it)
            kj, vj = (x[None, :, :j].repeat_interleave(rep, 1) for x in (keys, values))
            outs.append(F.scaled_dot_product_attention(q[r : r + 1], kj, vj, attn_mask=keep, scale=scale))
            continue
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        kk, vv = (x[:, :j].repeat_interleave(h // x.shape[0], 0).to(acc) for x in (keys, values))
        s = (q[r].to(acc) @ kk.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)).masked_fill(~keep, float("-inf"))
        s = torch.cat([s, sinks.to(acc)[:, None, None].expand(h, i, 1)], -1)
        outs.append((s.softmax(-1)[..., :-1] @ vv).to(q.dtype)[None])
    return torch.cat(outs)


@pytest.fixture
def standin(monkeypatch):
    """The smoke suite's rows with their subject from the stand-in module (the real `attend.kvcache` untouched)."""
    module = types.ModuleType(STANDIN)
    module.with_kvcache = reference_with_kvcache
    monkeypatch.setitem(sys.modules, STANDIN, module)
    rows = [replace(c, needs=f"{STANDIN}:with_kvcache") for c in DECODE_SUITES[SMOKE]]
    monkeypatch.setitem(DECODE_SUITES, SMOKE, rows)
    return rows


def check_document(doc: dict, out: str, markdown: str) -> None:
    cases = DECODE_SUITES[SMOKE]
    assert doc["kind"] == "decode" and doc["suite"] == SMOKE and doc["command"].startswith("attend bench")
    assert doc["device"] == "cpu" and doc["threads"] == torch.get_num_threads() and "load_average" in doc
    assert doc["omitted"] == {}
    assert [(r["case"], r["dtype"]) for r in doc["rows"]] == [(c.name, str(c.dtype)[6:]) for c in cases]
    for row, case in zip(doc["rows"], cases):
        assert row["mode"] == "fwd" and row["subject"] == SUBJECT and row["skipped"] == {}
        assert row["shape"] == {"b": case.b, "h": 4, "g": 2, "i": 1, "j": 64, "d": 16, "e": 16}
        assert row["cache_bytes"] == 2 * case.b * 2 * 64 * 16 * case.dtype.itemsize
        assert list(row["results"]) == [SUBJECT, "attend:paged", "sdpa:gqa", "attend:sinks", COPY]
        copy = row["results"][COPY]
        assert copy["gb_s"] == pytest.approx(row["copy_bytes"] / copy["median_ms"] / 1e6) and copy["gb_s"] > 0
        for name, res in row["results"].items():
            assert res["error"] is None, (row["case"], name, res["error"])
            assert res["median_ms"] > 0 and res["runs"] >= 2 and res["note"]
            if name != COPY:
                assert res["gb_s"] == pytest.approx(row["cache_bytes"] / res["median_ms"] / 1e6)
                assert res["pct_copy"] == pytest.approx(100 * res["gb_s"] / copy["gb_s"])
                assert res["max_abs_diff"] < (1e-5 if case.dtype == torch.float32 else 2e-2), (row["case"], name)
        own = row["results"][SUBJECT]["median_ms"]
        for name in ("attend:paged", "sdpa:gqa"):
            assert row["speedup"][name] == pytest.approx(row["results"][name]["median_ms"] / own)
        assert [(f["what"], f["min"]) for f in row["floors"]] == list(case.floors)
        values = {
            "copy": row["results"][SUBJECT]["pct_copy"] / 100,
            "sdpa:gqa": row["speedup"]["sdpa:gqa"],
            "attend:paged": 1 / row["speedup"]["attend:paged"],
            "attend:sinks": 1 / row["speedup"]["attend:sinks"],
        }
        for f in row["floors"]:
            assert f["value"] == pytest.approx(values[f["what"]]) and f["pass"] == (f["value"] >= f["min"])
        assert row["pass"] == (all(f["pass"] for f in row["floors"]) if row["floors"] else None)
    assert any(r["floors"] for r in doc["rows"]) and not all(r["floors"] for r in doc["rows"])
    assert markdown.startswith("| case | shape | dtype | candidate | ms | GB/s | % copy |")
    for needle in (
        SUBJECT, "attend:paged", "sdpa:gqa", "attend:sinks", "copy", "≥ 50% copy", "≥ 2×", "speed ≥ 0.8×",
        "speed ≥ 0.9×", "load average",
    ):  # fmt: skip
        assert needle in markdown and needle in out, needle
    assert "PASS" in markdown or "FAIL" in markdown


def smoke_run(tmp_path) -> tuple[int, str, str, dict, str]:
    rc, out, err = run(
        "bench", "--suite", SMOKE, "--device", "cpu", "--min-time", "0.01",
        "--json", str(tmp_path / "d.json"), "--markdown", str(tmp_path / "d.md"),
    )  # fmt: skip
    assert rc == 0, err
    return rc, out, err, json.loads((tmp_path / "d.json").read_text()), (tmp_path / "d.md").read_text()


# tests


@needs_kvcache
def test_decode_smoke_rows_bandwidth_and_floors(tmp_path):
    _, out, _, doc, markdown = smoke_run(tmp_path)
    check_document(doc, out, markdown)


def test_decode_smoke_with_a_standin_subject(standin, tmp_path):
    """The suite's machinery on a plain reference `with_kvcache`, whether or not attend.kvcache exists yet;
    `--compare` matches rows by case and dtype and compares the subject's times."""
    _, out, _, doc, markdown = smoke_run(tmp_path)
    check_document(doc, out, markdown)
    slower = json.loads(json.dumps(doc))
    slower["rows"][1]["results"][SUBJECT]["median_ms"] *= 3
    assert [v for v, *_ in compare(doc, slower)] == ["SAME", "REGRESSED", "SAME", "SAME"]


def test_calls_rotate_through_enough_layers_to_leave_the_last_level_cache(standin, monkeypatch, tmp_path):
    """With `beyond_llc` (the real suite's rows), a row reads the next of enough layers' caches that together
    they are twice the last-level cache, and the copy's src is at least that cache (here a pretend 64 KiB)."""
    import attend.bench.decode as decode

    monkeypatch.setattr(decode, "llc_bytes", lambda device: 64 * 2**10)
    rows = [replace(c, beyond_llc=True) for c in standin if c.dtype == torch.float32]
    monkeypatch.setitem(DECODE_SUITES, SMOKE, rows)
    rc, _, err = run("bench", "--suite", SMOKE, "--min-time", "0.01", "--json", str(tmp_path / "l.json"))
    assert rc == 0, err
    doc = json.loads((tmp_path / "l.json").read_text())
    for row in doc["rows"]:  # 16 KiB (b=1) and 32 KiB (b=2) of cache a step
        assert row["layers"] == 2 * 64 * 2**10 // row["cache_bytes"] and row["llc_bytes"] == 64 * 2**10
        assert row["copy_bytes"] == 4 * 2**20  # copy_mb: already above the pretend cache
        for name in (SUBJECT, "attend:paged", "sdpa:gqa"):
            res = row["results"][name]
            assert f"one of {row['layers']} layers' caches a call" in res["note"] and res["max_abs_diff"] < 1e-5
    assert decode.layer_count(rows[0], 0) == 1 and decode.layer_count(replace(rows[0], beyond_llc=False), 2**30) == 1
    assert decode.layer_count(rows[0], 2**40) == decode.MAX_LAYERS


def test_rows_that_would_not_fit_are_left_out(standin, monkeypatch, tmp_path):
    import attend.bench.decode as decode

    monkeypatch.setattr(decode, "available_bytes", lambda device: 2**20)
    rc, out, err = run("bench", "--suite", SMOKE, "--min-time", "0.01", "--json", str(tmp_path / "m.json"))
    assert rc == 0, err
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["rows"] == [] and len(doc["omitted"]) == len(standin)
    assert all(why.startswith("needs ~8.0 MiB for its caches and the copy probe, 0.6 MiB free here (60% of available memory)")
               for why in doc["omitted"].values())  # fmt: skip


@pytest.mark.parametrize("kvcache", ["attend", "standin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_candidates_append_in_place_and_agree(request, kvcache, dtype):
    """One step: every candidate writes the step's key and value at slot j - 1 (the paged one into its
    shuffled pages) and returns the attention over all j keys: the same as a plain softmax over the cache."""
    if kvcache == "attend" and NO_KVCACHE:
        pytest.skip(NO_KVCACHE)
    case = next(c for c in DECODE_SUITES[SMOKE] if c.b == 2 and c.dtype == dtype)
    if kvcache == "standin":
        request.getfixturevalue("standin")
        case = replace(case, needs=f"{STANDIN}:with_kvcache")
    from attend.bench.decode import make_base

    base = make_base(case, "cpu")
    kc, vc = base.k_cache.clone(), base.v_cache.clone()
    kc[:, :, -1:], vc[:, :, -1:] = base.k, base.v
    r = case.h // case.g
    logits = base.q.float() @ kc.float().repeat_interleave(r, 1).transpose(-1, -2) / case.d**0.5
    want = logits.softmax(-1) @ vc.float().repeat_interleave(r, 1)

    built, skipped = build(case, "cpu", layers=3)
    assert skipped == {} and list(built) == [SUBJECT, "attend:paged", "sdpa:gqa", "attend:sinks"]
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for name, b in built.items():
        expected = want if b.expect is None else b.expect(want)  # sinks: sdpa's result rescaled (gpt-oss)
        if b.expect is not None:  # ... which must match the formula with the sink column
            sink = torch.randn(case.h, generator=torch.Generator().manual_seed(2))[None, :, None, None]
            full = torch.cat([logits, sink.expand(2, case.h, 1, 1)], -1).softmax(-1)[..., :-1]
            torch.testing.assert_close(expected, full @ vc.float().repeat_interleave(r, 1), **tol, msg=name)
        for _ in range(4):  # the same step again, on the 3 layers' caches in turn: the fill is not advanced
            got = b.call()
            assert got.shape == (2, case.h, 1, case.d) and got.dtype == dtype, name
            torch.testing.assert_close(got.float(), expected, **tol, msg=name)


def test_rows_left_out_and_fail_on_floor(standin, monkeypatch, tmp_path):
    """A row whose subject does not import is left out with the reason (the others run); a floor no
    candidate can reach fails the row, and --fail-on-floor turns that into exit code 1."""
    first, second = standin[0], standin[1]
    impossible = replace(first, floors=(("sdpa:gqa", 1e6), ("copy", 0.0)))
    missing = replace(second, needs="attend.no_such_module:with_kvcache")
    monkeypatch.setitem(DECODE_SUITES, SMOKE, [impossible, missing])
    argv = ["bench", "--suite", SMOKE, "--min-time", "0.01", "--json", str(tmp_path / "x.json")]
    rc, out, err = run(*argv)
    assert rc == 0, err  # floors are reported, not enforced, by default
    doc = json.loads((tmp_path / "x.json").read_text())
    assert [r["case"] for r in doc["rows"]] == [first.name] and doc["rows"][0]["pass"] is False
    assert [f["pass"] for f in doc["rows"][0]["floors"]] == [False, True]
    key = f"{second.name} {str(second.dtype)[6:]}"
    assert "attend.no_such_module.with_kvcache is not importable here" in doc["omitted"][key]
    assert f"{key}: left out" in out
    rc, out, _ = run(*argv, "--fail-on-floor")
    assert rc == 1 and f"1 row(s) below a floor: {first.name} {str(first.dtype)[6:]}" in out


def test_dtype_override_keeps_each_row_once(standin, tmp_path):
    rc, _, err = run(
        "bench", "--suite", SMOKE, "--dtype", "float64", "--min-time", "0.01", "--json", str(tmp_path / "y.json")
    )
    assert rc == 0, err
    doc = json.loads((tmp_path / "y.json").read_text())
    assert [(r["case"], r["dtype"]) for r in doc["rows"]] == [("b1-64", "float64"), ("b2-64", "float64")]
    assert doc["rows"][0]["floors"] and all(r["max_abs_diff"] < 1e-12 for r in doc["rows"][0]["results"].values()
                                            if r["max_abs_diff"] is not None)  # fmt: skip


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--plot", "x.png"], "--plot"),
        (["--backends", "sdpa:flash"], "--backends"),
        (["--mode", "fwdbwd"], "--mode fwdbwd"),
        (["--memory", "all"], "--memory all"),
    ],
)
def test_decode_usage_errors(argv, needle):
    rc, out, err = run("bench", "--suite", "decode", *argv)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and not out


def test_help_lists_the_decode_suite():
    rc, out, _ = run("bench", "--help")
    assert rc == 0 and "decode" in out and SMOKE in HIDDEN_SUITES and SMOKE not in out
    rc, _, err = run("bench", "--suite", "nope")
    assert rc == 2 and "decode" in err and SMOKE not in err
