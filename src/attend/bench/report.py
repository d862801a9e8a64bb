"""Reports of a benchmark run: a `rich` table, JSON, a markdown table, a PNG plot, and a comparison.

The document is the dict `run_suite` returns (its fields: `harness.run_rows`; a row's: its suite's module); rows
are keyed by (case, mode, dtype) when two documents are compared.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable
from pathlib import Path

from rich.table import Table
from rich.text import Text

from ..testing import case_flags

__all__ = [
    "REQUIRED_KEYS",
    "ROW_KEYS",
    "RESULT_KEYS",
    "rich_table",
    "markdown_table",
    "save_json",
    "load_json",
    "save_plot",
    "compare",
    "compare_rows",
    "compare_lines",
    "comparable",
    "busy_runs",
    "load_text",
]

REQUIRED_KEYS = {
    "schema": int,
    "suite": str,
    "device": str,
    "device_name": str,
    "torch": str,
    "threads": int,
    "date": str,
    "rows": list,
}
ROW_KEYS = {
    "case": str,
    "label": str,
    "mode": str,
    "dtype": str,
    "shape": dict,
    "causal": bool,
    "mask": str,
    "flops": float,
    "results": dict,
    "speedup": dict,
}
RESULT_KEYS = ("median_ms", "gflops", "pct_matmul", "peak_mb", "runs", "error")
STAR = "★"

# helpers


def _ratio_columns(rows: list[dict]) -> list[str]:
    """Candidates every ratio column is about: attend without its NaN/inf check, the seed's, then the
    SDPA variants, in a fixed order."""
    seen = {n for r in rows for n in r["results"] if n != "attend"}
    first = [n for n in ("attend:unchecked", "attend:module", "seed:einsum", "seed:sdpa", "torch:sdpa") if n in seen]
    rest = sorted(n for n in seen if n not in first)
    return first + rest


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _mode(row: dict) -> str:
    return "fwd+bwd" if row["mode"] == "fwdbwd" else row["mode"]


def _cells(row: dict, ratio_cols: list[str]) -> list[str]:
    res = row["results"]
    own = res["attend"]
    fastest = row.get("fastest")
    ms = _fmt(own["median_ms"], ".2f") if own["error"] is None else own["error"]
    if fastest == "attend":
        ms += " " + STAR
    cells = [
        row["case"],
        row["label"],
        row["dtype"],
        _mode(row),
        str(row.get("auto")),
        ms,
        _fmt(own["gflops"], ".1f"),
        _fmt(own["pct_matmul"], ".0f"),
        _fmt(own["peak_mb"], ".1f"),
    ]
    for n in ratio_cols:
        if n not in res:
            cells.append("")
            continue
        if res[n]["error"] is not None:
            cells.append("error")
            continue
        x = row["speedup"].get(n)
        cell = _fmt(x, ".2f") + ("×" if x is not None else "")
        cells.append(cell + (" " + STAR if n == fastest else ""))
    return cells


HEADERS = ["case", "shape", "dtype", "pass", "auto picks", "attend ms", "GFLOP/s", "% matmul", "peak MB"]
# What the table's reader needs to read it: the ratio columns, and what "% matmul" is a percentage of
CAPTION = (
    "×: that candidate's time / attend's (above 1: attend is faster); ★ fastest. % matmul: attend's GFLOP/s "
    "over the unfused pair q @ k^T then p @ v at this shape, timed in the same run; above 100 % the fused "
    "kernel wins because the pair writes the whole (i, j) product to memory."
)



def load_text(doc: dict) -> str:
    """The run's load in a few words: the 1-minute load average at the start and end on so many CPUs, and
    the busy processes `--load N` started ("" when the file records none of it: an older run)."""
    start, end, cpus, n = (doc.get(k) for k in ("load_average", "load_average_end", "cpu_count", "load"))
    parts = []
    if start is not None:
        shown = f"{start:.2f}" + ("" if end is None else f" → {end:.2f}")
        parts.append(f"load average {shown}" + ("" if cpus is None else f" on {cpus} CPUs"))
    if n:
        parts.append(f"--load {n}: {n} busy processes")
    return ", ".join(parts)


def _title(doc: dict) -> str:
    load = load_text(doc)
    partial = "" if doc.get("complete", True) else "  ·  INCOMPLETE: the rows measured so far"
    return (
        f"attend bench --suite {doc['suite']}  ·  {doc['device_name']} ({doc['device']}), "
        f"torch {doc['torch']}, {doc['threads']} threads, {doc['date']}" + (f"  ·  {load}" if load else "") + partial
    )


# a structured suite (bench/structured.py): one line per candidate of a row, the subject first

STRUCTURED_HEADERS = ["case", "shape", "pass", "candidate", "ms", "×", "floor", "verdict", "peak MB", "work"]
STRUCTURED_CAPTION = (
    "Each row: different formulations of the same attention on the same tokens, timed interleaved in one run "
    "(median). ×: that baseline's time / the subject's (above 1: the subject is faster); floor: the least × "
    "the issue accepts; peak MB: peak memory above the inputs of one pass (CPU: RSS, in a child process), "
    "the subject's unless --memory all, its floor in the verdict."
)


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else "PASS" if ok else "FAIL"


def _structured_lines(doc: dict) -> list[list[str]]:
    lines = []
    for row in doc["rows"]:
        floors = {f["baseline"]: f for f in row["floors"]}
        mem = row.get("memory_floor")
        subject = row["subject"]
        for k, (name, res) in enumerate(row["results"].items()):
            ms = res["error"] if res["error"] is not None else _fmt(res["median_ms"], ".1f")
            peak = _fmt(res["peak_mb"], ".1f")
            ratio, floor, verdict = "", "", ""
            if name == subject:
                ratio = "subject"
                if mem is not None:
                    floor, verdict = f"< {mem['max_mb']:.0f} MB", _verdict(mem["pass"])
            else:
                x = row["speedup"].get(name)
                ratio = _fmt(x, ".2f") + ("×" if x is not None else "")
                if name in floors:
                    floor, verdict = f"≥ {floors[name]['min']:g}×", _verdict(floors[name]["pass"])
            head = [row["case"], row["label"], _mode(row)] if k == 0 else [row["case"], "", ""]
            lines.append(head + [name, ms, ratio, floor, verdict, peak, res.get("note", "")])
        for name, why in row.get("skipped", {}).items():
            lines.append([row["case"], "", "", name, "left out", "", "", "", "", why])
    return lines


def _structured_notes(doc: dict) -> list[str]:
    notes = [f"{case}: left out: {why}" for case, why in doc.get("omitted", {}).items()]
    if doc.get("load_average") is not None:
        end = doc.get("load_average_end")
        at_end = "" if end is None else f", at the end: {end:.2f}"
        cpus = doc.get("cpu_count")
        notes.append(f"1-minute load average at the start: {doc['load_average']:.2f}{at_end} ({cpus} CPUs)")
    return notes


def _structured_rich_table(doc: dict) -> Table:
    caption = " ".join([STRUCTURED_CAPTION, *_structured_notes(doc)])
    table = Table(title=_title(doc), caption=caption)
    for h in STRUCTURED_HEADERS:
        table.add_column(h, justify="right" if h in ("ms", "×", "floor", "peak MB") else "left")
    for cells in _structured_lines(doc):
        style = {"PASS": "bold green", "FAIL": "bold red"}.get(cells[7], "")
        bold = "bold" if cells[5] == "subject" else ""
        table.add_row(*[Text(c, style=style if i == 7 else bold if i == 3 else "") for i, c in enumerate(cells)])
    return table


def _structured_markdown(doc: dict) -> str:
    lines = ["| " + " | ".join(STRUCTURED_HEADERS) + " |", "|" + "|".join("---" for _ in STRUCTURED_HEADERS) + "|"]
    for cells in _structured_lines(doc):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    env = (
        f"{doc['device_name']} ({doc['device']}), torch {doc['torch']}, {doc['threads']} threads, {doc['date']}"
    )
    return "\n".join(lines + ["", STRUCTURED_CAPTION, "", *[f"* {n}" for n in [env, *_structured_notes(doc)]]])


# a decode suite (bench/decode.py): one line per candidate of a row, the subject first, the copy probe last

DECODE_HEADERS = [
    "case", "shape", "dtype", "candidate", "ms", "GB/s", "% copy", "×", "floor", "verdict", "max Δ", "work",
]  # fmt: skip
DECODE_CAPTION = (
    "One decoding step (i = 1, no grad) against a cache of j keys: each candidate appends the step's key and value "
    "at slot j - 1 in place and attends all j, each call on the next of enough layers' caches to outgrow the "
    "last-level cache (the JSON's `layers`). GB/s: the cache bytes read (2 * b * g * j * d * itemsize) / the "
    "median time; copy: dst.copy_(src) timed in the same interleaved rounds, its GB/s the bytes it reads; % copy: "
    "GB/s over the copy's. ×: that candidate's time / the subject's (above 1: the subject is faster); floor: the "
    "issue's (% copy for the subject, × for sdpa:gqa, speed as a fraction of the contiguous cache for "
    "attend:paged), the measured value in the verdict; max Δ: largest absolute difference from sdpa:gqa's output."
)
FLOOR_TEXT = {"copy": "≥ {:.0%} copy", "attend:paged": "speed ≥ {:g}×", "attend:sinks": "speed ≥ {:g}×"}


def _floor_cells(f: dict) -> tuple[str, str]:
    text = FLOOR_TEXT.get(f["what"], "≥ {:g}×").format(f["min"])
    value = f["value"]
    shown = "" if value is None else f" ({value:.0%})" if f["what"] == "copy" else f" ({value:.2f}×)"
    return text, _verdict(f["pass"]) + shown


def _decode_lines(doc: dict) -> list[list[str]]:
    lines = []
    for row in doc["rows"]:
        floors = {f["candidate"]: f for f in row["floors"]}
        subject = row["subject"]
        for k, (name, res) in enumerate(row["results"].items()):
            ms = res["error"] if res["error"] is not None else _fmt(res["median_ms"], ".3f")
            ratio = ""
            if name == subject:
                ratio = "subject"
            elif name in row["speedup"]:
                ratio = f"{row['speedup'][name]:.2f}×"
            floor, verdict = _floor_cells(floors[name]) if name in floors else ("", "")
            diff = res.get("max_abs_diff")
            head = [row["case"], row["label"], row["dtype"]] if k == 0 else [row["case"], "", ""]
            lines.append(
                head
                + [name, ms, _fmt(res["gb_s"], ".1f"), _fmt(res["pct_copy"], ".0f"), ratio, floor, verdict]
                + ["" if diff is None else f"{diff:.1e}", res.get("note", "")]
            )
        for name, why in row.get("skipped", {}).items():
            lines.append([row["case"], "", "", name, "left out", "", "", "", "", "", "", why])
    return lines


def _decode_rich_table(doc: dict) -> Table:
    caption = " ".join([DECODE_CAPTION, *_structured_notes(doc)])
    table = Table(title=_title(doc), caption=caption)
    for h in DECODE_HEADERS:
        table.add_column(h, justify="right" if h in ("ms", "GB/s", "% copy", "×", "floor", "max Δ") else "left")
    for cells in _decode_lines(doc):
        style = {"PASS": "bold green", "FAIL": "bold red"}.get(cells[9].split(" ")[0], "")
        bold = "bold" if cells[7] == "subject" else ""
        table.add_row(*[Text(c, style=style if i == 9 else bold if i == 3 else "") for i, c in enumerate(cells)])
    return table


def _decode_markdown(doc: dict) -> str:
    lines = ["| " + " | ".join(DECODE_HEADERS) + " |", "|" + "|".join("---" for _ in DECODE_HEADERS) + "|"]
    for cells in _decode_lines(doc):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    env = f"{doc['device_name']} ({doc['device']}), torch {doc['torch']}, {doc['threads']} threads, {doc['date']}"
    return "\n".join(lines + ["", DECODE_CAPTION, "", *[f"* {n}" for n in [env, *_structured_notes(doc)]]])


# a contention suite (bench/contention.py): one line per row, its quiet and its loaded pass side by side

CONTENTION_HEADERS = [
    "case", "shape", "pass", "subject", "baseline", "quiet ms", "× quiet", "loaded ms", "× loaded", "loaded / quiet",
    "floor", "verdict",
]  # fmt: skip
CONTENTION_CAPTION = (
    "Each row timed twice in one run, the subject and a direct SDPA call interleaved: quiet, then beside --load N "
    "busy processes. ms: the subject's median / the baseline's; ×: the baseline's time / the subject's (above 1: "
    "attend is faster); loaded / quiet: the loaded × over the quiet ×, the share of its standing against SDPA "
    "attend keeps when the cores are shared; floor: the least share the issue accepts."
)


def _pair_ms(results: dict | None, row: dict) -> str:
    if results is None:
        return "—"
    cells = []
    for name in (row["subject"], row["baseline"]):
        res = results.get(name, {})
        cells.append(res.get("error") or _fmt(res.get("median_ms"), ".2f"))
    return " / ".join(cells)


def _contention_lines(doc: dict) -> list[list[str]]:
    lines = []
    for row in doc["rows"]:
        floor = row["floor"]
        ratio = {k: _fmt(row[k], ".2f") + ("×" if row[k] is not None else "") for k in ("ratio_quiet", "ratio_loaded")}
        lines.append([
            row["case"], row["label"], _mode(row), row["subject"], row["baseline"],
            _pair_ms(row["results"], row), ratio["ratio_quiet"], _pair_ms(row["loaded"], row), ratio["ratio_loaded"],
            _fmt(row["retained"], ".2f"), f"≥ {floor['min']:g}", _verdict(floor["pass"]),
        ])  # fmt: skip
    return lines


def _contention_notes(doc: dict) -> list[str]:
    notes = []
    start, cpus = doc.get("load_average"), doc.get("cpu_count")
    if start is not None and cpus and start > cpus:
        notes.append(
            f"warning: the quiet pass was not quiet (1-minute load average {start:.2f} on {cpus} CPUs before the busy "
            "processes started): its ratios already include someone else's load"
        )
    if doc.get("load") is not None:
        quiet_end = doc.get("load_average_quiet_end")
        quiet = "" if quiet_end is None else f", {quiet_end:.2f} when the quiet pass ended"
        notes.append(f"loaded pass: {doc['load']} busy processes on {doc.get('cpu_count')} CPUs{quiet}")
    return notes


def _contention_rich_table(doc: dict) -> Table:
    table = Table(title=_title(doc), caption=" ".join([CONTENTION_CAPTION, *_contention_notes(doc)]))
    for h in CONTENTION_HEADERS:
        left = h in ("case", "shape", "pass", "subject", "baseline", "verdict")
        table.add_column(h, justify="left" if left else "right")
    for cells in _contention_lines(doc):
        style = {"PASS": "bold green", "FAIL": "bold red"}.get(cells[11], "")
        table.add_row(*[Text(c, style=style if i == 11 else "") for i, c in enumerate(cells)])
    return table


def _contention_markdown(doc: dict) -> str:
    headers = CONTENTION_HEADERS
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for cells in _contention_lines(doc):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    env = f"{doc['device_name']} ({doc['device']}), torch {doc['torch']}, {doc['threads']} threads, {doc['date']}"
    notes = [env, *([load_text(doc)] if load_text(doc) else []), *_contention_notes(doc)]
    return "\n".join(lines + ["", CONTENTION_CAPTION, "", *[f"* {n}" for n in notes]])


# main functions


def rich_table(doc: dict) -> Table:
    """The run as a `rich` table: one row per (case, pass) for attend's auto choice, then its speed-up over
    each other candidate (their time / attend's: above 1 = attend is faster). ★ marks the fastest."""
    if doc.get("kind") == "structured":
        return _structured_rich_table(doc)
    if doc.get("kind") == "decode":
        return _decode_rich_table(doc)
    if doc.get("kind") == "contention":
        return _contention_rich_table(doc)
    rows = doc["rows"]
    ratio_cols = _ratio_columns(rows)
    table = Table(title=_title(doc), caption=CAPTION)
    for h in HEADERS:
        table.add_column(h, justify="right" if h not in ("case", "shape", "dtype", "pass", "auto picks") else "left")
    for n in ratio_cols:
        table.add_column(f"× {n}", justify="right")
    for row in rows:
        cells = _cells(row, ratio_cols)
        styled = []
        for c in cells:
            if STAR in c:
                styled.append(Text(c, style="bold green"))
            elif c.endswith("×") and float(c[:-1]) < 0.95:
                styled.append(Text(c, style="red"))
            else:
                styled.append(Text(c))
        table.add_row(*styled)
    return table


def markdown_table(doc: dict) -> str:
    """The same table as `rich_table`, in GitHub markdown."""
    if doc.get("kind") == "structured":
        return _structured_markdown(doc)
    if doc.get("kind") == "decode":
        return _decode_markdown(doc)
    if doc.get("kind") == "contention":
        return _contention_markdown(doc)
    rows = doc["rows"]
    ratio_cols = _ratio_columns(rows)
    headers = HEADERS + [f"× {n}" for n in ratio_cols]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row, ratio_cols)) + " |")
    return "\n".join(lines + ["", CAPTION])


