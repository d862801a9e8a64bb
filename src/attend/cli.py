"""`attend info | explain | check | bench`: the command line.

Shape legend: b batch, h query heads, g key/value heads, i query positions, j key positions,
d head dim (q and k), e value head dim.

    attend info                                   versions, device, CPU features, every backend's status
    attend explain --shape B,H,I,D [--kv-heads G] [--kv-len J] [--v-dim E] [--dtype X] [--device Y]
                   [--causal] [--scale S] [--dropout P] [--window L,R] [--score dot|l2] [--deterministic]
                   [--check-finite true|false] [--mask none|padding|bool|bias] [--grad] [--documents N1,N2,...]
                   [--backend NAME]   (the option flags come from `attend.inputs.VOCABULARY`)
    attend check [--device] [--dtype a,b] [--backends a,b]
    attend bench [--suite quick|small|cpu|gan|vit|llm|long|gpu|structured|decode] [--device] [--dtype] [--backends a,b]
                 [--mode fwd|fwdbwd|both] [--json PATH] [--plot PATH] [--compare OLD.json [NEW.json]]
                 [--fail-on-floor]

A mistake on the command line (a bad shape string, an unknown backend, CUDA asked for where there is
none, inputs `validate` rejects) is one line on stderr and exit code 2, never a traceback.
`attend check` exits 1 when a backend fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace

import torch

from . import __version__, features
from ._helpers import fmt_dtype
from .dispatch import PRIORITY, explain_inputs, get_backend, list_backends
from .inputs import VOCABULARY, Options, validate

__all__ = ["main", "build_parser", "CliError"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "f64": torch.float64,
    "double": torch.float64,
}
MODES = {"fwd": ("fwd",), "fwdbwd": ("fwdbwd",), "both": ("fwd", "fwdbwd")}


class CliError(Exception):
    """A user mistake on the command line: printed as one line, exit code 2."""


# helpers


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a `CliError` (one line, exit 2) instead of usage text and exit."""

    def error(self, message: str):
        raise CliError(f"{message} (see `{self.prog} --help`)")


def _one_line(msg: object) -> str:
    return "; ".join(line.strip() for line in str(msg).strip().splitlines() if line.strip())


def _join_values(argv: list[str]) -> list[str]:
    """`--window -1,0` -> `--window=-1,0` for each flag of `VOCABULARY` that takes a value. argparse reads a value
    that starts with '-' as the next flag unless it is a plain negative number (`-1` is, `-1,0` and `-1e-05` are
    not) and stops with "expected one argument"; a value of '-' and then a digit or '.' is never a flag."""
    flags = {term.flag for term in VOCABULARY if term.metavar is not None}
    joined: list[str] = []
    at = 0
    while at < len(argv):
        arg = argv[at]
        if arg == "--":  # the rest is positional, as argparse reads it
            return joined + argv[at:]
        value = argv[at + 1] if at + 1 < len(argv) else ""
        if arg in flags and len(value) > 1 and value[0] == "-" and (value[1].isdigit() or value[1] == "."):
            joined.append(f"{arg}={value}")
            at += 2
        else:
            joined.append(arg)
            at += 1
    return joined


def _progress(command: str):
    """The progress bar `attend check` and `attend bench` show on stderr while they run (a rich Progress)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]attend {command}[/bold] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console(stderr=True),
        transient=True,
    )


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 250  # redirected: do not squeeze tables into 80 columns
    return Console(stderr=stderr, width=width, soft_wrap=False, highlight=False)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """ "B,H,I,D" -> (b, h, i, d), four positive integers."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) <= 0:
        raise CliError(
            f"expected --shape B,H,I,D (four positive integers: batch, query heads, query length, head dim, "
            f"e.g. 2,8,1024,64), got {text!r}"
        )
    return dims


def parse_dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.strip().lower().removeprefix("torch.")]
    except KeyError:
        raise CliError(
            f"expected --dtype among float32, bfloat16, float16, float64 (or fp32, bf16, fp16), got {text!r}"
        ) from None


