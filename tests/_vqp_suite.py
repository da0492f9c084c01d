"""Run vector-quantize-pytorch's own tests (vendored in tests/originals/vector_quantize_pytorch/tests) in a fresh
interpreter, against the real package or, with ``alias=True``, against fastvq through
``fastvq.nn.install_as_vector_quantize_pytorch()``; returns each test's outcome.

Also a script: ``python tests/_vqp_suite.py [--alias] [pytest args...]`` prints the outcomes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VENDORED = REPO_ROOT / "tests" / "originals" / "vector_quantize_pytorch" / "tests"

# Installs the alias (or not) and runs pytest on the copied files with no ini file of fastvq's.
_RUNNER = """
import sys
if sys.argv[1] == "alias":
    import fastvq.nn
    fastvq.nn.install_as_vector_quantize_pytorch()
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


_SEEDING_CONFTEST = """
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(0)
    torch.manual_seed(0)
"""


def run_suite(alias: bool, *pytest_args: str, timeout: float = 3000) -> dict[str, str]:
    """``{"test_file.py::test_name[params]": "passed" | "failed" | "skipped"}`` for the vendored tests."""
    with tempfile.TemporaryDirectory(prefix="fastvq-vqp-suite-") as folder:
        folder = Path(folder)
        shutil.copytree(VENDORED, folder / "tests")
        (folder / "pytest.ini").write_text("[pytest]\n")
        # Their tests draw unseeded random inputs; seeding each one makes an outcome a property of the code, not
        # of the draw, on both libraries alike.
        (folder / "conftest.py").write_text(_SEEDING_CONFTEST)
        report = folder / "report.xml"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-c", _RUNNER, "alias" if alias else "original", "-q", "-p", "no:cacheprovider",
                   "-c", str(folder / "pytest.ini"), "--rootdir", str(folder), f"--junitxml={report}",
                   *pytest_args, "tests"]
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
        if not report.exists():
            output = done.stdout[-3000:] + done.stderr[-3000:]
            raise RuntimeError(f"the suite did not run (exit {done.returncode}):\n{output}")
        return _outcomes(ElementTree.parse(report))


def _outcomes(tree: ElementTree.ElementTree) -> dict[str, str]:
    outcomes = {}
    for case in tree.iter("testcase"):
        file_name = case.get("classname", "").split(".")[-1]
        if file_name.startswith("Test"):  # a test class: classname is tests.test_file.TestClass
            module, klass = case.get("classname").split(".")[-2:]
            name = f"{module}.py::{klass}::{case.get('name')}"
        else:
            name = f"{file_name}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[name] = "failed"
        elif case.find("skipped") is not None:
            outcomes[name] = "skipped"
        else:
            outcomes[name] = "passed"
    return outcomes


if __name__ == "__main__":
    alias = "--alias" in sys.argv[1:]
    print(json.dumps(run_suite(alias, *[arg for arg in sys.argv[1:] if arg != "--alias"]), indent=1, sort_keys=True))