def save_text(text: str, path: str | Path) -> None:
    """Write `text` to `path` (its folders created) through a temporary file in the same folder and a rename:
    an interrupt mid-write leaves the previous content, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_json(doc: dict, path: str | Path) -> None:
    save_text(json.dumps(doc, indent=1) + "\n", path)


def load_json(path: str | Path) -> dict:
    """Read a result file, checking its top-level and row keys; ValueError names what is wrong."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"expected a readable JSON file, got {path} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"expected an `attend bench --json` file, got invalid JSON in {path} ({exc.msg})") from None
    if not isinstance(doc, dict) or not all(k in doc for k in ("rows", "suite", "device")):
        raise ValueError(f"expected an `attend bench --json` file with suite, device and rows, got {path}")
    return doc


# the candidates a per-case bar chart compares: attend, a direct SDPA call, the seed's einsum path
BAR_CANDIDATES = ("attend", "seed:sdpa", "seed:einsum")


def _sweep_panels(ax_t, ax_m, title: str, rs: list[dict]) -> None:
    """One family of cases that differ only in key length: a line per candidate against j."""
    xs = [r["shape"]["j"] for r in rs]
    for n in dict.fromkeys(n for r in rs for n in r["results"]):
        dashed = {"linestyle": "--" if n.startswith("seed") else "-"}
        style = {"linewidth": 2.5, "color": "black"} if n == "attend" else dashed
        for ax, metric in ((ax_t, "gflops"), (ax_m, "peak_mb")):
            ys = [float("nan") if (y := r["results"].get(n, {}).get(metric)) is None else y for r in rs]
            ax.plot(xs, ys, marker="o", label=n, **style)
    for ax, ylabel in ((ax_t, "GFLOP/s (FA convention)"), (ax_m, "peak memory above inputs (MB)")):
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("key length j")
    _memory_scale(ax_m, rs)
    ax_t.legend(fontsize=7)