def parse_device(text: str | None) -> torch.device:
    """A torch device that exists here; None -> cuda when available, else cpu."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CliError(f"expected --device cpu, cuda, cuda:N or mps, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise CliError(
                f"--device {text}: no CUDA device is available (torch {torch.__version__}, {build}; "
                "torch.cuda.is_available() is False)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CliError(f"--device {text}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise CliError(f"expected --device cpu, cuda, cuda:N or mps, got {text!r}")
    return device


def parse_backends(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CliError(f"expected --backends as a comma-separated list of names, got {text!r}")
    for n in names:
        try:
            get_backend(n)
        except ValueError as exc:
            raise CliError(_one_line(exc)) from None
    return names


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_fp16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


# attend info


def cmd_info(args) -> int:
    """Versions, devices, CPU features and threads; every backend with `available` or its reason."""
    from rich.table import Table

    console = _console()
    env = Table(title=f"attend {__version__}", show_header=False)
    env.add_column("item", style="bold")
    env.add_column("value")
    env.add_row("python", f"{platform.python_version()} ({platform.platform()})")
    env.add_row("torch", f"{torch.__version__}: {features.tested_status()}")
    env.add_row("CUDA build", str(torch.version.cuda or "none (CPU-only build)"))
    if torch.cuda.is_available():
        env.add_row("cuDNN", str(torch.backends.cudnn.version()))
        for idx in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(idx)
            env.add_row(
                f"cuda:{idx}",
                f"{p.name}, sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs",
            )
    else:
        env.add_row("CUDA devices", "none visible to torch")
    cpu_cap = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    env.add_row("CPU", f"{platform.machine()}, {os.cpu_count()} logical cores, torch kernels: {cpu_cap}")
    env.add_row("CPU features", ", ".join(_cpu_flags()) or "(unknown)")
    env.add_row("threads", f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op")
    env.add_row("oneDNN / MKL", f"{torch.backends.mkldnn.is_available()} / {torch.backends.mkl.is_available()}")
    console.print(env)

    table = Table(title="backends (auto tries them in each device's priority order)")
    for col in ("backend", "devices", "fused", "status", "auto order"):
        table.add_column(col)
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        present.append("mps")
    for name in list_backends():
        b = get_backend(name)
        why = b.unavailable_reason()
        order = [f"{dev} #{PRIORITY[dev].index(name) + 1}" for dev in PRIORITY if name in PRIORITY[dev]]
        here = [dev for dev in present if dev in b.caps]
        if why is not None:
            status = f"[red]unavailable[/red]: {why}"
        elif here:
            status = f"[green]runs here[/green] on {', '.join(here)}"
        else:  # e.g. a CUDA-only kernel on a CPU-only machine: explain would say device=cpu
            status = f"[yellow]not on this machine[/yellow] (needs {', '.join(sorted(b.caps))})"
        table.add_row(name, ", ".join(sorted(b.caps)), "yes" if b.fused else "no", status, ", ".join(order) or "—")
    console.print(table)

    found = Table(title="torch features attend probes (`attend.features`; missing ones make something ineligible)")
    for col in ("feature", "here", "needs", "without it"):
        found.add_column(col)
    for f in features.registered():
        has = f.present()
        found.add_row(f.name, "[green]yes[/green]" if has else "[red]missing[/red]", f.api,
                      "—" if has else f.without)  # fmt: skip
    console.print(found)
    return 0


# attend explain


def _shaped(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `shape` backed by one row of memory (strides 0 but the last): explain runs no kernel."""
    return torch.empty_strided(shape, (0,) * (len(shape) - 1) + (1,), dtype=dtype, device=device)


