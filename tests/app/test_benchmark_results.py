"""Every results file names the machine it was measured on and how close each row came to its peak.

``benchmarks/results/<family>/<machine>.csv`` is what the documentation's figures are rendered from
(``benchmarks/render.py``), so each of its rows must say which CPU or GPU it ran on and carry
``fraction_of_peak``: a number, or a text beginning with ``n/a:`` that says why there is none
(``_harness.with_fraction_of_peak``). The GPU device run (``benchmarks/gpu/run.sh``) cannot run here:
these tests check, without a GPU, that its command lines are ones its benches accept and that the
harness gives GPU rows the card's name, memory and fraction of its peak. Nothing is measured.
"""

from __future__ import annotations

import csv
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
sys.path.insert(0, str(BENCHMARKS))
import _harness  # noqa: E402
import render  # noqa: E402

RESULT_FILES = sorted(RESULTS.glob("*/*.csv"))


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _is_fraction(value: str) -> bool:
    try:
        number = float(value)
    except ValueError:
        return False
    return math.isfinite(number) and number > 0


def test_there_are_results_files():
    assert len(RESULT_FILES) >= 5, f"expected the results files under {RESULTS}"


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_row_names_its_cpu_or_gpu_and_its_fraction_of_peak(path):
    columns, rows = _rows(path)
    assert "fraction_of_peak" in columns, f"{path}: no fraction_of_peak column (python benchmarks/render.py " \
                                          "--complete-results fills what the rows' own columns give)"
    assert rows, f"{path} holds no rows"
    for number, row in enumerate(rows, start=2):
        where = f"{path.relative_to(ROOT)} line {number} ({row.get('bench')}, {row.get('impl')})"
        assert row.get("cpu_model") or row.get("gpu_name"), f"{where} names no CPU model or GPU"
        if row.get("gpu_peak_fp32_tflops"):  # measured on a GPU: the card itself is named
            assert row.get("gpu_name") and row.get("gpu_memory_gib"), f"{where}: a GPU row without the card's name"
        fraction = row["fraction_of_peak"]
        assert _is_fraction(fraction) or fraction.startswith("n/a: "), f"{where}: fraction_of_peak {fraction!r}"
        if row.get("tflops") and row.get("peak_fp32_gflops_core") or row.get("tflops") and row.get("gpu_name"):
            assert _is_fraction(fraction), f"{where} has tflops {row['tflops']} and a peak but no fraction"
            assert row.get("peak_gflops"), f"{where}: the peak it is held against is not recorded"


def test_every_report_has_its_results_file_and_the_other_way_round():
    # README.md files describe a folder; every other .md is the report written beside a .csv.
    reports = {path.with_suffix("") for path in RESULTS.glob("*/*.md") if path.name != "README.md"}
    tables = {path.with_suffix("") for path in RESULT_FILES}
    assert reports == tables, f"reports without a .csv: {sorted(reports - tables)}; " \
                              f".csv without a report: {sorted(tables - reports)}"
    assert not list(RESULTS.glob("*.csv")) and not list(RESULTS.glob("*.md")), \
        "results files belong in results/<family>/"


