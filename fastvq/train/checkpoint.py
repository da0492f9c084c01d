"""Run files on disk: checkpoints written atomically with a checksum and read back with a clear
error, the RNG state, the writability check, and ``metrics.jsonl`` made to agree with the
checkpoint on resume.

A checkpoint is one ``torch.save`` file (so ``torch.load`` still reads it) of a dict with a
``format`` (``"fastvq-run"`` for ``checkpoint.pt``, ``"fastvq-prior"`` for ``prior.pt``) and a
``sha256``: the SHA-256 of everything else in the dict (every tensor's dtype, shape and bytes, and
every other value, in order; see :func:`payload_digest`), taken before it was written. Reading a
checkpoint recomputes it from what was loaded and refuses a mismatch, so a flipped byte or a block
of zeros inside the file is an error naming the file rather than a resumed run with changed
weights or optimiser state. A checkpoint with a ``format`` but no ``sha256`` is refused too: one
flipped bit in the key's name must not turn the verification off.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .common import CHECKPOINT, STAGE1_MODELS, RunError
from .data import parse_dataset_spec

RUN_FORMAT, PRIOR_FORMAT = "fastvq-run", "fastvq-prior"
CHECKSUM_KEY = "sha256"
_FORMAT_NAMES = {
    RUN_FORMAT: "a stage-1 run checkpoint (the checkpoint.pt of fastvq train)",
    PRIOR_FORMAT: "a prior checkpoint (the prior.pt of fastvq prior)",
}


def payload_digest(payload: Any) -> str:
    """SHA-256 (hex) of ``payload``'s content: tensors by dtype, shape and bytes, dicts in their
    order, and the plain values a checkpoint holds (str, int, float, bool, None, bytes, lists,
    tuples). The same content gives the same digest wherever its tensors live and however they
    were laid out, so the digest taken before ``torch.save`` can be checked after ``torch.load``."""
    digest = hashlib.sha256()
    _feed(digest, payload)
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        # A fresh dense copy: .contiguous() keeps a one-element tensor's stride (whatever it is, the
        # tensor counts as contiguous), and viewing that as bytes needs a unit stride.
        dense = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(dense.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(b"D%d:" % len(value))
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(b"%s%d:" % (b"L" if isinstance(value, list) else b"U", len(value)))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, str):
        encoded = value.encode("utf-8")
        digest.update(b"S%d:" % len(encoded) + encoded)
    elif isinstance(value, bytes):
        digest.update(b"B%d:" % len(value) + value)
    elif isinstance(value, bool) or value is None:
        digest.update(repr(value).encode())
    elif isinstance(value, int):
        digest.update(b"I%d;" % value)
    elif isinstance(value, float):
        digest.update(b"F" + value.hex().encode() + b";")
    else:
        raise TypeError(f"a checkpoint cannot hold a {type(value).__name__} ({value!r}): no checksum is defined for it")


def atomic_save(obj: dict, path: Path) -> None:
    """Writes ``obj`` with its ``sha256`` to ``path`` through a temporary file, so ``path`` is always
    either the previous checkpoint or the new one; a failed write leaves no temporary behind.

    Raises:
        RunError: the write failed (a full disk, a quota, an I/O error); the message names the file
            and says that the previous one, if any, is intact.
        OSError: the temporary file could not be created (permissions): the caller's own message.
    """
    path = Path(path)
    payload = {**obj, CHECKSUM_KEY: payload_digest(obj)}
    temporary = path.with_name(path.name + ".tmp")
    writer = None
    try:
        # Opened here, not by torch.save, whose own open turns a refused write into a RuntimeError.
        with open(temporary, "wb") as handle:
            writer = _WriteErrorRecorder(handle)
            torch.save(payload, writer)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        temporary.unlink(missing_ok=True)
        if writer is None:  # the temporary file could not be created: the directory refuses writes
            raise
        raise RunError(_failed_write(path, writer.error or error)) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class _WriteErrorRecorder:
    """The file-like object handed to ``torch.save``: it keeps the first ``OSError`` of a write,
    which torch.save's zip writer replaces by a RuntimeError that no longer says what happened."""

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _failed_write(path: Path, error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        reason = "the disk is full"
    elif isinstance(error, OSError):
        reason = error.strerror or str(error)
    else:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if not path.exists():
        previous = f"there was no earlier {path.name} to keep"
    else:
        previous = f"the previous {path.name} is intact" + (
            " (fastvq train --resume continues from it)" if path.name == CHECKPOINT else "")
    return f"cannot write {path} ({reason}): nothing of it was kept; {previous}"


def read_checkpoint(path: Path, kind: str) -> dict:
    """The checkpoint at ``path``, which must be of format ``kind`` (``RUN_FORMAT`` or
    ``PRIOR_FORMAT``) and match its checksum; anything else is a ``RunError`` naming the file."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        if kind == PRIOR_FORMAT:
            raise RunError(f"{path} not found: train a prior first (fastvq prior --run {path.parent})") from None
        raise RunError(f"{path} not found: no fastvq run there (fastvq train --out RUN creates one)") from None
    except Exception as error:  # torch raises many types for a bad file
        raise RunError(f"{path} is not a readable fastvq checkpoint ({type(error).__name__}: {error})") from None
    wanted = _FORMAT_NAMES[kind]
    found = state.get("format") if isinstance(state, dict) else None
    if found != kind:
        what = _FORMAT_NAMES.get(found, "not a fastvq checkpoint")
        raise RunError(f"{path} is {what}, but {wanted} was expected here")
    stored = state.pop(CHECKSUM_KEY, None)
    if not isinstance(stored, str):
        raise RunError(f"{path} is corrupt: it has no {CHECKSUM_KEY!r} checksum, which every fastvq checkpoint "
                       "stores (a damaged key, or a file not written by fastvq); it is not loaded unverified")
    try:
        actual = payload_digest(state)
    except Exception as error:  # noqa: BLE001 - a damaged file can hold tensors no layout makes sense of
        raise RunError(f"{path} is corrupt: {type(error).__name__}: {error}") from None
    if actual != stored:
        raise RunError(
            f"{path} is corrupt: the SHA-256 of its contents ({actual[:16]}...) is not the one stored when it was "
            f"written ({str(stored)[:16]}...); the file was changed on disk. Restore it from a copy, or start over"
        )
    return state


# The data options a run's config may hold (fastvq train's --val-fraction, --image-size, --image-channels).
DATA_ARGS = ("val_fraction", "image_size", "channels")


def load_run(run: Path) -> tuple[dict, dict]:
    """``(config, checkpoint)`` of the stage-1 run in ``run``.

    A checksum proves only that the file is whole, not who wrote it (anyone can recompute one), so
    the config is checked as untrusted input: each field must have the type fastvq writes, the
    model and the data source must be ones fastvq knows. A ``RunError`` names the field otherwise.
    """
    path = Path(run) / CHECKPOINT
    checkpoint = read_checkpoint(path, RUN_FORMAT)
    if "config" not in checkpoint or "model" not in checkpoint:
        raise RunError(f"{path} is not a fastvq stage-1 checkpoint (it has no config or model)")
    check_run_config(checkpoint["config"], path)
    return checkpoint["config"], checkpoint


def check_run_config(config: Any, path: Path) -> None:
    """Refuses a stage-1 config read from ``path`` whose fields are not what fastvq writes."""

    def refuse(field: str, problem: str) -> RunError:
        return RunError(f"{path}: its config field {field!r} {problem}: refused (the file was not written by "
                        "fastvq train, or was edited)")

    if not isinstance(config, dict):
        raise RunError(f"{path}: its config is a {type(config).__name__}, not a dict: refused")
    if config.get("model") not in STAGE1_MODELS:
        raise refuse("model", f"is {config.get('model')!r}, not one of {', '.join(STAGE1_MODELS)}")
    for field in ("model_args", "data_args", "train"):
        value = config.get(field)
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise refuse(field, f"is a {type(value).__name__}, not a dict of named values")
    unknown = sorted(set(config["data_args"]) - set(DATA_ARGS))
    if unknown:
        raise refuse("data_args", f"holds {', '.join(unknown)}, beyond {', '.join(DATA_ARGS)}")
    if not isinstance(config.get("data"), str):
        raise refuse("data", f"is a {type(config.get('data')).__name__}, not a dataset name")
    try:
        parse_dataset_spec(config["data"])
    except ValueError as error:
        raise refuse("data", str(error)) from None
    perceptual = config.get("perceptual_net")
    if perceptual is not None and not isinstance(perceptual, str):
        raise refuse("perceptual_net", f"is a {type(perceptual).__name__}, not a name")


def require_writable(directory: Path, purpose: str) -> None:
    """Creates ``directory`` if needed and checks that a file can be written there (a real write,
    which also catches read-only file systems and permissions that ``os.access`` misjudges), so a
    run that could not save its results fails before it starts rather than after its first epoch."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".fastvq-write-check-"):
            pass
    except OSError as error:
        raise RunError(f"cannot write to {directory} ({error.strerror or error}): {purpose}") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The rows of a ``metrics.jsonl`` and how many torn lines were dropped: a last line without
    its newline that is not JSON is the row a killed run was writing; a bad line anywhere else is a
    ``RunError`` naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], 0
    except UnicodeDecodeError as error:
        raise RunError(f"{path} is not a text file of JSON rows ({error})") from None
    lines = text.split("\n")
    rows, dropped = [], 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: the write was cut short
                dropped += 1
                continue
            raise RunError(f"{path}, line {number}, is not a JSON row ({error.msg}): fix or delete that line") from None
        if not isinstance(row, dict):
            raise RunError(f"{path}, line {number}, is not a JSON object: fix or delete that line")
        rows.append(row)
    return rows, dropped


def reconcile_metrics(path: Path, state: dict) -> int:
    """Makes ``metrics.jsonl`` end at the checkpoint's evaluation: rows written after it (by a run
    that stopped before its next checkpoint) go, and the checkpoint's own row is restored if the
    run stopped between writing the checkpoint and the row. Returns the number of torn lines dropped."""
    rows, dropped = read_metrics(path)
    rows = [row for row in rows if row.get("epoch", 0) <= state["epoch"]]
    if state.get("metrics") and (not rows or rows[-1].get("epoch") != state["epoch"]):
        rows.append(state["metrics"])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return dropped