def cmd_explain(args) -> int:
    """Print what `attend.explain(...)` prints for inputs of the given shape and options."""
    b, h, i, d = parse_shape(args.shape)
    g = args.kv_heads if args.kv_heads is not None else h
    j = args.kv_len if args.kv_len is not None else i
    e = args.v_dim if args.v_dim is not None else d
    for flag, value in (("--kv-heads", g), ("--kv-len", j), ("--v-dim", e)):
        if value < 0 or (value == 0 and flag != "--kv-len"):
            raise CliError(f"expected {flag} to be a positive integer, got {value}")
    dtype = parse_dtype(args.dtype)
    device = parse_device(args.device)
    if args.backend is not None:
        parse_backends(args.backend)

    q = _shaped((b, h, i, d), dtype, device)
    k = _shaped((b, g, j, d), dtype, device)
    v = _shaped((b, g, j, e), dtype, device)
    mask = bias = None
    if args.mask == "padding":
        mask = _shaped((b, j), torch.bool, device)
    elif args.mask == "bool":
        mask = _shaped((b, 1, i, j), torch.bool, device)
    elif args.mask == "bias":
        bias = _shaped((b, h, i, j), dtype, device)
    if args.grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    options = {}
    for term in VOCABULARY:
        given = getattr(args, term.name)
        if term.metavar is None:
            options[term.name] = given
        elif given is not None:
            try:
                options[term.name] = term.parse(given)
            except ValueError as exc:
                raise CliError(f"{term.flag}: {exc}") from None
    documents = None
    if args.documents is not None:
        try:
            lengths = [int(n) for n in args.documents.split(",")]
        except ValueError:
            raise CliError(f"expected --documents as comma-separated lengths, got {args.documents!r}") from None
        if sum(lengths) != i or i != j or min(lengths) < 1:
            raise CliError(
                f"expected --documents lengths >= 1 that add up to the query and key length {i}, got {args.documents!r}"
                + ("" if i == j else f" (and i == j; here j = {j})")
            )
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
        documents = ids[None].expand(b, i)
    try:
        inp = validate(
            q, k, v, mask=mask, bias=bias, documents=documents, options=Options(**options)
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise CliError(_one_line(exc)) from None
    report = explain_inputs(inp, args.backend)
    sys.stdout.write(str(report) + "\n")
    if report.backend is None:
        # a named backend that cannot run, or nothing at all: say so on stderr and fail, like the Python call
        what = "no backend can run these inputs"
        if args.backend:
            what = f"backend {args.backend!r} cannot run these inputs"
        sys.stderr.write(f"attend explain: {what}\n")
        return 1
    return 0


# attend check


def cmd_check(args) -> int:
    """Every eligible backend against the float64 reference, forward and backward, on a grid of awkward
    cases; a pass/fail table; exit 1 when anything fails."""
    from rich.markup import escape
    from rich.table import Table

    from .testing import DTYPES, SMOKE_GRID, check_backend, checkable, grid

    device = parse_device(args.device)
    if args.dtype:
        dtypes = [parse_dtype(t) for t in args.dtype.split(",") if t.strip()]
    else:  # float64 is the reference itself
        dtypes = [torch.float32, torch.bfloat16] if device.type == "cpu" else [t for t in DTYPES if t != torch.float64]
    names = parse_backends(args.backends) or list_backends()
    cases = SMOKE_GRID if args.grid == "smoke" else grid(dtypes=[torch.float32])

    console = _console()
    cells: dict[tuple, str] = {}
    failures: list[str] = []
    counts = {"pass": 0, "fwd": 0, "fail": 0, "skip": 0}
    why_not: dict[str, dict[str, None]] = {n: {} for n in names}  # backend -> its distinct reasons, in order
    start = time.perf_counter()
    with _progress("check") as progress:
        task = progress.add_task("", total=len(dtypes) * len(cases) * len(names))
        for dtype in dtypes:
            for ci, case in enumerate(cases):
                q, k, v, mask, bias = replace(case, dtype=dtype, device=str(device)).inputs()
                kw = dict(mask=mask, bias=bias, causal=case.causal, **case.options())
                for name in names:
                    progress.update(task, description=f"{fmt_dtype(dtype)} {case.label()} {name}")
                    try:
                        grad, reasons = checkable(name, q, k, v, **kw)
                        cell = "skip" if reasons else "pass" if grad else "fwd"
                        why_not[name].update(dict.fromkeys(reasons))
                        if not reasons:
                            check_backend(name, q, k, v, **kw, grad=grad)
                    except (AssertionError, RuntimeError, ValueError) as exc:
                        cell = "FAIL"
                        failures.append(f"{name} {fmt_dtype(dtype)} {case.label()}:\n{exc}")
                    cells[(dtype, ci, name)] = cell
                    counts[cell.lower()] += 1
                    progress.advance(task)

    style = {
        "pass": "[green]ok[/green]",
        "fwd": "[green]ok[/green] fwd",
        "FAIL": "[bold red]FAIL[/bold red]",
        "skip": "[dim]—[/dim]",
    }
    for dtype in dtypes:
        table = Table(title=f"attend check: {device} {fmt_dtype(dtype)}, forward and backward vs the float64 reference")
        table.add_column("case (b h g i j d \\[e] flags)")
        for n in names:
            table.add_column(n, justify="center")
        for ci, case in enumerate(cases):
            table.add_row(case.label(), *(style[cells[(dtype, ci, n)]] for n in names))
        console.print(table)
    for f in failures:
        console.print(f"[red]FAIL[/red] {escape(f)}")
    never = [n for n in names if all(cells[(t, ci, n)] == "skip" for t in dtypes for ci in range(len(cases)))]
    for n, distinct in why_not.items():
        if distinct:  # once per backend, not once per cell
            shown = list(distinct)[:3]
            more = f" (and {len(distinct) - 3} more)" if len(distinct) > 3 else ""
            head = "not eligible for any case here" if n in never else "not eligible for some cases"
            console.print(f"{n}: {head}: {'; '.join(shown)}{more}", markup=False)
    console.print(
        f"{counts['pass']} passed, {counts['fwd']} passed forward only (fwd: no backward declared), "
        f"{counts['fail']} failed, {counts['skip']} not eligible (—), "
        f"torch {torch.__version__}, {time.perf_counter() - start:.1f} s"
    )
    if args.backends and never:  # the user asked for these and nothing was checked: that is not a pass
        console.print(f"attend check: nothing checked for {', '.join(never)} on {device}", markup=False)
        return 1
    return 1 if counts["fail"] else 0


# attend bench


EXIT_REGRESSED = 1  # --fail-on-regression: a row regressed beyond --threshold and the runs' spread
EXIT_INCONCLUSIVE = 3  # --compare: a run's load average exceeded its CPU count, no verdict either way
LONG_RUN_S = 600.0  # on CPU, a run estimated above this needs --yes (structured and vocabulary: 2-5 min)


def cmd_bench(args) -> int:
    """Run a benchmark suite; print the table; write JSON, markdown and PNG; compare with an older run.

    Before the first case: every output path is checked (a folder that cannot be written is a CliError, not a
    traceback after the run), the run's cost is estimated from its cases and printed on stderr, a GPU suite
    without a GPU is refused (`--device cpu` runs its shapes on the CPU anyway) and a CPU run estimated above
    10 minutes (LONG_RUN_S) needs `--yes`. While it runs, --json and --markdown are rewritten after every row
    (`complete` false), so an interrupt or a later error keeps what was measured; progress goes to stderr (a bar
    on a terminal, one plain line per row otherwise). `--load N` runs N busy processes beside the cases
    (`--suite contention` measures each row quiet and then under them; N defaults to two per core there).

    Exit codes: 0 done; 1 a floor missed with --fail-on-floor, or a row REGRESSED with --fail-on-regression;
    2 a mistake on the command line, or --compare files of different suites (or no row in common);
    3 (EXIT_INCONCLUSIVE) --compare where either run's 1-minute load average exceeded its CPU count.
    """

    from .bench.cases import (
        CONTENTION_MIN_TIME,
        CONTENTION_SUITES,
        DECODE_SUITES,
        GPU_SUITES,
        HIDDEN_SUITES,
        STRUCTURED_SUITES,
        SUITE_NAMES,
    )
    from .bench.report import comparable, load_json, rich_table
    from .bench.run import BenchConfig, plan, run_suite

    console = _console()
    compare = args.compare or []
    if not args.threshold >= 0:  # also NaN
        raise CliError(f"expected --threshold to be a relative change >= 0 (0.10 = 10 %), got {args.threshold}")
    if len(compare) > 2:
        raise CliError(f"expected --compare OLD.json [NEW.json], got {len(compare)} files")
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--markdown", args.markdown)):
        if path:
            _check_output(flag, path)
    if args.fail_on_regression and not compare:
        raise CliError("expected --compare OLD.json [NEW.json] with --fail-on-regression, got no --compare")
    if len(compare) == 2 and (args.plot or args.json or args.markdown):
        outputs = (("--plot", args.plot), ("--json", args.json), ("--markdown", args.markdown))
        given = ", ".join(flag for flag, on in outputs if on)
        raise CliError(
            f"expected no output files with --compare OLD.json NEW.json (it compares two saved runs and runs nothing), "
            f"got {given}; hint: to plot a saved run, rerun it with --plot"
        )

    def load(path):
        try:
            return load_json(path)
        except ValueError as exc:
            raise CliError(_one_line(exc)) from None

    old = load(compare[0]) if compare else None
    if len(compare) == 2:  # two saved files: compare them, run nothing
        return _report_comparison(console, load(compare[0]), load(compare[1]), args)

    if args.suite not in SUITE_NAMES:
        visible = ", ".join(s for s in SUITE_NAMES if s not in HIDDEN_SUITES)
        raise CliError(f"expected --suite among {visible}, got {args.suite!r}")
    structured = args.suite in STRUCTURED_SUITES
    decode = args.suite in DECODE_SUITES
    contention = args.suite in CONTENTION_SUITES
    if structured and (args.plot or args.backends):
        given = "--plot" if args.plot else "--backends"
        raise CliError(
            f"expected no {given} with --suite {args.suite} (its rows time fixed formulations of the same attention, "
            f"in the table, --json and --markdown), got {given}"
        )
    if decode or contention:
        wrong = [
            flag
            for flag, on in (
                ("--plot", args.plot),
                ("--backends", args.backends),
                ("--mode " + str(args.mode), args.mode not in (None, "fwd") or (contention and args.mode)),
                ("--memory " + str(args.memory), args.memory not in (None, "none")),
            )
            if on
        ]
        what = (
            "one decoding step, no grad, against fixed candidates, measured as time and bandwidth, not memory"
            if decode
            else "each row's pass and candidates are fixed: attend against a direct SDPA call, timed quiet and loaded"
        )
        if wrong:
            raise CliError(f"expected no {wrong[0]} with --suite {args.suite} ({what}), got {wrong[0]}")
    if args.fail_on_floor and not (structured or decode or contention):
        raise CliError(
            f"expected --fail-on-floor with --suite structured, decode or contention (they have floors), "
            f"got --suite {args.suite}"
        )
    busy = _bench_load(args, contention)
    # peak memory: the quick and structured tables show one candidate's (attend's, the subject's) alone
    default_memory = "none" if decode or contention else "attend" if structured or args.suite == "quick" else "all"
    memory = "none" if args.no_memory else args.memory or default_memory
    if args.suite in GPU_SUITES and args.device is None and not torch.cuda.is_available():
        cpu_cfg = BenchConfig(suite=args.suite, min_time=args.min_time or 0.3, memory=memory)
        _, cpu_s = _bench_estimate(cpu_cfg)
        raise CliError(
            f"expected a CUDA device for --suite {args.suite} (its shapes are sized for a GPU), got none "
            f"(torch.cuda.is_available() is False); hint: `--device cpu --yes` runs its shapes on the CPU anyway, "
            f"about {_fmt_duration(cpu_s)} here, or pick --suite quick"
        )
    device = parse_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise CliError(f"expected --device cpu or cuda for benchmarks, got {args.device!r}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib; install it with `pip install 'torch-attend[plot]'`") from None
    min_time = args.min_time if args.min_time is not None else CONTENTION_MIN_TIME if contention else 0.3
    if not min_time > 0:
        raise CliError(f"expected --min-time > 0 seconds, got {args.min_time}")
    cfg = BenchConfig(
        suite=args.suite,
        device=device,
        dtype=parse_dtype(args.dtype) if args.dtype else None,
        backends=parse_backends(args.backends),
        modes=MODES[args.mode] if args.mode else None,
        min_time=min_time,
        memory=memory,
        load=busy,
    )
    pairs = plan(cfg)
    if old is not None:  # a comparison that cannot be made is said now, not after the run
        why = comparable(old, {"suite": cfg.suite, "rows": old["rows"]})
        planned = {c.name for c, _ in pairs}
        if why is None and not planned & {r["case"] for r in old["rows"]}:
            had, runs = (", ".join(sorted(names)[:4]) for names in ({r["case"] for r in old["rows"]}, planned))
            why = f"expected a run with cases in common with it, got none (old: {had}; this run: {runs})"
        if why:
            raise CliError(f"--compare {compare[0]}: {why}")
    _bench_announce(cfg, args)

    written = {"rows": 0}
    command = "attend " + " ".join(args.argv)

    def keep(doc: dict) -> None:  # after every row: what was measured so far, on disk
        doc["command"] = command
        _write_bench_outputs(doc, args)
        written["rows"] = len(doc["rows"])

    try:
        with _BenchProgress(cfg, len(pairs)) as (on_status, on_row):
            doc = run_suite(cfg, on_status=on_status, on_row=on_row, on_document=keep)
    except BaseException as exc:
        if args.json or args.markdown:
            kept = ", ".join(p for p in (args.json, args.markdown) if p)
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped by {type(exc).__name__}"
            _console(stderr=True).print(
                f"attend bench: {why} after {written['rows']} row(s); {kept} keep(s) them ('complete': false)",
                markup=False,
            )
        raise
    doc["command"] = command
    _write_bench_outputs(doc, args)
    console.print(rich_table(doc))
    for path in (args.json, args.markdown):
        if path:
            console.print(f"wrote {path}", markup=False)
    if args.plot:
        from .bench.report import save_plot

        save_plot(doc, args.plot)
        console.print(f"wrote {args.plot}", markup=False)
    rc = 0 if old is None else _report_comparison(console, old, doc, args)
    if structured or decode or contention:
        failed = [r["case"] + (f" {r['dtype']}" if decode else "") for r in doc["rows"] if r["pass"] is False]
        for case, why in doc.get("omitted", {}).items():
            console.print(f"{case}: left out: {why}", markup=False)
        if failed and args.fail_on_floor:
            console.print(f"attend bench: {len(failed)} row(s) below a floor: {', '.join(failed)}", markup=False)
            return 1
    return rc


def _bench_load(args, contention: bool) -> int:
    """The busy processes --load asks for: N >= 0; --suite contention needs some (default 2 per core)."""
    cpus = os.cpu_count() or 1
    if args.load is None:
        return 2 * cpus if contention else 0
    if args.load < 0 or (contention and args.load == 0):
        least = 1 if contention else 0
        hint = "--load 0 (the default) runs none"
        if contention:
            hint = f"--suite contention compares quiet with loaded, e.g. --load {2 * cpus} (two per core here)"
        raise CliError(f"expected --load N >= {least} (busy processes beside the cases), got {args.load}; hint: {hint}")
    return args.load


def _fmt_duration(seconds: float) -> str:
    from .bench.cost import fmt_duration

    return fmt_duration(seconds)


def _bench_estimate(cfg) -> tuple[int, float]:
    """(rows, estimated seconds) of the run `cfg` describes, on this machine as it is now."""
    from .bench.cost import estimate_seconds

    return estimate_seconds(cfg)


def _bench_announce(cfg, args) -> None:
    """Say before the first case what the run will cost (an estimate from its cases, on stderr); refuse a CPU
    run estimated above LONG_RUN_S without --yes."""
    from .bench.cases import CONTENTION_SUITES
    from .bench.harness import load_average

    rows, seconds = _bench_estimate(cfg)
    what = f"{rows} row{'s' if rows != 1 else ''}"
    if cfg.suite in CONTENTION_SUITES:
        what = f"{rows // 2} rows, each quiet and then beside {cfg.load} busy processes"
    elif cfg.load:
        what += f", beside {cfg.load} busy processes"
    if cfg.device.type == "cpu" and seconds > LONG_RUN_S and not args.yes:
        raise CliError(
            f"expected --yes to start a run of about {_fmt_duration(seconds)} (--suite {cfg.suite} on the CPU: "
            f"{what}), got none; hint: add --yes to run it anyway, lower --min-time, or pick --suite quick"
        )
    la = load_average()
    busy = "" if la is None else f"; 1-minute load average {la:.2f} on {os.cpu_count()} CPUs"
    _console(stderr=True).print(
        f"attend bench --suite {cfg.suite} on {cfg.device}: {what}, about {_fmt_duration(seconds)} here "
        f"(an estimate from its cases{busy})",
        markup=False,
    )


class _PlainProgress:
    """Progress on a stderr that is no terminal (a log file, CI): one plain line per finished row."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.console = _console(stderr=True)
        self.last = time.perf_counter()

    def row(self, row: dict) -> None:
        self.done += 1
        now = time.perf_counter()
        phase = ""
        if row.get("kind") == "contention":
            phase = " loaded" if row.get("loaded") is not None else " quiet"
        label = f"{row['case']} {'fwd+bwd' if row['mode'] == 'fwdbwd' else row['mode']} {row['dtype']}{phase}"
        self.console.print(f"[{self.done}/{self.total}] {label}: {now - self.last:.1f} s", markup=False)
        self.last = now


class _BenchProgress:
    """(on_status, on_row) for `run_suite`: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, cfg, total: int):
        self.cfg, self.total = cfg, total
        self.bar = None

    def __enter__(self):
        if sys.stderr.isatty():
            self.bar = _progress("bench")
            self.bar.__enter__()
            task = self.bar.add_task(f"--suite {self.cfg.suite}", total=self.total)
            bar = self.bar
            return (lambda msg: bar.update(task, description=msg)), (lambda row: bar.advance(task))
        plain = _PlainProgress(self.total)
        return (lambda msg: None), plain.row

    def __exit__(self, *exc):
        if self.bar is not None:
            return self.bar.__exit__(*exc)
        return None


