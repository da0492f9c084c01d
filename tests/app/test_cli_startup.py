"""``fastvq --help`` and ``fastvq --version`` load neither torch nor numpy: the command line is parsed
from the standard library and the model table alone.

``fastvq/__init__.py`` imports the whole library, so these tests import ``fastvq.cli`` under a bare
``fastvq`` package (its ``__init__`` not run), which is what ``fastvq.cli`` itself costs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import fastvq

PACKAGE = Path(fastvq.__file__).resolve().parent
HEAVY = ("torch", "numpy", "triton")

PROBE = """
import sys, types
package = types.ModuleType("fastvq")
package.__path__ = [{package!r}]
sys.modules["fastvq"] = package
from fastvq import cli
try:
    cli.main({argv!r})
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("loaded:", sorted({{name.partition(".")[0] for name in sys.modules}} & set({heavy!r})))
"""


def _heavy_modules_loaded(argv: list[str]) -> str:
    code = PROBE.format(package=str(PACKAGE), argv=argv, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [["--help"], *([command, "--help"] for command in
                                                 ("train", "prior", "sample", "demo", "bench", "kmeans", "info"))])
def test_help_loads_no_torch(argv):
    assert _heavy_modules_loaded(argv) == "loaded: []"


def test_version_loads_no_torch_and_prints_the_version(capfd):
    from fastvq._version import __version__

    assert _heavy_modules_loaded(["--version"]) == "loaded: []"
    done = subprocess.run([sys.executable, "-m", "fastvq", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == f"fastvq {__version__}\n"