def _case_bars(ax_t, ax_m, title: str, rs: list[dict]) -> None:
    """Unrelated cases side by side: grouped bars per case (attend, direct SDPA, the seed), no lines joining
    cases that have nothing to do with each other."""
    names = [n for n in BAR_CANDIDATES if any(n in r["results"] for r in rs)]
    width = 0.8 / max(1, len(names))
    labels = [f"{r['case']}\n{case_flags(r['causal'], r['mask']) or 'plain'}" for r in rs]
    for k, n in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(rs))]
        for ax, metric in ((ax_t, "gflops"), (ax_m, "peak_mb")):
            ys = [0.0 if (y := r["results"].get(n, {}).get(metric)) is None else y for r in rs]
            ax.bar(xs, ys, width=width, label=n, color={"attend": "black"}.get(n))
    for ax, ylabel in ((ax_t, "GFLOP/s (FA convention)"), (ax_m, "peak memory above inputs (MB)")):
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_xticks(range(len(rs)), labels, fontsize=8)
    if not any(res.get("peak_mb") for r in rs for res in r["results"].values()):
        _no_memory(ax_m)  # bars stay on a linear scale: a log scale hides bars that start at 0
    ax_t.legend(fontsize=7)


def _memory_scale(ax_m, rs: list[dict]) -> None:
    if any(res.get("peak_mb") for r in rs for res in r["results"].values()):
        ax_m.set_yscale("log", nonpositive="mask")
    else:  # --no-memory: nothing measured, nothing to put on a log scale
        _no_memory(ax_m)


