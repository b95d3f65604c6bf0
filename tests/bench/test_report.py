"""The benchmark report's parsing, failure notes and plots, on canned output (no benchmark runs)."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from sled_bench import plots
from sled_bench.report import (
    BENCHES,
    Bench,
    Outcome,
    Table,
    failure_note,
    json_table,
    parse_json,
    parse_tables,
    render,
    run_bench,
    tables_of,
)

ACCEPTANCE_OUT = """\
machine: x86_64, 10 concurrent sessions, 16 new tokens, K=4 adaptive, greedy; measured
| draft | acceptance | tokens/round | draft ms/token | verify ms/round (share of batch) | tokens/s |
|---|---|---|---|---|---|
| smollm2-135m-int4 | 0.812 | 3.90 | 4.1 | 20.3 | 55.0 |
| ngram | 0.250 | 1.80 | 0.1 | 18.0 | 30.5 |
| broken | row |
done
"""
STACK_OUT = """\
| devices | mode | tokens/s | TPOT mean / p90 ms |
|---|---|---|---|
| 1 | sled | 20.0 | 50 / 60 |
| 1 | k0 | 10.0 | 100 / 120 |
| 2 | sled | 30.0 | 66 / 80 |
"""
FACTS = {"CPU": "Test CPU", "logical CPUs": "2 (2 usable by this run)", "RAM": "1.0 GiB",
         "GPU": "none"}  # fmt: skip


def outcome(name: str, returncode: int | None, stdout: str = "", stderr: str = "") -> Outcome:
    bench = next(b for b in BENCHES if b.name == name)
    return Outcome(bench, ["python", "-m", f"sled_bench.{name}"], returncode,
                   returncode is None, 60.0, 61.0, 1.0, 2.0, stdout, stderr)  # fmt: skip


def test_parse_tables_reads_header_rows_and_caption_and_drops_malformed_rows() -> None:
    (table,) = parse_tables(ACCEPTANCE_OUT)
    assert table.caption.startswith("machine: x86_64")
    assert table.header[:2] == ["draft", "acceptance"]
    assert [r[0] for r in table.rows] == ["smollm2-135m-int4", "ngram"]
    assert table.rows[1][-1] == "30.5"
    assert parse_tables("no table | here\n|---|\n") == []


def test_several_tables_and_json() -> None:
    assert len(parse_tables(ACCEPTANCE_OUT + "\n" + STACK_OUT)) == 2
    doc = parse_json('{"machine": "m", "end_to_end": {"median_ms": 1.5, "p90_ms": 2.0}}')
    table = json_table(doc)
    assert table == Table("", ["key", "median_ms", "p90_ms"], [["end_to_end", "1.5", "2"]])
    assert parse_json(ACCEPTANCE_OUT) is None


def test_cells_to_numbers() -> None:
    assert plots.number("0.813 (640 positions)") == 0.813
    assert plots.number("12.1 / 15.3") == 12.1
    assert plots.number("45%") == 45.0
    assert plots.number("-") is None


def test_series_pivot_leaves_missing_cells_empty() -> None:
    spec = next(s for s in plots.SPECS if s.name == "stack_tokens_s")
    labels, values = plots.bars(spec, parse_tables(STACK_OUT)[0])
    assert labels == ["1", "2"]
    assert values["sled"] == [20.0, 30.0]
    assert values["k0"][0] == 10.0 and values["k0"][1] != values["k0"][1]  # NaN: not measured


def test_failure_note_shows_stderr_tail_and_no_figures() -> None:
    stderr = "\n".join(f"line {i}" for i in range(100)) + "\nRuntimeError: boom"
    note = failure_note(outcome("apex_policies", 1, "| partial |", stderr))
    assert "**FAILED** with exit code 1" in note
    assert "no figures" in note
    assert "RuntimeError: boom" in note and "line 99" in note and "line 5\n" not in note
    assert "incomplete run, not plotted" in note and "| partial |" in note
    timed_out = failure_note(outcome("stack_throughput", None))
    assert "**TIMED OUT** at its 60 s limit" in timed_out


def test_report_embeds_tables_and_plots_only_what_ran(tmp_path: Path) -> None:
    ok = outcome("acceptance", 0, ACCEPTANCE_OUT)
    failed = outcome("apex_policies", 1, "", "Traceback\nValueError: no model")
    drawn = plots.make_plots({"acceptance": tables_of(ok)}, tmp_path / "plots", "Test CPU")
    ok.plots = drawn
    assert {p.spec.bench for p in drawn} == {"acceptance"}
    assert all(p.path is not None and p.path.stat().st_size > 0 for p in drawn)
    now = datetime.now().astimezone()
    text = render("report --quick", FACTS, (now, now), ((1.0,) * 3, (2.0,) * 3), True,
                  [ok, failed], tmp_path)  # fmt: skip
    assert "- [apex_policies](#apex_policies): FAILED (exit code 1)" in text
    assert "ValueError: no model" in text
    assert "greedy; measured\n\n| draft | acceptance" in text  # blank line: the table renders
    assert "](plots/acceptance_rate.png)" in text
    assert "measured on Test CPU" in text


def test_timeout_interrupts_the_benchmark(tmp_path: Path) -> None:
    bench = Bench("sleeper", (), (), 1, 1)
    argv = [sys.executable, "-c", "import time\ntry: time.sleep(60)\nfinally: print('cleaned')"]
    got = run_bench(bench, argv, tmp_path, timeout_s=1.0)
    assert got.timed_out and not got.ok
    assert "cleaned" in got.stdout  # SIGINT let its cleanup run
    assert got.wall_s < 30
