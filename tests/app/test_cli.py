"""The ``fastvq`` command end to end at tiny settings: train, resume, prior, sample, info, bench, errors."""

import json
import subprocess
import sys

import pytest
import torch

from fastvq import cli
from fastvq.train import checkpoint

RUNTIME = ["--no-progress", "--threads", "1", "--device", "cpu"]
TINY_VQVAE = ["--channels", "16", "--embedding-dim", "8", "--codebook-size", "16", "--batch-size", "128"]
TINY_PRIOR = ["--channels", "16", "--layers", "1", "--epochs", "1", "--batch-size", "256"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(*args):
    return cli.main([str(arg) for arg in args])


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG


def test_train_prior_sample(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--model", "vqvae", "--data", "digits", "--out", out, "--epochs", 2, *TINY_VQVAE, *RUNTIME) == 0
    rows = _metrics(out / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in ("val_nmse", "perplexity", "codes_used", "codebook_size", "val_loss", "train_loss"):
        assert key in rows[-1], key
    assert rows[-1]["codebook_size"] == 16 and 0 < rows[-1]["val_nmse"] < 2
    assert 1 <= rows[-1]["perplexity"] <= 16 and 1 <= rows[-1]["codes_used"] <= 16
    assert _is_png(out / "reconstructions.png") and _is_png(out / "codebook_usage.png")
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "vqvae" and config["model_args"]["codebook_size"] == 16
    assert "val_nmse" in capsys.readouterr().out

    assert run("prior", "--run", out, "--model", "gated-pixelcnn", *TINY_PRIOR, *RUNTIME) == 0
    prior_rows = _metrics(out / "prior_metrics.jsonl")
    assert prior_rows[-1]["epoch"] == 1 and prior_rows[-1]["val_bits_per_code"] > 0
    assert run("sample", "--run", out, "-n", 6, "--top-k", 4, "--threads", 1) == 0
    assert _is_png(out / "samples.png")

    assert run("prior", "--run", out, *TINY_PRIOR, *RUNTIME) == 0  # the default prior, a GPT
    assert torch.load(out / "prior.pt", weights_only=True)["config"]["prior"] == "gpt"
    picture = tmp_path / "nucleus.png"
    assert run("sample", "--run", out, "-n", 3, "--top-p", 0.8, "--temperature", 0.7, "--out", picture) == 0
    assert _is_png(picture)


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    flags = ["--model", "vqvae", "--epochs", 2, *TINY_VQVAE, *RUNTIME]
    assert run("train", "--out", straight, *flags) == 0

    saves = []
    original = checkpoint.atomic_save

    def crash_after_first_checkpoint(obj, path):
        original(obj, path)
        saves.append(path)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(checkpoint, "atomic_save", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run("train", "--out", interrupted, *flags)
    monkeypatch.setattr(checkpoint, "atomic_save", original)
    # The run stopped after writing the epoch-1 checkpoint, before its metrics row.
    assert len(saves) == 1 and not (interrupted / "metrics.jsonl").exists()

    assert run("train", "--out", interrupted, "--resume", *RUNTIME) == 0
    assert [row["epoch"] for row in _metrics(interrupted / "metrics.jsonl")] == [1, 2]
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after resuming"
    # A finished run is left alone; --epochs extends it.
    assert run("train", "--out", interrupted, "--resume", *RUNTIME) == 0
    assert run("train", "--out", interrupted, "--resume", "--epochs", 3, *RUNTIME) == 0
    assert [row["epoch"] for row in _metrics(interrupted / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("model, flags, prior", [
    ("vqvae2", TINY_VQVAE, "gated-pixelcnn"),
    ("vqvae2", TINY_VQVAE, "gpt"),
    ("rqvae", [*TINY_VQVAE, "--depth", "2"], "gpt"),
    ("vit-vqgan", ["--channels", "16", "--layers", "1", "--embedding-dim", "4", "--codebook-size", "16",
                   "--adversarial-start", "0", "--batch-size", "128"], "pixelcnn"),
])
def test_every_model_trains_and_samples(tmp_path, model, flags, prior):
    out = tmp_path / model
    assert run("train", "--model", model, "--out", out, "--epochs", 1, *flags, *RUNTIME) == 0
    row = _metrics(out / "metrics.jsonl")[-1]
    assert 0 < row["val_nmse"] < 10 and row["codes_used"] >= 1
    if model == "vqvae2":
        assert len(row["perplexity_per_codebook"]) == 2
    assert run("prior", "--run", out, "--model", prior, *TINY_PRIOR, *RUNTIME) == 0
    assert run("sample", "--run", out, "-n", 2, "--threads", 1) == 0
    assert _is_png(out / "samples.png")


@pytest.mark.parametrize("args, message", [
    (["train", "--out", "{tmp}/r"], "--model is required"),
    (["train", "--model", "vqvae", "--depth", "2", "--out", "{tmp}/r"], "--depth does not apply to --model vqvae"),
    (["train", "--model", "vqvae", "--data", "mnist:{tmp}/nowhere", "--out", "{tmp}/r"], "nowhere"),
    (["train", "--model", "vqvae", "--data", "svhn", "--out", "{tmp}/r"], "unknown dataset"),
    (["prior", "--run", "{tmp}/missing"], "checkpoint.pt not found"),
    (["sample", "--run", "{tmp}/missing"], "checkpoint.pt not found"),
])
def test_errors_are_messages_not_tracebacks(tmp_path, capsys, args, message):
    assert run(*[arg.format(tmp=tmp_path) for arg in args]) == 2
    assert message in capsys.readouterr().err


def test_run_protection_and_resume_conflicts(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--model", "rqvae", "--out", out, "--epochs", 1, *TINY_VQVAE, "--depth", "2", *RUNTIME) == 0
    capsys.readouterr()
    assert run("train", "--model", "vqvae", "--out", out, *RUNTIME) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run("train", "--out", out, "--resume", "--codebook-size", "32", *RUNTIME) == 2
    assert "drop --codebook-size" in capsys.readouterr().err
    assert run("prior", "--run", out, "--model", "pixelcnn", *RUNTIME) == 2
    assert "--model gpt" in capsys.readouterr().err
    assert run("sample", "--run", out) == 2
    assert "prior.pt not found" in capsys.readouterr().err


def test_info_lists_versions_and_backends(capsys):
    assert run("info") == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and "nearest_code" in text


def test_bench_lists_the_scripts_and_explains_a_missing_checkout(capsys, monkeypatch):
    if cli.benchmarks_dir() is None:
        pytest.skip("not a source checkout")
    assert run("bench", "--list") == 0
    assert "search" in capsys.readouterr().out
    assert run("bench", "no-such-bench") == 2
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: None)
    assert run("bench") == 2
    assert "source checkout" in capsys.readouterr().err


def test_python_dash_m_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "fastvq", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("fastvq ")


def test_maskgit_prior_and_parallel_sampling(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--model", "vqvae", "--out", out, "--epochs", 1, *TINY_VQVAE, *RUNTIME) == 0
    assert run("prior", "--run", out, "--model", "maskgit", *TINY_PRIOR, *RUNTIME) == 0
    row = _metrics(out / "prior_metrics.jsonl")[-1]
    assert row["val_masked_bits_per_code"] > 0 and "val_bits_per_code" not in row
    assert "bits per masked code" in capsys.readouterr().out
    assert torch.load(out / "prior.pt", weights_only=True)["config"]["prior"] == "maskgit"
    assert run("sample", "--run", out, "-n", 3, "--steps", 2, "--top-p", 0.9, "--threads", 1) == 0
    assert _is_png(out / "samples.png")
    assert run("prior", "--run", out, *TINY_PRIOR, *RUNTIME) == 0  # a GPT now: --steps is refused
    assert run("sample", "--run", out, "-n", 2, "--steps", 2, "--threads", 1) == 2
    assert "steps (parallel decoding steps) needs the maskgit prior" in capsys.readouterr().err


@pytest.mark.parametrize("model, flags", [("vqvae2", TINY_VQVAE), ("rqvae", [*TINY_VQVAE, "--depth", "2"])])
def test_maskgit_on_hierarchical_and_residual_codes(tmp_path, model, flags):
    out = tmp_path / model
    assert run("train", "--model", model, "--out", out, "--epochs", 1, *flags, *RUNTIME) == 0
    assert run("prior", "--run", out, "--model", "maskgit", *TINY_PRIOR, *RUNTIME) == 0
    assert run("sample", "--run", out, "-n", 2, "--steps", 3, "--threads", 1) == 0
    assert _is_png(out / "samples.png")


def test_training_curves_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert run("train", "--model", "vqvae", "--out", out, "--epochs", 2, *TINY_VQVAE, *RUNTIME) == 0
    assert _is_png(out / "training_curves.png")
    assert run("prior", "--run", out, "--model", "gpt", *TINY_PRIOR, *RUNTIME) == 0
    assert _is_png(out / "prior_curves.png")


def test_training_curves_without_matplotlib_are_one_line_of_notice(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = tmp_path / "run"
    assert run("train", "--model", "vqvae", "--out", out, "--epochs", 1, *TINY_VQVAE, *RUNTIME) == 0
    assert not (out / "training_curves.png").exists()
    notice = [line for line in capsys.readouterr().out.splitlines() if "matplotlib" in line]
    assert notice == ["training curves not drawn (training_curves.png): "
                      "matplotlib is not installed (pip install matplotlib)"]
