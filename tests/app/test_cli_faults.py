"""Fault injection on the ``fastvq`` command: read-only run directories (before and during a run),
torn metrics, swapped, foreign and corrupted checkpoints. Each must end as ``fastvq X: error: ...``
with exit status 2, never a traceback, and never sample or resume silently from the wrong file.

Root ignores file permissions, so where the tests run as root the command runs with the effective
user ``nobody`` (``os.seteuid``, undone afterwards) in a directory that user owns: a read-only
directory then refuses writes for real, and every test checks that it does before relying on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  (see unprivileged())

from fastvq import cli
from fastvq.train import checkpoint, stage1

RUNTIME = ["--no-progress", "--threads", "1", "--device", "cpu"]
TINY_VQVAE = ["--model", "vqvae", "--channels", "16", "--embedding-dim", "8", "--codebook-size", "16",
              "--batch-size", "256", "--res-blocks", "1"]
TINY_PRIOR = ["--model", "gpt", "--channels", "16", "--layers", "1", "--epochs", "1", "--batch-size", "256"]
NOBODY = 65534
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def unprivileged():
    """Runs the block as ``nobody`` when the tests run as root (whom permissions do not stop).

    Modules are imported as root beforehand: nobody may not read the interpreter's own standard
    library (a pyenv Python under a 0700 /root), and torch.optim imports torch._dynamo lazily."""
    if not AS_ROOT or os.geteuid() != 0:  # not root, or already nobody (an enclosing block)
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture(scope="module")
def sandbox():
    """A directory the unprivileged user owns (pytest's own tmp_path is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="fastvq-faults-"))
    directory.chmod(0o755)
    if AS_ROOT:
        os.chown(directory, NOBODY, NOBODY)
    yield directory
    for path in (directory, *directory.rglob("*")):
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(directory, ignore_errors=True)


def run(*args) -> int:
    with unprivileged():
        return cli.main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def base_run(sandbox):
    """One tiny trained run with its prior; tests work on copies of it."""
    out = sandbox / "base"
    assert run("train", "--data", "digits", "--out", out, "--epochs", 1, *TINY_VQVAE, *RUNTIME) == 0
    assert run("prior", "--run", out, *TINY_PRIOR, *RUNTIME) == 0
    return out


_copies = iter(range(10**6))


@pytest.fixture
def fresh_run(base_run, sandbox):
    with unprivileged():
        copy = Path(shutil.copytree(base_run, sandbox / f"copy{next(_copies)}"))
    return copy


@contextlib.contextmanager
def read_only(directory: Path):
    """Makes ``directory`` read-only for the command and checks that writes there really fail."""
    mode = stat.S_IMODE(directory.stat().st_mode)
    with unprivileged():
        directory.chmod(0o555)
        with pytest.raises(PermissionError):
            (directory / "probe").write_text("x")
    try:
        yield
    finally:
        with unprivileged():
            directory.chmod(mode)


def error_of(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"fastvq {command}: error: "), err
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------- unwritable run directories


def test_a_new_run_in_a_read_only_directory_fails_before_training(sandbox, capsys):
    parent = sandbox / "ro-parent"
    with unprivileged():
        parent.mkdir()
    with read_only(parent):
        assert run("train", "--out", parent / "run", "--epochs", 1, *TINY_VQVAE, *RUNTIME) == 2
    assert "cannot write to" in error_of(capsys, "train")


def test_a_run_directory_under_a_file_is_an_error(sandbox, capsys):
    blocker = sandbox / "a-file"
    with unprivileged():
        blocker.write_text("not a directory")
    assert run("train", "--out", blocker / "run", "--epochs", 1, *TINY_VQVAE, *RUNTIME) == 2
    assert f"cannot write to {blocker / 'run'}" in error_of(capsys, "train")


@pytest.mark.parametrize("command", [
    ["train", "--resume", "--epochs", "2", *RUNTIME],
    ["prior", *TINY_PRIOR, *RUNTIME],
    ["sample", "-n", "2", "--threads", "1"],
])
def test_resume_prior_and_sample_in_a_read_only_run(fresh_run, capsys, command):
    flag = "--out" if command[0] == "train" else "--run"
    before = (fresh_run / "checkpoint.pt").read_bytes()
    with read_only(fresh_run):
        assert run(command[0], flag, fresh_run, *command[1:]) == 2
    assert f"cannot write to {fresh_run}" in error_of(capsys, command[0])
    assert (fresh_run / "checkpoint.pt").read_bytes() == before


def test_a_run_made_read_only_mid_run_stops_with_a_message_and_resumes(sandbox, capsys, monkeypatch):
    out = sandbox / "mid-run"
    original = stage1.write_stage1_pictures

    def then_lock_the_directory(run_dir, *args):
        original(run_dir, *args)
        with unprivileged():
            run_dir.chmod(0o555)
            with pytest.raises(PermissionError):
                (run_dir / "probe").write_text("x")

    monkeypatch.setattr(stage1, "write_stage1_pictures", then_lock_the_directory)
    assert run("train", "--out", out, "--epochs", 2, *TINY_VQVAE, *RUNTIME) == 2
    err = error_of(capsys, "train")
    assert "Permission denied" in err and str(out) in err and "--resume" in err
    with unprivileged():
        out.chmod(0o755)
    assert not list(out.glob("*.tmp")), "a failed save left its temporary file"
    assert checkpoint.read_checkpoint(out / "checkpoint.pt", checkpoint.RUN_FORMAT)["epoch"] == 1
    monkeypatch.setattr(stage1, "write_stage1_pictures", original)
    assert run("train", "--out", out, "--resume", *RUNTIME) == 0
    assert [row["epoch"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


# --------------------------------------------------------------------------- torn metrics


def test_resume_drops_a_torn_last_metrics_line(fresh_run, capsys):
    with unprivileged(), (fresh_run / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 2, "val_nms')  # the row a killed run was writing
    assert run("train", "--out", fresh_run, "--resume", "--epochs", 2, *RUNTIME) == 0
    assert "cut-off last line" in capsys.readouterr().out
    rows = [json.loads(line) for line in (fresh_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]


def test_a_bad_metrics_line_inside_the_file_is_an_error(fresh_run, capsys):
    path = fresh_run / "metrics.jsonl"
    with unprivileged():
        path.write_text("not json\n" + path.read_text())
    assert run("train", "--out", fresh_run, "--resume", "--epochs", 2, *RUNTIME) == 2
    assert f"{path}, line 1, is not a JSON row" in error_of(capsys, "train")


# --------------------------------------------------------------------------- swapped and foreign checkpoints


def test_a_prior_copied_over_the_checkpoint_is_refused(fresh_run, capsys):
    with unprivileged():
        shutil.copy(fresh_run / "prior.pt", fresh_run / "checkpoint.pt")
    for command, flag in (("sample", "--run"), ("prior", "--run"), ("train", "--out")):
        extra = ["--resume", *RUNTIME] if command == "train" else []
        assert run(command, flag, fresh_run, *extra) == 2
        assert "checkpoint.pt is a prior checkpoint" in error_of(capsys, command)


def test_a_stage1_checkpoint_as_the_prior_is_refused(fresh_run, capsys):
    with unprivileged():
        shutil.copy(fresh_run / "checkpoint.pt", fresh_run / "prior.pt")
    assert run("sample", "--run", fresh_run, "-n", 2) == 2
    assert "prior.pt is a stage-1 run checkpoint" in error_of(capsys, "sample")


def test_a_prior_of_another_model_with_the_same_shapes_is_refused(base_run, sandbox, capsys):
    """A vit-vqgan run with 16 codes on a 4 x 4 map, and the vqvae run's prior over 16 codes on a
    4 x 4 map: the prior loads into the vit-vqgan's prior without a size mismatch."""
    out = sandbox / "vit"
    assert run("train", "--model", "vit-vqgan", "--out", out, "--epochs", 1, "--channels", "16", "--layers", "1",
               "--embedding-dim", "4", "--codebook-size", "16", "--adversarial-weight", "0", "--batch-size", "256",
               *RUNTIME) == 0
    with unprivileged():
        shutil.copy(base_run / "prior.pt", out / "prior.pt")
    assert run("sample", "--run", out, "-n", 2) == 2
    assert "trained on the codes of a vqvae model, but" in error_of(capsys, "sample")


def test_a_prior_of_another_run_of_the_same_model_is_refused(base_run, fresh_run, sandbox, capsys):
    other = sandbox / "other"
    assert run("train", "--data", "digits", "--out", other, "--epochs", 1, *TINY_VQVAE, *RUNTIME) == 0
    with unprivileged():
        shutil.copy(base_run / "prior.pt", other / "prior.pt")
    assert run("sample", "--run", other, "-n", 2) == 2
    assert "another vqvae run" in error_of(capsys, "sample")
    assert run("sample", "--run", fresh_run, "-n", 2, "--threads", 1) == 0  # a copy of the run is the same run


# --------------------------------------------------------------------------- corrupted checkpoints


def _tensor_offset(data: bytes, tensor: torch.Tensor) -> int:
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    offset = data.find(raw)
    assert offset >= 0, "the tensor's bytes are not in the file"
    return offset


@pytest.mark.parametrize("damage", ["flipped-byte", "4-KiB-of-zeros"])
def test_a_corrupted_checkpoint_is_refused_naming_the_file(fresh_run, capsys, damage):
    path = fresh_run / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    state = torch.load(path, weights_only=True)
    if damage == "flipped-byte":
        offset = _tensor_offset(data, max(state["model"].values(), key=torch.Tensor.numel)) + 5
        data[offset] ^= 0x10
    else:
        # Inside the optimiser's moment estimates, the largest tensors of the file.
        largest = max((t for s in state["optimizer"]["state"].values() for t in s.values() if t.dim()),
                      key=torch.Tensor.numel)
        assert largest.numel() * largest.element_size() >= 4096
        offset = _tensor_offset(data, largest)
        data[offset : offset + 4096] = bytes(4096)
    with unprivileged():
        path.write_bytes(bytes(data))
    for command, flag in (("train", "--out"), ("prior", "--run"), ("sample", "--run")):
        extra = ["--resume", "--epochs", "2", *RUNTIME] if command == "train" else []
        assert run(command, flag, fresh_run, *extra) == 2
        err = error_of(capsys, command)
        assert f"{path} is corrupt" in err or f"{path} is not a readable" in err, err


def test_a_corrupted_prior_is_refused(fresh_run, capsys):
    path = fresh_run / "prior.pt"
    data = bytearray(path.read_bytes())
    offset = _tensor_offset(data, max(torch.load(path, weights_only=True)["model"].values(), key=torch.Tensor.numel))
    data[offset + 1] ^= 0x01
    with unprivileged():
        path.write_bytes(bytes(data))
    assert run("sample", "--run", fresh_run, "-n", 2) == 2
    assert f"{path} is corrupt" in error_of(capsys, "sample")


def test_a_checkpoint_without_a_checksum_loads_with_a_warning(fresh_run):
    path = fresh_run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state[checkpoint.CHECKSUM_KEY]
    with unprivileged():
        torch.save(state, path)
    with pytest.warns(UserWarning, match="has no checksum"):
        assert run("train", "--out", fresh_run, "--resume", "--epochs", 2, *RUNTIME) == 0


def test_the_checksum_survives_saving_and_loading(tmp_path):
    generator = torch.Generator().manual_seed(0)
    payload = {
        "format": checkpoint.RUN_FORMAT,
        "weights": {"a": torch.randn(3, 4, generator=generator).T, "b": torch.randn(5, generator=generator).bfloat16()},
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, 2)}},
        "lists": [1, 2.5, float("nan"), None, True, "text", (1, 2)],
        "rng": torch.get_rng_state(),
    }
    checkpoint.atomic_save(payload, tmp_path / "c.pt")
    loaded = checkpoint.read_checkpoint(tmp_path / "c.pt", checkpoint.RUN_FORMAT)
    assert checkpoint.payload_digest(loaded) == checkpoint.payload_digest(payload)
    changed = dict(payload, lists=[1, 2.5000001, float("nan"), None, True, "text", (1, 2)])
    assert checkpoint.payload_digest(changed) != checkpoint.payload_digest(payload)
    assert checkpoint.payload_digest({"x": 1}) != checkpoint.payload_digest({"x": True})