def _no_memory(ax_m) -> None:
    ax_m.text(0.5, 0.5, "memory not measured (--memory none)", ha="center", va="center", transform=ax_m.transAxes)


def save_plot(doc: dict, path: str | Path) -> None:
    """PNG: throughput (GFLOP/s) and peak memory (MB) against key length j, one line per candidate.

    One pair of panels per (pass, family), a family being the cases that differ only in length; with no
    such sweep in the suite, the cases are laid side by side instead. Needs matplotlib (`pip install
    'torch-attend[plot]'`); raises RuntimeError with that hint when it is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib; install it with `pip install 'torch-attend[plot]'`") from None

    groups: dict[tuple, list[dict]] = {}
    for row in doc["rows"]:
        s = row["shape"]
        key = (row["mode"], row["dtype"], s["b"], s["h"], s["g"], s["d"], s["e"], row["causal"], row["mask"])
        groups.setdefault(key, []).append(row)
    sweeps = [rs for rs in groups.values() if len({r["shape"]["j"] for r in rs}) >= 2]
    panels: list[tuple[str, list[dict], bool]] = []
    for rs in sweeps[:6]:
        r0, s = rs[0], rs[0]["shape"]
        flags = case_flags(r0["causal"], r0["mask"])
        title = f"{_mode(r0)} {r0['dtype']} (b={s['b']}, h={s['h']}, d={s['d']}) {flags}"
        panels.append((title, sorted(rs, key=lambda r: r["shape"]["j"]), True))
    if not panels:
        for mode in dict.fromkeys(r["mode"] for r in doc["rows"]):
            rs = [r for r in doc["rows"] if r["mode"] == mode]
            title = f"{_mode(rs[0])}, {rs[0]['dtype']}: attend vs a direct SDPA call vs the seed, per case"
            panels.append((title, rs, False))

    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for (title, rs, sweep), (ax_t, ax_m) in zip(panels, axes):
        if sweep:
            _sweep_panels(ax_t, ax_m, title, rs)
        else:
            _case_bars(ax_t, ax_m, title, rs)
    fig.suptitle(
        f"attend bench --suite {doc['suite']}: {doc['device_name']}, torch {doc['torch']}, "
        f"{doc['threads']} threads, {doc['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _subject(row: dict) -> dict:
    return row["results"].get(row.get("subject", "attend"), {})


def _subject_ms(row: dict) -> float | None:
    """attend's time, or a structured row's subject's."""
    return _subject(row).get("median_ms")


