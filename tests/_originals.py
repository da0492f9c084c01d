"""Load one module of a library fastvq is a drop-in for, without running its package's ``__init__``.

The originals are installed into a folder of their own, ``tests/.originals`` (``pip install --no-deps --target
tests/.originals -r tests/requirements-originals.txt``), not into site-packages: one of them
(descript-audio-codec) ships a top-level ``tests`` package that would shadow this repository's. Their
quantization modules import only torch, einops and numpy, but their packages' ``__init__`` files import
the whole library (audio I/O, training frameworks). :func:`load_original` finds the module's file through
the installed distribution, registers empty stand-in packages for its parents (and for any extra module
names given in ``stubs``), and executes just that file, so relative imports inside the package resolve to
other files loaded the same way. Tests skip, saying what to install, when the library is absent.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

REQUIREMENTS = Path(__file__).with_name("requirements-originals.txt")
ORIGINALS = Path(__file__).with_name(".originals")
INSTALL = f"pip install --no-deps --target tests/{ORIGINALS.name} -r tests/{REQUIREMENTS.name}"


def _package_root(top_level: str) -> Path:
    loaded = sys.modules.get(top_level)
    if loaded is not None and getattr(loaded, "__path__", None):
        # the real package, or the stand-in an earlier load_original registered (which has no spec)
        return Path(next(iter(loaded.__path__)))
    if (ORIGINALS / top_level / "__init__.py").is_file():
        return ORIGINALS / top_level
    spec = importlib.util.find_spec(top_level)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{top_level} is not installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_original(dotted: str, stubs: dict[str, dict] | None = None) -> types.ModuleType:
    """Import ``dotted`` (e.g. ``"audiocraft.quantization.vq"``) from its file alone.

    Parent packages become empty namespace modules pointing at their real folders (so that
    ``from .core_vq import X`` loads ``core_vq.py`` by the same rule); ``stubs`` maps further module
    names to the attributes a stand-in module should carry (e.g. ``{"flashy": {}}`` or
    ``{"dac.nn.layers": {"WNConv1d": fn}}``). A module already loaded this way is returned as is.
    """
    stubs = stubs or {}
    for name, attributes in stubs.items():
        if name not in sys.modules or getattr(sys.modules[name], "__fastvq_stub__", False):
            module = types.ModuleType(name)
            module.__fastvq_stub__ = True
            for key, value in attributes.items():
                setattr(module, key, value)
            sys.modules[name] = module
    parts = dotted.split(".")
    root = _package_root(parts[0])
    for depth in range(1, len(parts)):
        package = ".".join(parts[:depth])
        if package in sys.modules and not getattr(sys.modules[package], "__fastvq_stub__", False):
            continue
        if package in sys.modules and getattr(sys.modules[package], "__path__", None):
            continue
        module = types.ModuleType(package)
        module.__path__ = [str(root.joinpath(*parts[1:depth]))]
        module.__fastvq_stub__ = True
        sys.modules[package] = module
    if dotted in sys.modules:
        return sys.modules[dotted]
    path = root.joinpath(*parts[1:]).with_suffix(".py")
    spec = importlib.util.spec_from_file_location(dotted, path, submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[dotted] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[dotted]
        raise
    return module


def _no_broadcast(tensors):
    """A library's ``distrib.broadcast_tensors`` outside a process group: nothing to broadcast."""


def audiocraft_vq() -> types.ModuleType:
    """audiocraft's ``quantization/vq.py`` (flashy, its training framework, stands in for the one call it makes)."""
    distrib = {"broadcast_tensors": _no_broadcast}
    return load_original("audiocraft.quantization.vq",
                         stubs={"flashy": {"distrib": types.SimpleNamespace(**distrib)}, "flashy.distrib": distrib})


def encodec_vq() -> types.ModuleType:
    """The EnCodec package's ``quantization/vq.py`` (its ``distrib`` module stands in for the one call it makes)."""
    return load_original("encodec.quantization.vq", stubs={"encodec.distrib": {"broadcast_tensors": _no_broadcast}})
