"""Reports of a benchmark run: a `rich` table, JSON, a markdown table, a PNG plot, and a comparison.

The document is the dict `run_suite` returns (its fields: `harness.run_rows`; a row's: its suite's module); rows
are keyed by (case, mode, dtype) when two documents are compared.
"""

from __future__ import annotations

import json
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
    "compare_lines",
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



def _title(doc: dict) -> str:
    return (
        f"attend bench --suite {doc['suite']}  ·  {doc['device_name']} ({doc['device']}), "
        f"torch {doc['torch']}, {doc['threads']} threads, {doc['date']}"
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


# main functions


def rich_table(doc: dict) -> Table:
    """The run as a `rich` table: one row per (case, pass) for attend's auto choice, then its speed-up over
    each other candidate (their time / attend's: above 1 = attend is faster). ★ marks the fastest."""
    if doc.get("kind") == "structured":
        return _structured_rich_table(doc)
    if doc.get("kind") == "decode":
        return _decode_rich_table(doc)
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
    rows = doc["rows"]
    ratio_cols = _ratio_columns(rows)
    headers = HEADERS + [f"× {n}" for n in ratio_cols]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row, ratio_cols)) + " |")
    return "\n".join(lines + ["", CAPTION])


def save_json(doc: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


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


def _subject_ms(row: dict) -> float | None:
    """attend's time, or a structured row's subject's."""
    return row["results"].get(row.get("subject", "attend"), {}).get("median_ms")


def compare(old: dict, new: dict, threshold: float = 0.10) -> list[tuple[str, str, float | None, float | None]]:
    """Per row of `new` (matched to `old` by case, pass and dtype): (verdict, row id, old ms, new ms) for
    attend's own time (a structured row's: its subject's). IMPROVED: new <= old * (1 - threshold);
    REGRESSED: new >= old * (1 + threshold); SAME in between; NEW when `old` has no such row (or no time
    for it)."""

    def key(r):
        return (r["case"], r["mode"], r["dtype"])

    before = {key(r): r for r in old["rows"]}
    out = []
    for r in new["rows"]:
        rid = f"{r['case']} {_mode(r)} {r['dtype']}"
        t_new = _subject_ms(r)
        o = before.get(key(r))
        t_old = None if o is None else _subject_ms(o)
        if t_old is None or t_new is None:
            out.append(("NEW" if o is None else "SAME", rid, t_old, t_new))
        elif t_new <= t_old * (1 - threshold):
            out.append(("IMPROVED", rid, t_old, t_new))
        elif t_new >= t_old * (1 + threshold):
            out.append(("REGRESSED", rid, t_old, t_new))
        else:
            out.append(("SAME", rid, t_old, t_new))
    return out


def compare_lines(old: dict, new: dict, threshold: float = 0.10) -> Iterable[str]:
    """`compare` as printable lines, with a warning first when the two runs are not like for like."""
    for field in ("device_name", "torch", "threads", "cpu_count"):
        if old.get(field) != new.get(field):
            yield f"warning: {field} differs: {old.get(field)} -> {new.get(field)} (not like for like)"
    loads = [doc.get("load_average") for doc in (old, new)]
    if any(x is not None and x >= 1.5 for x in loads):
        shown = " -> ".join("unknown" if x is None else f"{x:.2f}" for x in loads)
        yield f"warning: a busy machine (1-minute load average {shown}): expect noise beyond --threshold"
    for verdict, rid, t_old, t_new in compare(old, new, threshold):
        if t_old is not None and t_new is not None:
            yield f"{verdict:<9} {rid}: attend {t_old:.3f} ms -> {t_new:.3f} ms ({t_old / t_new:.2f}x)"
        else:
            yield f"{verdict:<9} {rid}: attend {_fmt(t_old, '.3f')} ms -> {_fmt(t_new, '.3f')} ms"
