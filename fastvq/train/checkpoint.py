"""Run files on disk: checkpoints written atomically, read back with a clear error, the RNG state,
and ``metrics.jsonl`` made to agree with the checkpoint on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .common import CHECKPOINT, RunError


def atomic_save(obj: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path} not found: no fastvq run there (fastvq train --out RUN creates one)") from None
    except Exception as error:  # torch raises many types for a bad file
        raise RunError(f"{path} is not a readable fastvq checkpoint ({type(error).__name__}: {error})") from None


def load_run(run: Path) -> tuple[dict, dict]:
    """``(config, checkpoint)`` of the stage-1 run in ``run``."""
    checkpoint = read_checkpoint(Path(run) / CHECKPOINT)
    if "config" not in checkpoint or "model" not in checkpoint:
        raise RunError(f"{Path(run) / CHECKPOINT} is not a fastvq stage-1 checkpoint")
    return checkpoint["config"], checkpoint


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reconcile_metrics(path: Path, state: dict) -> None:
    """Makes ``metrics.jsonl`` end at the checkpoint's evaluation: rows written after it (by a run
    that stopped before its next checkpoint) go, and the checkpoint's own row is restored if the
    run stopped between writing the checkpoint and the row."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line] if path.exists() else []
    rows = [row for row in rows if row.get("epoch", 0) <= state["epoch"]]
    if state.get("metrics") and (not rows or rows[-1].get("epoch") != state["epoch"]):
        rows.append(state["metrics"])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