def _write_bench_outputs(doc: dict, args) -> None:
    """--json and --markdown, rewritten whole (through a temporary file) with the document so far."""
    from .bench.report import markdown_table, save_json, save_text

    if args.json:
        save_json(doc, args.json)
    if args.markdown:
        text = markdown_table(doc)
        if not doc.get("complete", True):
            text += f"\n\n*incomplete: the {len(doc['rows'])} row(s) measured so far*"
        save_text(text + "\n", args.markdown)


def _check_output(flag: str, path: str) -> None:
    """Before any work: an output path must be a file we can write (its folder existing or creatable).
    `os.access` says yes to root even where nothing can be written (/proc, a read-only mount), so the folder
    is tried: a temporary file in it, or a temporary folder in its nearest existing ancestor, removed again."""
    import tempfile

    target = os.path.abspath(path)
    hint = "hint: pick a path in a folder you can write, e.g. ./" + (os.path.basename(target) or "bench.json")
    if os.path.isdir(target):
        suffix = {"--plot": ".png", "--markdown": ".md"}.get(flag, ".json")
        raise CliError(
            f"expected {flag} to name a file, got the folder {path!r}; hint: add a file name, e.g. "
            f"{os.path.join(path, 'bench' + suffix)}"
        )
    folder = os.path.dirname(target)
    existing = folder
    while not os.path.exists(existing):  # the nearest existing ancestor must let us create what is missing
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(
            f"expected {flag} in a folder that can be written, got {path!r} ({existing} is not writable); {hint}"
        )
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise CliError(f"expected {flag} to be a writable file, got {path!r} (read-only); {hint}")
    try:
        if os.path.exists(target):
            with open(target, "a"):
                pass
        elif existing == folder:
            with tempfile.TemporaryFile(dir=folder):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".attend-check-", dir=existing))
    except OSError as exc:
        what = "open" if os.path.exists(target) else "write in" if existing == folder else "create a folder in"
        where = target if os.path.exists(target) else existing
        raise CliError(
            f"expected {flag} in a folder that can be written, got {path!r} (cannot {what} {where}: "
            f"{exc.strerror or exc}); {hint}"
        ) from None


