"""Every benchmark in one run on one machine, side by side in one report.

    .venv/bin/python -m sled_bench.report [--out reports/DATE] [--quick] [--only NAME ...]

Each benchmark module runs as its own subprocess (own process group, own
timeout), one after another so that they never compete with each other for
the CPUs. What a benchmark prints is copied into ``<out>/REPORT.md`` verbatim
(JSON as a code block), under the exact command that produced it; a failed or
timed-out benchmark gets a note with its stderr tail and no figures. The
report never computes or invents a figure: its plots (``<out>/plots``) redraw
numbers from the printed tables. ``--quick`` gives each benchmark its smallest
settings; the default is the benchmarks' own defaults.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sled_shared import procs

from sled_bench import plots

INTERRUPT_GRACE_S = 30.0  # after SIGINT: time for a benchmark's finally blocks to stop its services
STDERR_TAIL_LINES = 40


@dataclass(frozen=True, slots=True)
class Bench:
    name: str  # the module under sled_bench
    args: tuple[str, ...]  # always passed; {out} is the report directory
    quick: tuple[str, ...]  # added with --quick: the smallest settings that still compare
    timeout_s: float
    quick_timeout_s: float
    note: str = ""  # what the module's docs say is emulated or simulated in its output


BENCHES = (
    Bench("acceptance", (), ("--max-tokens", "16"), 3600, 900),
    Bench("draft_quality", (),
          ("--prompts", "2", "--new-tokens", "16", "--tokens", "32", "--repeats", "1"), 3600, 900,
          note="`tokens/round K=4` is simulated: greedy speculative rounds replayed along the "
               "target's own greedy continuations, not run through a verifier."),
    Bench("verifier_forward", (), ("--iters", "5"), 3600, 900),
    Bench("verifier_bus", ("--log", "{out}/logs/verifier_bus.verifier.log"),
          ("--devices", "1", "2", "--rounds", "5"), 3600, 900),
    Bench("kv_attend_rtt", (), ("--forwards", "3", "--warmup", "1"), 1800, 600),
    Bench("cpu_attention_bench", (), ("--repeats", "1", "--new-tokens", "1"), 3600, 900),
    Bench("apex_policies", (), ("--sessions", "4", "--max-tokens", "16", "--gpu-kv-blocks", "8"),
          5400, 1200,
          note="The accelerator tier is emulated: the verifier's own torch KV cache on the CPU, "
               "limited to `--gpu-kv-blocks` blocks; both tiers share the same cores."),
    Bench("stack_throughput", ("--log-dir", "{out}/logs/stack_throughput"),
          ("--devices", "1", "2", "--per-device", "1", "--max-tokens", "16"), 5400, 1200,
          note="All devices and the verifier share this machine's CPUs: drafting competes "
               "with verification, which separate edge devices would not."),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Table:
    caption: str  # the text line printed right above the table, if any
    header: list[str]
    rows: list[list[str]]


@dataclass(slots=True)
class Outcome:
    bench: Bench
    argv: list[str]
    returncode: int | None  # None: still running at the timeout
    timed_out: bool
    timeout_s: float
    wall_s: float
    load_before: float
    load_after: float
    stdout: str
    stderr: str
    plots: list[plots.Plot] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def split_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_tables(text: str) -> list[Table]:
    """Markdown pipe tables: a header row, a ``|---|`` delimiter row, then body rows."""
    lines = text.splitlines()
    tables = []
    i = 0
    while i + 1 < len(lines):
        head, delim = lines[i].strip(), lines[i + 1].strip()
        cells = split_row(delim)
        is_delim = delim.startswith("|") and all(c and set(c) <= set("-: ") for c in cells)
        if not (head.startswith("|") and is_delim and len(cells) == len(split_row(head))):
            i += 1
            continue
        caption = lines[i - 1].strip() if i and not lines[i - 1].startswith("|") else ""
        header = split_row(head)
        rows = []
        i += 2
        while i < len(lines) and lines[i].strip().startswith("|"):
            row = split_row(lines[i])
            if len(row) == len(header):  # a malformed row is left out rather than misaligned
                rows.append(row)
            i += 1
        tables.append(Table(caption, header, rows))
    return tables


def parse_json(text: str) -> Any:
    """The printed JSON document when that is all the benchmark printed, else None."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def json_table(doc: Any) -> Table | None:
    """The nested ``{"part": {"median_ms": ..}}`` figures of a JSON report as one table."""
    if not isinstance(doc, dict):
        return None
    nested = {
        k: v
        for k, v in doc.items()
        if isinstance(v, dict) and v and all(isinstance(x, int | float) for x in v.values())
    }
    if not nested:
        return None
    columns = list(dict.fromkeys(c for v in nested.values() for c in v))
    rows = [[k, *(_fmt(v.get(c)) for c in columns)] for k, v in nested.items()]
    return Table("", ["key", *columns], rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def module_summary(name: str) -> str:
    """First paragraph of the module's docstring, read without importing it (torch is slow)."""
    spec = importlib.util.find_spec(f"sled_bench.{name}")
    if spec is None or spec.origin is None:
        return ""
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text()))
    return " ".join(doc.strip().split("\n\n")[0].split()) if doc else ""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpuinfo_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return None