MEASURED = {"gpu_peak_fp32_tflops": 51.0, "gpu_peak_tf32_tflops": 370.0, "gpu_peak_bf16_tflops": 780.0}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Makes the harness believe it runs on the GPU named by the test (no CUDA call is made)."""

    def install(name: str, memory_bytes: int) -> None:
        columns = dict.fromkeys(_harness.MACHINE_COLUMNS)
        columns.update(cpu_model="Host CPU", cpu_family_model="25/17", cpu_cores=16, cpu_isa="AVX2+AVX-512F")
        columns.update(_harness.gpu_columns(name, memory_bytes, 132, dict(MEASURED)))
        monkeypatch.setattr(_harness, "machine", lambda device: dict(columns))
        monkeypatch.setattr(_harness, "describe_device", lambda device: name)

    return install


@pytest.mark.parametrize("name, memory_bytes, bf16_datasheet", [
    ("NVIDIA H100 80GB HBM3", 85_520_809_984, 989.5),
    ("NVIDIA H200", 150_754_820_096, 989.5),
])
def test_gpu_rows_name_the_card_and_its_fraction_of_peak(fake_gpu, tmp_path, name, memory_bytes, bf16_datasheet):
    fake_gpu(name, memory_bytes)
    rows = [{"bench": "nearest_code", "impl": "fastvq", "N": 1, "dtype": "bf16", "tflops": 390.0},
            {"bench": "nearest_code", "impl": "fastvq", "N": 2, "dtype": "fp32", "tflops": 25.5},
            {"bench": "masked_conv2d fwd", "impl": "fastvq", "N": 3, "dtype": "tf32", "tflops": 185.0},
            {"bench": "pixelcnn_sample", "impl": "fast", "N": 4, "median_ms": 3.0}]
    csv_path, md_path = _harness.write_results(rows, "cuda", ("N",), tmp_path)
    assert csv_path.name == _harness.device_slug("cuda") + ".csv" and md_path.exists()
    _, stored = _rows(csv_path)
    assert all(row["gpu_name"] == name and row["cpu_model"] == "Host CPU" for row in stored)
    assert all(math.isclose(float(row["gpu_memory_gib"]), memory_bytes / 2**30, rel_tol=1e-3) for row in stored)
    bf16, fp32, tf32, sampler = stored
    assert math.isclose(float(bf16["fraction_of_peak"]), 390.0 / 780.0, rel_tol=1e-3)
    assert math.isclose(float(bf16["fraction_of_datasheet_peak"]), 390.0 / bf16_datasheet, rel_tol=1e-3)
    assert math.isclose(float(fp32["fraction_of_peak"]), 25.5 / 51.0, rel_tol=1e-3)
    assert math.isclose(float(tf32["fraction_of_peak"]), 185.0 / 370.0, rel_tol=1e-3)
    assert sampler["fraction_of_peak"] == _harness.NO_FLOP_COUNT
    assert name in md_path.read_text()
    assert f"GPU {name} ({float(stored[0]['gpu_memory_gib']):.4g} GiB)" in render.machine_line(stored)


def test_a_card_without_data_sheet_figures_says_so(fake_gpu):
    fake_gpu("NVIDIA A100-SXM4-80GB", 85_899_345_920)
    row = _harness.with_machine_columns({"bench": "b", "impl": "i", "dtype": "bf16", "tflops": 200.0}, "cuda")
    assert row["gpu_datasheet_bf16_tflops"] is None
    assert row["fraction_of_datasheet_peak"].startswith("n/a: ")
    assert math.isclose(row["fraction_of_peak"], 200.0 / 780.0)


def test_stored_rows_get_their_fraction_from_their_own_columns(tmp_path):
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["bench", "impl", "threads", "tflops", "device", "cpu_model",
                                                    "cpu_cores", "peak_fp32_gflops_core", "peak_fp32_gflops_total",
                                                    "vector_isa"])
        writer.writeheader()
        writer.writerow({"bench": "s", "impl": "a", "threads": 1, "tflops": 0.05, "device": "CPU X",
                         "cpu_model": "CPU X", "cpu_cores": 2, "peak_fp32_gflops_core": 100,
                         "peak_fp32_gflops_total": 190, "vector_isa": "AVX-512F"})
        writer.writerow({"bench": "t", "impl": "b", "threads": 1, "device": "CPU X", "cpu_model": "CPU X"})
    _harness.complete_results(path)
    _, (searched, other) = _rows(path)
    assert searched["fraction_of_peak"] == "0.5" and searched["peak_gflops"] == "100"
    assert other["fraction_of_peak"] == _harness.NO_FLOP_COUNT
    assert "CPU X" in path.with_suffix(".md").read_text()


def _device_run_bench_commands(rehearsal: bool) -> list[list[str]]:
    environment = {"PATH": "/usr/bin:/bin", "FASTVQ_GPU_REHEARSAL": "1" if rehearsal else "0"}
    printed = subprocess.run(["bash", str(BENCHMARKS / "gpu" / "run.sh"), "--dry-run"], capture_output=True,
                             text=True, check=True, env=environment, timeout=60).stdout
    commands = [shlex.split(line.split(": ", 1)[1]) for line in printed.splitlines() if line.startswith("step ")]
    return [command[1:] for command in commands if command[1].startswith("benchmarks/bench_")]


@pytest.mark.parametrize("rehearsal", [False, True], ids=["gpu", "cpu-rehearsal"])
def test_the_device_run_calls_its_benches_with_options_they_accept(rehearsal, capsys):
    commands = _device_run_bench_commands(rehearsal)
    assert {Path(command[0]).stem for command in commands} == {"bench_search", "bench_layers", "bench_masked_conv"}
    for script, *arguments in commands:
        source = (ROOT / script).read_text()
        # Rows reach the results files only through the harness, which adds the device columns.
        assert "_harness.main(" in source, f"{script} does not write its rows through _harness.main"
        module = __import__(Path(script).stem)
        assert module.main([*arguments, "--list"]) == 0, f"{script} {' '.join(arguments)}"
        listed = capsys.readouterr().out
        assert listed.strip(), f"{script} {' '.join(arguments)} lists no point"


def test_the_device_run_explains_itself():
    shown = subprocess.run(["bash", str(BENCHMARKS / "gpu" / "run.sh"), "--help"], capture_output=True, text=True,
                           check=True, timeout=60).stdout
    assert "H100" in shown and "H200" in shown and "--dry-run" in shown
    refused = subprocess.run(["bash", str(BENCHMARKS / "gpu" / "run.sh"), "--bogus"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "usage" in refused.stderr