def _report_comparison(console, old: dict, new: dict, args) -> int:
    """Print the comparison and return the exit code: 3 (EXIT_INCONCLUSIVE) when either run's 1-minute load
    average exceeded its CPU count (a busy machine: no verdict either way); 1 when a row REGRESSED (beyond
    --threshold and beyond the two runs' spread) and --fail-on-regression asks for it (CI); else 0. Files of
    different suites, or with no row in common, are a CliError (exit 2)."""
    from .bench.report import busy_runs, comparable, compare_lines

    why = comparable(old, new)
    if why:
        raise CliError(why)
    regressed = 0
    for line in compare_lines(old, new, args.threshold):
        regressed += line.startswith("REGRESSED")
        console.print(line, markup=False)
    busy = busy_runs(old, new)
    if busy:
        console.print(
            f"attend bench: INCONCLUSIVE: {'; '.join(busy)}: on a busy machine a change says more about the load "
            f"than about the code (exit {EXIT_INCONCLUSIVE}); hint: rerun when the load average is below the core "
            "count",
            markup=False,
        )
        return EXIT_INCONCLUSIVE
    if regressed and args.fail_on_regression:
        console.print(
            f"attend bench: {regressed} row(s) regressed by more than {args.threshold:.0%} and the runs' spread",
            markup=False,
        )
        return EXIT_REGRESSED
    return 0


# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    """The `attend` argument parser (subcommands info, explain, check, bench)."""
    parser = _Parser(
        prog="attend", description="attend: which attention kernel runs here, how fast, and why not the others."
    )
    parser.add_argument("--version", action="version", version=f"attend {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="{info,explain,check,bench}", parser_class=_Parser)

    p = sub.add_parser("info", help="versions, device, CPU features, every backend's status")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("explain", help="the backend auto picks for a shape, and why not each other one")
    p.add_argument("--shape", required=True, metavar="B,H,I,D", help="batch, query heads, query length, head dim")
    p.add_argument("--kv-heads", type=int, metavar="G", help="key/value heads g (h %% g == 0); default h")
    p.add_argument("--kv-len", type=int, metavar="J", help="key length j; default i")
    p.add_argument("--v-dim", type=int, metavar="E", help="value head dim e; default d")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, float64")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps; default cuda when available, else cpu")
    for term in VOCABULARY:  # every option's flag, from its row of the vocabulary
        if term.metavar is None:
            p.add_argument(term.flag, dest=term.name, action="store_true", help=term.help)
        else:
            p.add_argument(term.flag, dest=term.name, metavar=term.metavar, help=term.help)
    p.add_argument(
        "--mask",
        choices=("none", "padding", "bool", "bias"),
        default="none",
        help="padding: (b, j) key padding; bool: (b, 1, i, j); bias: float (b, h, i, j)",
    )
    p.add_argument("--grad", action="store_true", help="inputs require grad (training)")
    p.add_argument("--documents", metavar="N1,N2,...", help="packed documents of these lengths (they add up to i = j)")
    p.add_argument("--backend", metavar="NAME", help="explain a pinned backend instead of auto")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("check", help="every eligible backend vs the float64 reference, forward and backward")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--dtype", help="comma-separated; default float32,bfloat16 on CPU, float16,bfloat16,float32 on CUDA")
    p.add_argument("--backends", metavar="A,B", help="comma-separated backend names; default all")
    p.add_argument("--grid", choices=("full", "smoke"), default="full", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="time attend against every SDPA variant, the seed's code and a matmul")
    p.add_argument(
        "--suite",
        default="quick",
        metavar="{quick,small,cpu,gan,vit,llm,long,gpu,structured,vocabulary,decode,contention}",
        help="default quick (the README's headline shapes, < 1 min on 2 CPU cores); structured: packed documents, "
        "sliding window, score='l2' "
        "and varlen_attn, each against the formulations it replaces, with the issue's floors (2-4 min on 2 CPU cores); "
        "decode: one decoding step against a KV cache (1k-32k keys, b=1 and 8, float32 and bfloat16): "
        "attend.kvcache.with_kvcache, contiguous and paged, vs SDPA on the valid slice, as GB/s of cache read and "
        "%% of a copy's bandwidth, with the issue's floors (a few minutes on 2 CPU cores); contention: chunked "
        "(plain forward) and auto (causal + key padding, training) at (1, 8, 2048, 64) against direct SDPA, each "
        "row timed quiet and then beside --load busy processes, floor: the loaded ratio >= 0.8x the quiet one "
        "(about a minute on 2 CPU cores); gpu: needs a CUDA device (or --device cpu --yes). Every run says what it "
        "will cost before it starts",
    )
    p.add_argument("--device", help="cpu or cuda; default cuda when available, else cpu")
    p.add_argument(
        "--dtype",
        help="override every case's dtype (default: the case's, else float32 on CPU, bfloat16 on CUDA; decode: each "
        "(b, j) row once, in this dtype)",
    )
    p.add_argument(
        "--backends",
        metavar="A,B",
        help="backends to time besides auto; default every registered one but einsum (and, in the quick suite, "
        "sdpa:math, which took a seventh of its time)",
    )
    p.add_argument("--mode", choices=tuple(MODES), help="fwd, fwdbwd or both; default: each case's own")
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the results (with device, torch, threads, date, load average, CPU count, each timing's spread); "
        'rewritten after every row with "complete": false, so an interrupt keeps what was measured',
    )
    p.add_argument(
        "--plot", metavar="PATH", help="write a PNG: GFLOP/s and peak memory vs key length (needs matplotlib)"
    )
    p.add_argument("--markdown", metavar="PATH", help="write the table as GitHub markdown (rewritten after every row)")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="JSON",
        help="OLD.json: compare this run with it; OLD.json NEW.json: compare two saved runs. A row is REGRESSED "
        "(or IMPROVED) only beyond --threshold and beyond the two runs' recorded spread; runs of different suites "
        "(or with no row in common) are an error (exit 2); a run whose 1-minute load average exceeded its CPU "
        f"count makes the comparison INCONCLUSIVE (exit {EXIT_INCONCLUSIVE})",
    )
    p.add_argument(
        "--threshold", type=float, default=0.10, help="relative change that counts as IMPROVED/REGRESSED (default 0.10)"
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        metavar="S",
        help="seconds of samples per candidate (default 0.3; --suite contention: 2)",
    )
    p.add_argument(
        "--fail-on-regression",
        action="store_true",
        help=f"with --compare: exit {EXIT_REGRESSED} when a row regressed by more than --threshold and the runs' "
        f"spread (for CI); an INCONCLUSIVE comparison (a busy machine) exits {EXIT_INCONCLUSIVE} instead",
    )
    p.add_argument(
        "--memory",
        choices=("all", "attend", "none"),
        help="peak memory of every candidate, of attend alone (structured: the subject), or none; default: attend "
        "for the quick and structured suites (their tables show that one; keeps quick under a minute on 2 cores), none "
        "for decode (it measures bandwidth) and contention, all for the others",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements (= --memory none)")
    p.add_argument(
        "--fail-on-floor",
        action="store_true",
        help="--suite structured, decode or contention: exit 1 when a row's ratio (or the subject's peak memory, "
        "share of the copy bandwidth, or loaded / quiet ratio) misses its floor",
    )
    p.add_argument(
        "--load",
        type=int,
        metavar="N",
        help="start N busy processes (pure-Python spin loops) before the first case and stop them after the last: "
        "speed on a shared CPU; recorded in the results and the table's title (default 0; --suite contention: "
        "2 per core, its rows timed quiet first, then under the load)",
    )
    p.add_argument(
        "--yes",
        action="store_true",
        help="start a CPU run even when its estimate is above 10 minutes (without it such a run stops before the "
        "first case, saying what it would cost)",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `attend` and `python -m attend`. Returns the exit code: 0 ok, 1 a check failed,
    2 a mistake on the command line (one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(_join_values(argv))
        if args.command is None:
            parser.print_help()
            return 2
        args.argv = argv
        return int(args.func(args))
    except CliError as exc:
        cmd = f"attend {argv[0]}" if argv and not argv[0].startswith("-") else "attend"
        print(f"{cmd}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("attend: interrupted", file=sys.stderr)
        return 130