def _gpus() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none (no nvidia-smi)"
    got = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return "; ".join(got.stdout.split("\n")).strip("; ") or "none listed by nvidia-smi"


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def machine_facts() -> dict[str, str]:
    ram = _ram_gib()
    return {
        "CPU": _cpuinfo_model(),
        "logical CPUs": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable by this run)",
        "RAM": "unknown" if ram is None else f"{ram:.1f} GiB",
        "GPU": _gpus(),
        "OS": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "onnxruntime-genai": _version("onnxruntime-genai"),
        "numpy": _version("numpy"),
        "git commit": _git_commit(),
    }


def machine_label(facts: dict[str, str]) -> str:
    """The short name every figure carries: "measured on <this>"."""
    cpus = facts["logical CPUs"].split()[0]
    return f"{facts['CPU']}, {cpus} CPUs, {facts['RAM']} RAM, GPU: {facts['GPU']}"


def command(bench: Bench, out: Path, quick: bool) -> list[str]:
    args = [a.format(out=out) for a in bench.args] + (list(bench.quick) if quick else [])
    return [sys.executable, "-m", f"sled_bench.{bench.name}", *args]


def run_bench(bench: Bench, argv: list[str], logs: Path, timeout_s: float) -> Outcome:
    """Run one benchmark to completion or ``timeout_s``; nothing of it outlives this call."""
    out_path, err_path = logs / f"{bench.name}.stdout", logs / f"{bench.name}.stderr"
    # Unbuffered: a killed benchmark's last lines still reach the files.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()[0]
    timed_out = False
    start = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        # Its own session: the whole group (and its services' groups, which die with
        # their parent) can be stopped without touching this process.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, start_new_session=True
        )
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            # SIGINT first: KeyboardInterrupt runs the benchmark's cleanup (nats, services).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(INTERRUPT_GRACE_S)
        finally:
            procs.stop_groups([proc], 10.0)
    return Outcome(
        bench=bench,
        argv=argv,
        returncode=None if timed_out else proc.returncode,
        timed_out=timed_out,
        timeout_s=timeout_s,
        wall_s=time.perf_counter() - start,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty)"


def failure_note(o: Outcome) -> str:
    """What a reader sees instead of figures when a benchmark did not finish."""
    if o.timed_out:
        what = (
            f"**TIMED OUT** at its {o.timeout_s:.0f} s limit (stopped with SIGINT, "
            "then SIGTERM/SIGKILL)"
        )
    else:
        what = f"**FAILED** with exit code {o.returncode} after {o.wall_s:.0f} s"
    parts = [
        f"{what}: no figures from this benchmark in this report.",
        "",
        f"stderr, last {STDERR_TAIL_LINES} lines:",
        "",
        "```text",
        tail(o.stderr),
        "```",
    ]
    if o.stdout.strip():
        parts += [
            "",
            "stdout before it stopped (incomplete run, not plotted):",
            "",
            "```text",
            tail(o.stdout),
            "```",
        ]
    return "\n".join(parts)


def embed(stdout: str) -> str:
    """A benchmark's printed markdown, placed under this report's own headings."""
    out: list[str] = []
    for line in stdout.rstrip().splitlines():
        if line.startswith("#"):
            line = "##" + line  # its "## title" sits below this report's "## benchmark"
        prev = out[-1].strip() if out else ""
        # A table only renders with a blank line between it and surrounding text.
        if prev and line.strip() and prev.startswith("|") != line.strip().startswith("|"):
            out.append("")
        out.append(line)
    return "\n".join(out)


def status(o: Outcome) -> str:
    if o.ok:
        return f"ok, {o.wall_s:.0f} s"
    if o.timed_out:
        return f"TIMED OUT at its {o.timeout_s:.0f} s limit"
    return f"FAILED (exit code {o.returncode}) after {o.wall_s:.0f} s"