def _spread(row: dict) -> float | None:
    """The subject's run-to-run spread, (p75 - p25) / median: as recorded, else from its samples (a file
    written before `spread` was recorded), else None (unknown)."""
    res = _subject(row)
    if res.get("spread") is not None:
        return float(res["spread"])
    samples = res.get("samples_ms") or []
    if len(samples) < 2 or not statistics.median(samples) > 0:
        return None
    p25, _, p75 = statistics.quantiles(samples, n=4, method="inclusive")
    return (p75 - p25) / statistics.median(samples)


def _key(row: dict) -> tuple[str, str, str]:
    return (row["case"], row["mode"], row["dtype"])


def _rid(row: dict) -> str:
    return f"{row['case']} {_mode(row)} {row['dtype']}"


def compare_rows(old: dict, new: dict, threshold: float = 0.10) -> list[dict]:
    """Per row of `new` (matched to `old` by case, pass and dtype), the verdict on attend's own time (a
    structured or contention row's: its subject's) as a dict: verdict, id, old_ms, new_ms, spread (the
    two runs' spreads added, None when either is unknown), note.

    REGRESSED: new / old - 1 is at least `threshold` and more than the combined spread (a slowdown inside
    the two runs' own run-to-run noise is no regression); IMPROVED: old / new - 1 likewise; SAME otherwise
    (the note says when a change beyond `threshold` stayed within the spread); NEW when `old` has no such
    row, SAME when either has no time for it. An unknown spread counts as 0 (`threshold` alone decides)."""
    before = {_key(r): r for r in old["rows"]}
    out = []
    for r in new["rows"]:
        o = before.get(_key(r))
        t_new, t_old = _subject_ms(r), None if o is None else _subject_ms(o)
        spreads = [None if o is None else _spread(o), _spread(r)]
        spread = None if None in spreads else sum(spreads)  # type: ignore[arg-type]
        entry = {"verdict": "SAME", "id": _rid(r), "old_ms": t_old, "new_ms": t_new, "spread": spread, "note": ""}
        out.append(entry)
        if o is None:
            entry["verdict"] = "NEW"
            continue
        if t_old is None or t_new is None or not t_old > 0 or not t_new > 0:
            continue
        noise = spread or 0.0
        slower, faster = t_new / t_old - 1, t_old / t_new - 1
        for change, verdict, word in ((slower, "REGRESSED", "slower"), (faster, "IMPROVED", "faster")):
            if change >= threshold:
                if change > noise:
                    entry["verdict"] = verdict
                else:
                    entry["note"] = f"{change:.0%} {word}, within the runs' spread of {noise:.0%}"
    return out


