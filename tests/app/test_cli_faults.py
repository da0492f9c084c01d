"""Fault injection on the ``fastvq`` command: read-only run directories (before and during a run),
a full disk, torn metrics, swapped, foreign and corrupted checkpoints, and run directories crafted
to run code. Each must end as ``fastvq X: error: ...`` with exit status 2, never a traceback, and
never sample or resume silently from the wrong file, nor run what a run directory names.

Root ignores file permissions, so where the tests run as root the command runs with the effective
user ``nobody`` (``os.seteuid``, undone afterwards) in a directory that user owns: a read-only
directory then refuses writes for real, and every test checks that it does before relying on it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  (see unprivileged())

from fastvq import cli
from fastvq.models import registry
from fastvq.train import checkpoint, pictures, stage1

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
    """A directory the unprivileged user owns (pytest's own tmp_path is private to root).

    As root, a tiny train, prior and sample run first, as root: they import every module the
    command imports lazily (tqdm, einops' torch backend, Pillow's plugins, torch's own), which
    nobody could not import from an interpreter under a 0700 /root."""
    if AS_ROOT:
        warm_up = Path(tempfile.mkdtemp(prefix="fastvq-faults-warm-up-"))
        assert cli.main([*map(str, ["train", "--out", warm_up, "--epochs", 1, *TINY_VQVAE, *RUNTIME])]) == 0
        assert cli.main([*map(str, ["prior", "--run", warm_up, *TINY_PRIOR, *RUNTIME])]) == 0
        assert cli.main([*map(str, ["sample", "--run", warm_up, "-n", 2, "--threads", 1])]) == 0
        shutil.rmtree(warm_up)
    directory = Path(tempfile.mkdtemp(prefix="fastvq-faults-"))
    directory.chmod(0o755)
    if AS_ROOT:
        os.chown(directory, NOBODY, NOBODY)
    yield directory
    for path in (directory, *directory.rglob("*")):
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_training_curves_as_nobody():
    """As root the commands run as nobody, who may not read matplotlib's fonts under a 0700 /root
    (its font lookup then fails or recurses), so the training curves, which these tests do not
    examine, are not drawn; tests/app/test_cli.py checks them. A patch of its own, which a test's
    ``monkeypatch.undo()`` leaves in place."""
    with pytest.MonkeyPatch.context() as patch:
        if AS_ROOT:
            patch.setattr(pictures, "save_training_curves", lambda rows, path, title: path)
        yield


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


@pytest.fixture(scope="module")
def vit_run(sandbox):
    """A tiny vit-vqgan run: 16 codes on a 4 x 4 map."""
    out = sandbox / "vit"
    assert run("train", "--model", "vit-vqgan", "--out", out, "--epochs", 1, "--channels", "16", "--layers", "1",
               "--embedding-dim", "4", "--codebook-size", "16", "--adversarial-weight", "0", "--batch-size", "256",
               *RUNTIME) == 0
    return out


def test_a_prior_of_another_model_with_the_same_shapes_is_refused(base_run, vit_run, sandbox, capsys):
    """A vit-vqgan run with 16 codes on a 4 x 4 map, and the vqvae run's prior over 16 codes on a
    4 x 4 map: the prior loads into the vit-vqgan's prior without a size mismatch."""
    with unprivileged():
        out = Path(shutil.copytree(vit_run, sandbox / f"copy{next(_copies)}"))
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


def test_a_flipped_bit_in_the_checksum_key_does_not_turn_verification_off(fresh_run, capsys):
    """R5: with its ``sha256`` key renamed by one bit, a file that still has its format marker is
    refused (it used to load unverified, changed weights and all)."""
    path = fresh_run / "checkpoint.pt"
    data = path.read_bytes()
    assert data.count(b"sha256") == 1
    with unprivileged():
        path.write_bytes(data.replace(b"sha256", b"sha2" + bytes([ord("5") ^ 0x01]) + b"6"))
    for command, flag in (("train", "--out"), ("prior", "--run"), ("sample", "--run")):
        extra = ["--resume", "--epochs", "2", *RUNTIME] if command == "train" else []
        assert run(command, flag, fresh_run, *extra) == 2
        assert f"{path} is corrupt: it has no 'sha256' checksum" in error_of(capsys, command)


def test_the_checksum_of_a_one_element_tensor_with_any_stride(tmp_path):
    """R4: a one-element tensor counts as contiguous whatever its stride, and a stride byte flipped
    on disk gives one; its checksum is its one value's, not a RuntimeError."""
    strided = torch.tensor([0.0, 0.0, 0.0, 1.5])[3:].as_strided((1,), (7,))
    assert strided.stride() == (7,) and strided.is_contiguous()
    assert checkpoint.payload_digest({"t": strided}) == checkpoint.payload_digest({"t": torch.tensor([1.5])})
    path = tmp_path / "c.pt"
    checkpoint.atomic_save({"format": checkpoint.RUN_FORMAT, "t": torch.tensor([1.5]), "u": torch.zeros(2)}, path)
    state = torch.load(path, weights_only=True)
    state["t"] = strided  # as torch.load returns the tensor after its stride was damaged
    stored = state.pop(checkpoint.CHECKSUM_KEY)
    assert checkpoint.payload_digest(state) == stored


def test_a_full_disk_while_saving_is_an_error_and_the_previous_checkpoint_stays(sandbox, capsys, monkeypatch):
    """R6: the second epoch's checkpoint write runs out of space (ENOSPC) after a few KiB: the
    command says so, keeps epoch 1's checkpoint byte for byte, leaves no temporary, and resumes."""
    out = sandbox / "full-disk"
    original = stage1.write_stage1_pictures
    saved = {}

    class FullDisk(io.FileIO):
        written = 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def then_fill_the_disk(run_dir, *args):
        original(run_dir, *args)
        saved["checkpoint"] = (run_dir / "checkpoint.pt").read_bytes()
        monkeypatch.setattr(checkpoint, "open", FullDisk, raising=False)

    monkeypatch.setattr(stage1, "write_stage1_pictures", then_fill_the_disk)
    assert run("train", "--out", out, "--epochs", 2, *TINY_VQVAE, *RUNTIME) == 2
    err = error_of(capsys, "train")
    assert f"cannot write {out / 'checkpoint.pt'} (the disk is full)" in err
    assert "the previous checkpoint.pt is intact (fastvq train --resume continues from it)" in err
    assert (out / "checkpoint.pt").read_bytes() == saved["checkpoint"]
    assert not list(out.glob("*.tmp")), "a failed save left its temporary file"
    monkeypatch.undo()
    assert run("train", "--out", out, "--resume", *RUNTIME) == 0
    assert checkpoint.read_checkpoint(out / "checkpoint.pt", checkpoint.RUN_FORMAT)["epoch"] == 2


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


# --------------------------------------------------------------------------- run directories crafted to run code


def _rewrite_config(path: Path, **changes) -> None:
    """Edits the config inside checkpoint ``path`` and stores a matching checksum, as anyone can."""
    state = torch.load(path, weights_only=True)
    del state[checkpoint.CHECKSUM_KEY]
    state["config"].update(changes)
    with unprivileged():
        checkpoint.atomic_save(state, path)


class _WritesTheMarker:
    """Unpickled, calls ``open(marker, "w")``: a payload that leaves a file behind if it runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_run_naming_a_pickle_as_its_data_runs_nothing(fresh_run, sandbox, capsys):
    """R1: a checksum-valid checkpoint whose config points ``data`` at a CIFAR-10 "batch" that is a
    pickle payload: prior and resume read the data, and must refuse the pickle before it runs."""
    marker = sandbox / f"r1-marker{next(_copies)}"
    payload = sandbox / f"r1-payload{next(_copies)}"
    with unprivileged():
        payload.mkdir()
        (payload / "data_batch_1").write_bytes(pickle.dumps({b"data": _WritesTheMarker(marker), b"labels": [0]}))
    _rewrite_config(fresh_run / "checkpoint.pt", data=f"cifar10:{payload}")
    for command, flag in (("prior", "--run"), ("train", "--out")):
        extra = ["--resume", "--epochs", "2", *RUNTIME] if command == "train" else RUNTIME
        assert run(command, flag, fresh_run, *extra) == 2
        err = error_of(capsys, command)
        assert "config field 'data'" in err and "refused" in err, err
        assert not marker.exists(), f"fastvq {command} ran the pickle payload"


def test_a_run_naming_a_module_as_its_perceptual_net_runs_nothing(vit_run, sandbox, capsys, monkeypatch):
    """R2: a checksum-valid checkpoint whose config names ``MODULE:CALLABLE`` as the perceptual
    network, MODULE importable (here: on sys.path, as the working directory is under python -m):
    resume refuses to import it unless the command line names it; prior and sample, which need no
    perceptual network, never import it."""
    marker = sandbox / f"r2-marker{next(_copies)}"
    modules = sandbox / f"r2-modules{next(_copies)}"
    with unprivileged():
        out = Path(shutil.copytree(vit_run, sandbox / f"copy{next(_copies)}"))
        modules.mkdir()
        (modules / "fastvq_r2_payload.py").write_text(
            f"open({str(marker)!r}, 'w').close()\n\ndef make():\n    open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(modules))
    _rewrite_config(out / "checkpoint.pt", perceptual_net="fastvq_r2_payload:make")
    assert run("train", "--out", out, "--resume", "--epochs", 2, *RUNTIME) == 2
    err = error_of(capsys, "train")
    assert "config field 'perceptual_net' names 'fastvq_r2_payload:make'" in err, err
    assert not marker.exists(), "fastvq train --resume imported the module the run directory named"
    assert run("prior", "--run", out, *TINY_PRIOR, *RUNTIME) == 0
    assert run("sample", "--run", out, "-n", 2, "--threads", 1) == 0
    assert not marker.exists(), "fastvq prior or sample imported the module the run directory named"


def test_a_perceptual_net_named_on_the_command_line_or_shipped_resolves_on_resume(sandbox, monkeypatch):
    """The other side of R2: the user's own callable, repeated with --resume, and a shipped name."""
    modules = sandbox / f"r2-trusted{next(_copies)}"
    out = sandbox / f"perceptual{next(_copies)}"
    with unprivileged():
        modules.mkdir()
        (modules / "fastvq_r2_features.py").write_text(
            "import torch\n\ndef make():\n    return torch.nn.Conv2d(1, 4, 3)\n")
    monkeypatch.syspath_prepend(str(modules))
    vit = ["--model", "vit-vqgan", "--channels", "16", "--layers", "1", "--embedding-dim", "4", "--codebook-size",
           "16", "--adversarial-weight", "0", "--batch-size", "256"]
    trusted = ["--perceptual-net", "fastvq_r2_features:make"]
    assert run("train", "--out", out, "--epochs", 1, *vit, *trusted, *RUNTIME) == 0
    assert run("train", "--out", out, "--resume", "--epochs", 2, *trusted, *RUNTIME) == 0
    monkeypatch.setitem(registry.PERCEPTUAL_NETWORKS, "tiny-features", lambda: torch.nn.Conv2d(1, 4, 3))
    _rewrite_config(out / "checkpoint.pt", perceptual_net="tiny-features")
    assert run("train", "--out", out, "--resume", "--epochs", 3, *RUNTIME) == 0