def section(o: Outcome, out: Path, measured_on: str) -> str:
    name = o.bench.name
    lines = [
        f"## {name}",
        "",
        module_summary(name),
        "",
        f"- command: `cd {shlex.quote(os.getcwd())} && PYTHONUNBUFFERED=1 {shlex.join(o.argv)}`",
        f"- result: {status(o)}; 1-minute load average {o.load_before:.1f} at its start, "
        f"{o.load_after:.1f} at its end",
        f"- measured on {measured_on}, in this run; what the benchmark labels emulated or "
        "simulated stays so labelled",
        f"- full output: `logs/{name}.stdout`, `logs/{name}.stderr`",
    ]
    if o.bench.note:
        lines.append(f"- note (from the module's documentation): {o.bench.note}")
    lines.append("")
    if not o.ok:
        lines.append(failure_note(o))
        return "\n".join(lines)
    doc = parse_json(o.stdout)
    if doc is None:
        lines.append(embed(o.stdout))
    else:
        lines += ["```json", json.dumps(doc, indent=2), "```"]
        table = json_table(doc)
        if table is not None:
            lines += [
                "",
                "The figures above as a table (rearranged by the report, same numbers):",
                "",
                *render_table(table),
            ]
    for p in o.plots:
        if p.path is None:
            lines += ["", f'(plot "{p.spec.title}" skipped: {p.reason})']
        else:
            rel = p.path.relative_to(out)
            note = f"; {p.spec.note}" if p.spec.note else ""
            lines += ["", f"![{p.spec.title}, measured on {measured_on}{note}]({rel})"]
    return "\n".join(lines)


def render_table(t: Table) -> list[str]:
    return [
        "| " + " | ".join(t.header) + " |",
        "|" + "---|" * len(t.header),
        *("| " + " | ".join(r) + " |" for r in t.rows),
    ]


def tables_of(o: Outcome) -> list[Table]:
    doc = parse_json(o.stdout)
    table = None if doc is None else json_table(doc)
    return [table] if table is not None else parse_tables(o.stdout)


def render(
    report_cmd: str,
    facts: dict[str, str],
    times: tuple[datetime, datetime],
    loads: tuple[tuple[float, ...], tuple[float, ...]],
    quick: bool,
    outcomes: list[Outcome],
    out: Path,
) -> str:
    label = machine_label(facts)
    start, end = times
    lines = [
        f"# Benchmark report, {start:%Y-%m-%d %H:%M %Z}",
        "",
        f"Everything here was measured on {label}, in one run of `{report_cmd}`: the "
        "benchmarks ran one after another on this machine, each as its own process; no "
        "figure comes from anywhere else. Other work may share the CPUs (see the load "
        "averages): speeds are what this machine gave at the time.",
    ]
    if quick:
        lines += [
            "",
            "`--quick`: every benchmark ran with its smallest settings (fewer "
            "tokens, iterations, sessions and devices than its defaults), so figures "
            "are noisier than a default run's.",
        ]
    lines += [
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| date | {start:%Y-%m-%d %H:%M:%S %Z} to {end:%H:%M:%S} |",
    ]
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    lines += [
        f"| load average (1, 5, 15 min) at start | {', '.join(f'{x:.2f}' for x in loads[0])} |",
        f"| load average (1, 5, 15 min) at end | {', '.join(f'{x:.2f}' for x in loads[1])} |",
        "",
        "## Contents",
        "",
        *(f"- [{o.bench.name}](#{o.bench.name}): {status(o)}" for o in outcomes),
    ]
    for o in outcomes:
        lines += ["", section(o, out, label)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="report directory (default: reports/<date-time>)")
    ap.add_argument("--quick", action="store_true", help="each benchmark's smallest settings")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=[b.name for b in BENCHES],
        metavar="NAME",
        help="run just these benchmarks",
    )
    args = ap.parse_args(argv)
    out = (args.out or Path("reports") / datetime.now().strftime("%Y-%m-%d_%H%M%S")).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report_cmd = shlex.join([sys.executable, "-m", "sled_bench.report", *(argv or sys.argv[1:])])
    facts = machine_facts()
    start, load_start = datetime.now().astimezone(), os.getloadavg()
    outcomes = []
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        cmd = command(bench, out, args.quick)
        print(f"[report] {shlex.join(cmd)}", file=sys.stderr, flush=True)
        timeout = bench.quick_timeout_s if args.quick else bench.timeout_s
        outcome = run_bench(bench, cmd, logs, timeout)
        print(f"[report] {bench.name}: {status(outcome)}", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    end, load_end = datetime.now().astimezone(), os.getloadavg()
    tables = {o.bench.name: tables_of(o) for o in outcomes if o.ok}
    drawn = plots.make_plots(tables, out / "plots", machine_label(facts))
    for o in outcomes:
        o.plots = [p for p in drawn if p.spec.bench == o.bench.name]
    text = render(
        report_cmd, facts, (start, end), (load_start, load_end), args.quick, outcomes, out
    )
    (out / "REPORT.md").write_text(text)
    print(out / "REPORT.md")
    # Non-zero when anything failed, so `make bench` shows it; the report is written anyway.
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