def compare(old: dict, new: dict, threshold: float = 0.10) -> list[tuple[str, str, float | None, float | None]]:
    """`compare_rows` as (verdict, row id, old ms, new ms) tuples."""
    return [(e["verdict"], e["id"], e["old_ms"], e["new_ms"]) for e in compare_rows(old, new, threshold)]


def comparable(old: dict, new: dict) -> str | None:
    """Why two result files cannot be compared row by row (different suites, or no row in common), in the
    house style ("expected ..., got ...; hint: ..."); None when they can."""
    if old.get("suite") != new.get("suite"):
        return (
            f"expected runs of the same suite, got {old.get('suite')} vs {new.get('suite')}; hint: compare with a "
            f"file of --suite {new.get('suite')}, or rerun with --suite {old.get('suite')}"
        )
    if not {_key(r) for r in old["rows"]} & {_key(r) for r in new["rows"]}:
        shown = [", ".join(sorted({_rid(r) for r in doc["rows"]})[:4]) or "none" for doc in (old, new)]
        return (
            f"expected runs of --suite {new.get('suite')} with rows in common (matched by case, pass and dtype), "
            f"got none in common (old: {shown[0]}; new: {shown[1]}); hint: rerun with the old run's --dtype and --mode"
        )
    return None


def busy_runs(old: dict, new: dict) -> list[str]:
    """Why the comparison is inconclusive: each run whose 1-minute load average (at its start or its end)
    exceeded its CPU count, in words; [] when neither did or the files do not record it."""
    out = []
    for which, doc in (("old", old), ("new", new)):
        cpus = doc.get("cpu_count")
        loads = [
            (float(doc[k]), when)
            for k, when in (("load_average", "start"), ("load_average_end", "end"))
            if doc.get(k) is not None
        ]
        if not cpus or not loads or max(x for x, _ in loads) <= cpus:
            continue
        shown = " and ".join(f"{x:.2f} at the {when}" for x, when in loads)
        busy = f" ({doc['load']} busy processes from --load)" if doc.get("load") else ""
        out.append(f"the {which} run's 1-minute load average was {shown}, above its {cpus} CPUs{busy}")
    return out


