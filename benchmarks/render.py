"""Rewrites the documentation's benchmark figures from the results files, so that every figure there is
a row of ``benchmarks/results/`` and says which machine it came from.

    python benchmarks/render.py [--check] [--complete-results] [FILE.md ...]

The files are README.md and every ``docs/*.md`` unless named (the figures live in
``docs/benchmarks.md``, the headline ones in README.md). A figure is a block between two markers::

    <!-- results source=FILE bench=NAME where="COLUMN=V1,V2 ..." columns="COLUMN,COLUMN:LABEL,..." -->
    ...rewritten...
    <!-- /results -->

``source`` is a CSV under ``benchmarks/results/``, ``<family>/<machine>.csv`` (written by ``_harness.main``);
``bench`` picks its rows of one bench; ``where`` keeps the rows whose columns take one of the
listed values; ``columns`` are the table's columns in order, each optionally relabelled. The
block becomes a markdown table of the matching rows, in file order, followed by a line naming the
machine (device, CPU family/model, vector instruction sets, the measured FMA peak) and the dates,
versions and load averages of those rows. A figure whose filter matches no row is emptied: no
number stays in the documentation without a results row behind it. ``--check`` changes nothing and
exits with status 1 if a file differs from what the results give (``tests/app/test_bench_harness.py`` runs it).
``--complete-results`` first gives every row of every results file what its own columns determine and it
lacks (``_harness.complete_results``: ``fraction_of_peak`` and the machine columns added since it was
written), measuring nothing; ``tests/app/test_benchmark_results.py`` checks that every row has them.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def documents() -> list[Path]:
    """The files whose figures are rendered by default: README.md and every docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


BLOCK = re.compile(r"(<!-- results (?P<spec>.*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.DOTALL)


class FigureError(ValueError):
    """A marker that cannot be rendered: unknown source, bad spec, a column no row has."""


def parse_spec(spec: str) -> dict[str, str]:
    fields = {}
    for token in shlex.split(spec):
        name, sep, value = token.partition("=")
        if not sep or name not in ("source", "bench", "where", "columns"):
            raise FigureError(f"figure spec {spec!r}: expected source=, bench=, where=, columns=, got {token!r}")
        fields[name] = value
    missing = {"source", "bench", "columns"} - fields.keys()
    if missing:
        raise FigureError(f"figure spec {spec!r} lacks {sorted(missing)}")
    return fields


def read_rows(source: str, results_dir: Path) -> list[dict[str, str]]:
    path = results_dir / source
    if not path.is_file():
        raise FigureError(f"results file {path} does not exist")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def select(rows: list[dict[str, str]], bench: str, where: str) -> list[dict[str, str]]:
    conditions = [condition.split("=", 1) for condition in where.split()]
    if any(len(condition) != 2 for condition in conditions):
        raise FigureError(f"where={where!r}: every condition is COLUMN=VALUE[,VALUE...]")
    return [row for row in rows if row.get("bench") == bench
            and all(row.get(column, "") in values.split(",") for column, values in conditions)]


def _numeric_first(value: str) -> tuple:
    """Sort key: numbers by value (as text, "194.4" sorts before "32.76"), other text after them."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _span(values: list[str]) -> str:
    present = sorted({value for value in values if value}, key=_numeric_first)
    if not present:
        return "not recorded"
    return present[0] if len(present) == 1 else f"{present[0]} to {present[-1]}"


def machine_line(rows: list[dict[str, str]]) -> str:
    """Where the rows were measured, from their own columns; what they do not record is said."""
    devices = sorted({row.get("device", "") for row in rows})
    parts = [" / ".join(devices)]
    if family := _span([row.get("cpu_family_model", "") for row in rows]):
        parts.append(f"CPU family/model {family}")
    parts.append(f"vector ISA {_span([row.get('cpu_isa', '') for row in rows])}")
    cores, total = _span([row.get("peak_fp32_gflops_core", "") for row in rows]), _span(
        [row.get("peak_fp32_gflops_total", "") for row in rows])
    parts.append(f"measured fp32 FMA peak {cores} GFLOP/s per core, {total} all cores"
                 if cores != "not recorded" else "FMA peak not recorded")
    if (bf16 := _span([row.get("peak_bf16_gflops_core", "") for row in rows])) != "not recorded":
        parts.append(f"bf16 (vdpbf16ps) peak {bf16} GFLOP/s per core")
    if any(row.get("gpu_name") for row in rows):
        gpus, memory = _span([row.get("gpu_name", "") for row in rows]), _span(
            [row.get("gpu_memory_gib", "") for row in rows])
        parts.append(f"GPU {gpus} ({memory} GiB)")
    load = [float(row["load1"]) for row in rows if row.get("load1")]
    probe_load = [float(row["peak_load1"]) for row in rows if row.get("peak_load1")]
    if load:
        load_text = f"1-minute load {min(load):.1f} to {max(load):.1f}"
    elif probe_load:  # a bench that records no load per row: the load when the peak was probed
        load_text = f"1-minute load {min(probe_load):.1f} to {max(probe_load):.1f} when the peak was probed"
    else:
        load_text = "load not recorded"
    return (f"Measured on {', '.join(parts)}; {_span([row.get('date', '') for row in rows])}; {load_text}; "
            f"torch {_span([row.get('torch', '') for row in rows])}, "
            f"fastvq {_span([row.get('fastvq', '') for row in rows])}.")


def render_table(rows: list[dict[str, str]], columns: str) -> str:
    names, labels = [], []
    for entry in columns.split(","):
        name, _, label = entry.partition(":")
        names.append(name)
        labels.append(label or name)
    for name in names:
        if not any(name in row for row in rows):
            raise FigureError(f"column {name!r} is in no selected row")
    lines = ["| " + " | ".join(labels) + " |", "|" + "|".join(" --- " for _ in labels) + "|"]
    lines += ["| " + " | ".join(row.get(name, "") for name in names) + " |" for row in rows]
    return "\n".join(lines)


def render_block(spec: str, results_dir: Path) -> str:
    fields = parse_spec(spec)
    rows = select(read_rows(fields["source"], results_dir), fields["bench"], fields.get("where", ""))
    if not rows:
        return ""
    return f"{render_table(rows, fields['columns'])}\n\n{machine_line(rows)}\n"


def render(text: str, results_dir: Path = RESULTS_DIR) -> str:
    return BLOCK.sub(lambda match: match.group(1) + render_block(match.group("spec"), results_dir) + match.group(4),
                     text)


def complete_results_files(results_dir: Path) -> None:
    """``_harness.complete_results`` on every ``<family>/<machine>.csv`` under ``results_dir``."""
    import _harness  # torch and fastvq: only for this option, not for rendering

    for path in sorted(results_dir.glob("*/*.csv")):
        _harness.complete_results(path)
        print(f"completed {path}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is not what the results give")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--complete-results", action="store_true",
                        help="first fill what each results row's own columns determine (fraction_of_peak, ...)")
    parser.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    if args.complete_results:
        complete_results_files(args.results)
    stale = []
    for path in args.files or documents():
        text = path.read_text()
        rendered = render(text, args.results)
        if rendered == text:
            continue
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True), str(path),
                                                       "rendered"))
            stale.append(path)
        else:
            path.write_text(rendered)
            print(f"rendered {len(BLOCK.findall(text))} figures in {path}")
    if stale:
        print(f"\n{', '.join(map(str, stale))} out of date with {args.results}: run python benchmarks/render.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
