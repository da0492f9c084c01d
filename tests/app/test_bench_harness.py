"""The benchmark harness's command line, machine columns and results layout, and the rendered figures.

``benchmarks/_harness.py`` runs every bench script (``main``: the common options, the loop over
points and thread counts, ``results/<family>/<machine>.csv``) and gives every results row the
machine it ran on and how close it came to that machine's measured peak; ``benchmarks/render.py``
rewrites the documentation's tables from the results files. These tests check both, and that
README.md and docs/ are what the results give.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
from _backends import CPP_MISSING_REASON, HAS_CPP

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _harness  # noqa: E402
import render  # noqa: E402

MACHINE = {"cpu_model": "Test CPU", "cpu_family_model": "25/17", "cpu_cores": 2, "cpu_isa": "AVX2+AVX-512F",
           "peak_fp32_gflops_core": 100.0, "peak_fp32_gflops_total": 190.0, "peak_bf16_gflops_core": 200.0,
           "peak_bf16_gflops_total": 380.0, "peak_load1": 0.5, "gpu_peak_fp32_tflops": None,
           "gpu_peak_tf32_tflops": None, "gpu_peak_bf16_tflops": None}


@pytest.fixture
def test_machine(monkeypatch):
    monkeypatch.setattr(_harness, "machine", lambda device: dict(MACHINE))


@pytest.mark.parametrize("threads, isa, expected_peak", [(1, "AVX2", 100.0), (2, "AVX2", 190.0),
                                                          (1, "AVX512-BF16", 200.0), (2, "AVX512-BF16", 380.0)])
def test_rows_get_machine_columns_and_fraction_of_peak(test_machine, threads, isa, expected_peak):
    row = _harness.with_machine_columns({"bench": "b", "impl": "i", "tflops": 0.05, "threads": threads,
                                         "vector_isa": isa}, "cpu")
    assert {name: row[name] for name in MACHINE} == MACHINE
    assert row["peak_gflops"] == expected_peak
    assert math.isclose(row["fraction_of_peak"], 50.0 / expected_peak)


def test_what_a_row_says_is_kept_and_what_it_lacks_is_filled(test_machine):
    row = _harness.with_machine_columns({"bench": "b", "impl": "i", "cpu_model": "Other", "median_ms": 1.0}, "cpu")
    assert row["cpu_model"] == "Other"
    assert row["threads"] == torch.get_num_threads()
    assert row["vector_isa"] in ("AVX-512F", "AVX2") or row["vector_isa"] == torch.backends.cpu.get_cpu_capability()
    # No throughput, no fraction: the row says why instead of leaving the column out.
    assert row["fraction_of_peak"] == _harness.NO_FLOP_COUNT and "peak_gflops" not in row


def test_results_files_carry_the_machine_columns(test_machine, tmp_path):
    rows = [{"bench": "b", "impl": "i", "N": 3, "tflops": 0.019, "threads": 1}]
    csv_path, md_path = _harness.write_results(rows, "cpu", ("N",), tmp_path)
    (stored,) = list(csv.DictReader(csv_path.open()))
    assert stored["cpu_family_model"] == "25/17" and stored["fraction_of_peak"] == "0.19"
    assert "family" in csv_path.name or not _harness._cpu_family_model()
    assert "cpu_family_model: 25/17" in md_path.read_text()


@pytest.mark.parametrize("family_model, slug", [("1", "amd-epyc-family-25-model-1-2-cores"),
                                                 ("17", "amd-epyc-family-25-model-17-2-cores")])
def test_one_slug_per_machine_tells_zen_3_from_zen_4(monkeypatch, family_model, slug):
    fields = {"model name": "AMD EPYC", "cpu family": "25", "model": family_model}
    monkeypatch.setattr(_harness, "_cpuinfo_field", fields.__getitem__)
    monkeypatch.setattr(_harness.os, "sched_getaffinity", lambda pid: {0, 1})
    assert _harness.device_slug("cpu") == slug


def _toy_bench(tmp_path, argv, notes=("", "")):
    """Runs ``_harness.main`` on a bench of two points whose rows record the thread count they saw."""
    seen = []

    def points(args):
        return [(4, "small" if args.small else "full", args.scale), (8, "small" if args.small else "full", args.scale)]

    def measure(point, run):
        seen.append((point, run.threads, torch.get_num_threads(), run.first_threads))
        size, grid, _ = point
        return [{"bench": "toy", "impl": "fastvq", "N": size, "grid": grid, "median_ms": 1.0,
                 "note": notes[size == 8]}]

    status = _harness.main("toy", points, measure, ("N", "grid"), ("impl", "N", "threads", "median_ms"),
                           description="toy", argv=["--out", str(tmp_path), *argv],
                           add_arguments=lambda parser: parser.add_argument("--scale", type=int, default=1))
    return status, seen


def test_main_owns_the_command_line_and_the_results_layout(test_machine, tmp_path, monkeypatch):
    monkeypatch.setattr(_harness, "device_slug", lambda device: "test-machine")
    previous_threads = torch.get_num_threads()
    try:
        status, seen = _toy_bench(tmp_path, ["--device", "cpu", "--small", "--threads", "1", "2", "--scale", "3"])
    finally:
        torch.set_num_threads(previous_threads)
    assert status == 0
    # every point at every thread count, the count set before the call; the bench's own option parsed
    assert [(point, threads, set_threads) for point, threads, set_threads, _ in seen] == [
        ((4, "small", 3), 1, 1), ((4, "small", 3), 2, 2), ((8, "small", 3), 1, 1), ((8, "small", 3), 2, 2)]
    assert [first for *_, first in seen] == [True, False, True, False]
    rows = list(csv.DictReader((tmp_path / "toy" / "test-machine.csv").open()))
    assert [(row["N"], row["threads"]) for row in rows] == [("4", "1"), ("4", "2"), ("8", "1"), ("8", "2")]
    assert rows[0]["cpu_family_model"] == "25/17" and rows[0]["torch"] == torch.__version__
    assert (tmp_path / "toy" / "test-machine.md").is_file()


def test_main_exits_1_when_a_row_failed(test_machine, tmp_path, monkeypatch):
    monkeypatch.setattr(_harness, "device_slug", lambda device: "test-machine")
    status, _ = _toy_bench(tmp_path, ["--device", "cpu", "--threads", "1"], notes=("", "failed: RuntimeError: x"))
    assert status == 1
    with pytest.raises(SystemExit):
        _toy_bench(tmp_path, ["--device", "cpu", "--threads", "0"])


@pytest.mark.skipif(not HAS_CPP, reason=f"fastvq._C is not available: {CPP_MISSING_REASON}")
def test_the_fma_probe_measures_what_the_cpu_runs():
    isas = _harness.cpu_isas()
    if "AVX2" not in isas:
        pytest.skip(f"this CPU runs none of the probe's instruction sets ({isas})")
    gflops = torch.ops.fastvq_C.cpu_peak_gflops("avx2", 1, 200_000)
    assert math.isfinite(gflops) and gflops > 0.5
    with pytest.raises(ValueError, match="isa must be"):
        torch.ops.fastvq_C.cpu_peak_gflops("sse9", 1, 10)
    if "AVX-512F" not in isas:
        with pytest.raises(ValueError, match="no AVX-512F"):
            torch.ops.fastvq_C.cpu_peak_gflops("avx512f", 1, 10)


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_render_fills_a_figure_from_its_rows_and_names_the_machine(tmp_path):
    _write(tmp_path / "m.csv", [
        {"bench": "s", "impl": "fastvq", "N": "4", "median_ms": "1.5", "device": "CPU X, 2 cores",
         "cpu_family_model": "25/1", "cpu_isa": "AVX2", "peak_fp32_gflops_core": "80", "peak_fp32_gflops_total": "150",
         "load1": "0.5", "date": "2026-12-01", "torch": "2.13.0", "fastvq": "0.1.0"},
        {"bench": "s", "impl": "other", "N": "4", "median_ms": "9", "device": "CPU X, 2 cores"},
    ])
    text = ('a\n<!-- results source=m.csv bench=s where="impl=fastvq" columns="N,median_ms:ms" -->\nold 34.6 ms\n'
            '<!-- /results -->\n<!-- results source=m.csv bench=s where="impl=gone" columns="N" -->\nstale\n'
            '<!-- /results -->\n')
    rendered = render.render(text, tmp_path)
    assert "| N | ms |" in rendered and "| 4 | 1.5 |" in rendered and "| 9 |" not in rendered
    assert "CPU family/model 25/1" in rendered and "80 GFLOP/s per core" in rendered
    assert "34.6" not in rendered and "stale" not in rendered  # a figure without rows is removed
    assert render.render(rendered, tmp_path) == rendered


def test_render_rejects_a_figure_it_cannot_draw(tmp_path):
    _write(tmp_path / "m.csv", [{"bench": "s", "impl": "fastvq", "N": "4"}])
    with pytest.raises(render.FigureError, match="no selected row"):
        render.render('<!-- results source=m.csv bench=s columns="nope" -->\n<!-- /results -->', tmp_path)
    with pytest.raises(render.FigureError, match="does not exist"):
        render.render('<!-- results source=none.csv bench=s columns="N" -->\n<!-- /results -->', tmp_path)


def test_the_documented_figures_are_what_the_results_files_give():
    assert render.main(["--check"]) == 0, "README.md or docs/ is out of date: run python benchmarks/render.py"
