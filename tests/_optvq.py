"""OptVQ's own quantizer module (vendored unmodified in tests/originals/optvq/, with its commit), loaded from its
file with a stand-in for the one module it imports from its package: ``optvq.utils.logger``, whose statistics
logging (``L.GET_STATS``, ``L.log.add_scalar``) is off here."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

QUANTIZER_FILE = Path(__file__).parent / "originals" / "optvq" / "quantizer.py"
_MODULE_NAME = "optvq.models.quantizer"


class _NoLog:
    total_steps = 0

    def add_scalar(self, *args, **kwargs):
        pass

    def add_histogram(self, *args, **kwargs):
        pass


def load_optvq_quantizer() -> types.ModuleType:
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    for package in ("optvq", "optvq.utils", "optvq.models"):
        module = sys.modules.setdefault(package, types.ModuleType(package))
        module.__path__ = []
    logger = types.ModuleType("optvq.utils.logger")
    logger.GET_STATS = False
    logger.log = _NoLog()
    sys.modules["optvq.utils.logger"] = logger
    sys.modules["optvq.utils"].logger = logger
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, QUANTIZER_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module
