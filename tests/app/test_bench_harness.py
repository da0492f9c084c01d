"""The benchmark harness's machine columns and the README's rendered figures.

``benchmarks/_harness.py`` gives every results row the machine it ran on and how close it came to
that machine's measured peak; ``benchmarks/render.py`` rewrites the README's tables from the
results files. These tests check both, and that the README is what the results give.
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
    assert "fraction_of_peak" not in row  # no throughput, no fraction


def test_results_files_carry_the_machine_columns(test_machine, tmp_path):
    rows = [{"bench": "b", "impl": "i", "N": 3, "tflops": 0.019, "threads": 1}]
    csv_path, md_path = _harness.write_results(rows, "cpu", ("N",), tmp_path)
    (stored,) = list(csv.DictReader(csv_path.open()))
    assert stored["cpu_family_model"] == "25/17" and stored["fraction_of_peak"] == "0.19"
    assert "family" in csv_path.name or not _harness._cpu_family_model()
    assert "cpu_family_model: 25/17" in md_path.read_text()


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


def test_the_readme_figures_are_what_the_results_files_give():
    assert render.main(["--check"]) == 0, "README.md is out of date: run python benchmarks/render.py"
