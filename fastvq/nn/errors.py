"""The exception types fastvq's layers raise for a bad configuration.

fastvq reports a bad argument with a ``ValueError`` that names it (the project's contract). The layers that
are drop-ins for vector-quantize-pytorch must also keep the exception *type* that library raises for the
same configuration, so that code written against it (``except AssertionError``, ``pytest.raises(...)``)
keeps working: it checks its configurations with ``assert`` (an ``AssertionError``) and, in one place,
fails with a ``RuntimeError`` from inside PyTorch. Hence one class per original type, each also a
``ValueError``:

- :class:`ConfigError` (``ValueError`` and ``AssertionError``): every configuration vector-quantize-pytorch
  asserts on. Unlike a bare ``assert`` it is raised under ``python -O`` too.
- :class:`ConfigRuntimeError` (a ``ConfigError`` and a ``RuntimeError``): where the original fails with a
  ``RuntimeError``; today only ``LatentQuantize(levels=<int>)`` without ``codebook_dim``.

Catching ``ValueError`` catches both, as before. The drop-in layers' constructors are wrapped with
:func:`raises_config_error`, which re-raises any ``ValueError`` of their checks (their own, or a shared
primitive's such as ``check_real``) as a ``ConfigError`` with the same message, so no check needs to know
which library the layer mirrors. ``TypeError`` (an argument of the wrong type) is left as it is.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

__all__ = ["ConfigError", "ConfigRuntimeError", "raises_config_error"]

Init = TypeVar("Init", bound=Callable[..., None])


class ConfigError(ValueError, AssertionError):
    """A layer's arguments are inconsistent or out of range; the message names the argument."""


class ConfigRuntimeError(ConfigError, RuntimeError):
    """A :class:`ConfigError` where vector-quantize-pytorch raises ``RuntimeError`` for the same arguments."""


def raises_config_error(init: Init) -> Init:
    """Decorate an ``__init__`` so that a ``ValueError`` it raises leaves it as a :class:`ConfigError`
    (message and cause kept); a ``ConfigError`` (or subclass) raised inside passes through unchanged."""

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(*error.args) from error

    return checked_init