def compare_lines(old: dict, new: dict, threshold: float = 0.10) -> Iterable[str]:
    """`compare_rows` as printable lines, with warnings first when the two runs are not like for like (and
    when a file records no spread: an older file)."""
    for field in ("device_name", "torch", "threads", "cpu_count"):
        if old.get(field) != new.get(field):
            yield f"warning: {field} differs: {old.get(field)} -> {new.get(field)} (not like for like)"
    loads = [doc.get("load_average") for doc in (old, new)]
    if any(x is not None and x >= 1.5 for x in loads):
        shown = " -> ".join("unknown" if x is None else f"{x:.2f}" for x in loads)
        yield f"warning: a busy machine (1-minute load average {shown}): expect noise beyond --threshold"
    rows = compare_rows(old, new, threshold)
    unknown = [
        which
        for which, doc in (("old", old), ("new", new))
        if any(_spread(r) is None for r in doc["rows"] if _subject_ms(r) is not None)
    ]
    if unknown:
        yield (
            f"note: the run-to-run spread is unknown for some rows of the {' and '.join(unknown)} file (no `spread`, "
            "fewer than 2 samples): counted as 0, --threshold alone decides there"
        )
    for e in rows:
        t_old, t_new = e["old_ms"], e["new_ms"]
        spread = "" if e["spread"] is None else f", spread {e['spread']:.0%}"
        note = f"; {e['note']}" if e["note"] else ""
        if t_old is not None and t_new is not None:
            ratio = f"{t_old / t_new:.2f}x{spread}{note}"
            yield f"{e['verdict']:<9} {e['id']}: attend {t_old:.3f} ms -> {t_new:.3f} ms ({ratio})"
        else:
            yield f"{e['verdict']:<9} {e['id']}: attend {_fmt(t_old, '.3f')} ms -> {_fmt(t_new, '.3f')} ms"
