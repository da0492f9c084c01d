"""Load a quantizer file vendored, unmodified, under ``tests/originals/`` (libraries that are not on PyPI:
LlamaGen, SEED-Voken); see the README.md beside each for its upstream commit and license."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

ORIGINALS = Path(__file__).resolve().parent / "originals"


def load_vendored(relative_path: str) -> types.ModuleType:
    """Execute ``tests/originals/<relative_path>`` as a module of its own (loaded once per process)."""
    name = "_fastvq_original_" + relative_path.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ORIGINALS / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
    return sys.modules[name]
