"""PNG bar charts of the tables the benchmarks print, for the benchmark report.

Which columns are worth a chart is declared per benchmark in ``SPECS`` rather
than guessed: a table's key columns (draft kind, policy, device count) and its
measured columns look alike to a parser. A chart whose columns a table no longer
has is skipped with a reason, never drawn from something else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display on benchmark machines; must precede pyplot
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from sled_bench.report import Table

# The first number of a cell: "0.813 (640 positions)", "12.1 / 15.3" (median / p90),
# "45%", "1.20x". Cells without one ("-") are left out of the chart.
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


@dataclass(frozen=True, slots=True)
class PlotSpec:
    bench: str
    name: str  # file stem under plots/
    title: str
    x: tuple[str, ...]  # columns joined into each bar group's label
    y: tuple[str, ...]  # one bar per column per group, or one per series value
    ylabel: str
    series: str | None = None  # pivot: one bar per value of this column (needs one y)
    note: str = ""  # how the benchmark labels these figures (emulated parts), kept on the chart


@dataclass(frozen=True, slots=True)
class Plot:
    spec: PlotSpec
    path: Path | None  # None: skipped
    reason: str = ""


APEX_NOTE = "accelerator tier emulated: the verifier's CPU torch KV cache with a block budget"
SPECS = (
    PlotSpec("acceptance", "acceptance_rate", "Acceptance rate per draft kind", ("draft",),
             ("acceptance",), "accepted / drafted"),
    PlotSpec("acceptance", "acceptance_tokens_s", "End-to-end tokens/s per draft kind",
             ("draft",), ("tokens/s",), "tokens/s"),
    PlotSpec("draft_quality", "draft_agreement", "Greedy agreement with the target per draft",
             ("draft",), ("greedy agreement",), "fraction of positions"),
    PlotSpec("draft_quality", "draft_speed", "Draft decode speed (1 session, greedy)",
             ("draft",), ("tok/s",), "tokens/s"),
    PlotSpec("verifier_forward", "verifier_forward", "Verifier forward time",
             ("shape", "threads"), ("median ms",), "median ms"),
    PlotSpec("verifier_bus", "verifier_bus", "Verify round trip over NATS, by devices",
             ("devices",), ("round trip", "queue", "compute", "bus overhead"), "median ms"),
    PlotSpec("kv_attend_rtt", "kv_attend_rtt", "KV attend request (one layer) to a worker",
             ("key",), ("median_ms", "p90_ms"), "ms"),
    PlotSpec("cpu_attention_bench", "cpu_attention_bandwidth",
             "CPU attention KV read rate vs host copy bandwidth",
             ("shape", "new tokens", "threads"), ("KV GB/s", "host copy GB/s"), "GB/s"),
    PlotSpec("apex_policies", "apex_tokens_s", "Throughput per APEX policy", ("policy",),
             ("tokens/s",), "tokens/s", note=APEX_NOTE),
    PlotSpec("apex_policies", "apex_tpot", "Time per output token per APEX policy",
             ("policy",), ("TPOT mean (ms)", "TPOT p90 (ms)"), "ms", note=APEX_NOTE),
    PlotSpec("stack_throughput", "stack_tokens_s", "Stack throughput per device count",
             ("devices",), ("tokens/s",), "tokens/s", series="mode"),
    PlotSpec("stack_throughput", "stack_tpot", "Mean TPOT per device count",
             ("devices",), ("TPOT mean / p90 ms",), "mean ms", series="mode"),
)  # fmt: skip


def number(cell: str) -> float | None:
    match = _NUMBER.match(cell)
    return float(match.group(1)) if match else None


def column(table: Table, name: str) -> int | None:
    """Index of the column called ``name``, or starting with it (headers carry units)."""
    heads = [h.strip().lower() for h in table.header]
    want = name.lower()
    for candidates in (
        [i for i, h in enumerate(heads) if h == want],
        [i for i, h in enumerate(heads) if h.startswith(want)],
    ):
        if candidates:
            return candidates[0]
    return None


def bars(spec: PlotSpec, table: Table) -> tuple[list[str], dict[str, list[float]]]:
    """Group labels and, per bar series, one value per group (NaN where a cell has none)."""
    xs = [column(table, c) for c in spec.x]
    ys = [column(table, c) for c in spec.y]
    labels: list[str] = []
    values: dict[str, list[float]] = {}
    if spec.series is None:
        for row in table.rows:
            labels.append(" ".join(row[i] for i in xs))
            for name, i in zip(spec.y, ys, strict=True):
                values.setdefault(name, []).append(_value(row[i]))
        return labels, values
    s = column(table, spec.series)
    cells: dict[tuple[str, str], float] = {}
    for row in table.rows:
        label = " ".join(row[i] for i in xs)
        if label not in labels:
            labels.append(label)
        values.setdefault(row[s], [])
        cells[label, row[s]] = _value(row[ys[0]])
    for name in values:
        values[name] = [cells.get((label, name), float("nan")) for label in labels]
    return labels, values


def _value(cell: str) -> float:
    got = number(cell)
    return float("nan") if got is None else got


def find_table(spec: PlotSpec, tables: list[Table]) -> Table | None:
    wanted = (*spec.x, *spec.y, *([spec.series] if spec.series else []))
    for table in tables:
        if table.rows and all(column(table, c) is not None for c in wanted):
            return table
    return None


def draw(spec: PlotSpec, table: Table, path: Path, measured_on: str) -> None:
    labels, values = bars(spec, table)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) * len(values)), 4.2))
    width = 0.8 / len(values)
    for k, (name, ys) in enumerate(values.items()):
        xs = [i + (k - (len(values) - 1) / 2) * width for i in range(len(labels))]
        drawn = ax.bar(xs, ys, width, label=name)
        ax.bar_label(drawn, fmt="%.3g", fontsize=7)
    ax.set_xticks(
        range(len(labels)),
        labels,
        rotation=20 if len(labels) > 4 else 0,
        ha="right" if len(labels) > 4 else "center",
        fontsize=8,
    )
    ax.set_xlabel(", ".join(spec.x))
    ax.set_ylabel(spec.ylabel)
    if len(values) > 1:
        ax.legend(fontsize=8)
    subtitle = f"measured on {measured_on}" + (f"\n{spec.note}" if spec.note else "")
    ax.set_title(f"{spec.title}\n{subtitle}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(tables: dict[str, list[Table]], out_dir: Path, measured_on: str) -> list[Plot]:
    """Every spec whose benchmark produced tables: drawn into ``out_dir``, or skipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    for spec in SPECS:
        if spec.bench not in tables:
            continue  # the benchmark did not run or failed: its section says so
        table = find_table(spec, tables[spec.bench])
        if table is None:
            need = ", ".join((*spec.x, *spec.y, *([spec.series] if spec.series else [])))
            plots.append(Plot(spec, None, f"no table with the columns {need}"))
            continue
        path = out_dir / f"{spec.name}.png"
        draw(spec, table, path, measured_on)
        plots.append(Plot(spec, path))
    return plots
