"""Building a fastvq layer that carries another library's live module's state: the helpers of ``from_original``.

``fastvq.swap_quantizers`` replaces a module of another library by ``FastvqClass.from_original(module)``. The
replacement must hold the original's very tensors (the same ``Parameter`` objects, so an optimizer built before
the swap still updates them; the same buffers, so their device, dtype and values are kept without a copy), the
same state_dict keys, and the same training flags. Two ways to build one:

- :func:`shell` for a class whose attributes and children mirror the original's one to one (Hugging Face's
  quantizers): an instance that has not run ``__init__``, given the original's own parameters and buffers, the
  plain attributes named, and its training flag; the caller then sets the children.
- :func:`build_like` for a class built by its constructor from the original's configuration and then loaded
  with ``load_state_dict`` (so that load hooks run); :func:`check_same_config` compares the attributes both
  share, and :func:`adopt_tensors` replaces every parameter and buffer by the original's tensor of the same name.

Both refuse a module that carries hooks or an instance-level ``forward`` (accelerate's offloading wraps one):
those are bound to the object that the swap discards, so they would silently stop running.
"""

from __future__ import annotations

import random
from typing import Callable, TypeVar

import torch
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm

ModuleT = TypeVar("ModuleT", bound=nn.Module)

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _is_weight_norm_hook(hook) -> bool:
    return isinstance(hook, WeightNorm)


def check_no_hooks(original: nn.Module, where: str = "", *, weight_norm_replicated: bool = False) -> None:
    """Raises ``ValueError`` if ``original`` has hooks or an instance ``forward`` that a replacement would lose.

    ``weight_norm_replicated``: the replacement computes ``torch.nn.utils.weight_norm``'s weight from the same
    ``weight_g``/``weight_v`` itself (DAC's convolutions), so that pre-hook is not lost and is allowed."""
    hooked = [
        name for name in _HOOK_DICTS
        if any(not (weight_norm_replicated and name == "_forward_pre_hooks" and _is_weight_norm_hook(hook))
               for hook in (getattr(original, name, None) or {}).values())
    ]
    if "forward" in vars(original):
        hooked.append("an instance-level forward (e.g. accelerate's device-map hook)")
    if hooked:
        raise ValueError(
            f"cannot replace {type(original).__qualname__}{' at ' + repr(where) if where else ''}: it carries "
            f"{', '.join(hooked)}, which belong to the module object the swap discards; call "
            "fastvq.swap_quantizers before registering hooks or dispatching the model with accelerate"
        )


def shell(cls: type[ModuleT], original: nn.Module, attributes: tuple[str, ...] = ()) -> ModuleT:
    """An instance of ``cls`` holding ``original``'s own parameters and buffers (the same objects, the same
    persistence), the plain ``attributes`` copied by name, and ``original``'s training flag; no children yet."""
    check_no_hooks(original)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name in attributes:
        setattr(module, name, getattr(original, name))
    for name, parameter in original._parameters.items():
        module.register_parameter(name, parameter)
    for name, buffer in original._buffers.items():
        module.register_buffer(name, buffer, persistent=name not in original._non_persistent_buffers_set)
    module.training = original.training
    return module


def adopt_tensors(replacement: ModuleT, original: nn.Module, *, weight_norm_replicated: bool = False) -> ModuleT:
    """Gives every submodule of ``replacement`` the parameters, buffers and training flag of ``original``'s
    submodule at the same path, as the same tensor objects; returns ``replacement``.

    ``replacement`` must already hold equal values (built from ``original``'s configuration and loaded from its
    state_dict), so that what its load hooks derived from the values stays true. A buffer only the replacement
    has (a non-persistent one of its own) is moved to ``original``'s device.

    Raises:
        ValueError: a submodule, parameter or buffer of ``replacement`` that ``original`` lacks, or one that is a
            parameter in one and a buffer in the other; or an ``original`` submodule carrying hooks.
    """
    originals = dict(original.named_modules(remove_duplicate=False))
    for path, source in originals.items():
        check_no_hooks(source, path, weight_norm_replicated=weight_norm_replicated)
    device = next((tensor.device for tensor in (*original.parameters(), *original.buffers())), None)
    for path, target in replacement.named_modules(remove_duplicate=False):
        source = originals.get(path)
        if source is None:
            raise ValueError(f"{type(original).__qualname__} has no submodule {path!r} that {type(replacement)} has")
        for name in target._parameters:
            if name not in source._parameters:
                raise ValueError(f"{type(original).__qualname__} has no parameter {path + '.' + name!r}")
            target._parameters[name] = source._parameters[name]
        for name, buffer in target._buffers.items():
            if name in source._buffers:
                target._buffers[name] = source._buffers[name]
            elif name in source._parameters or name not in target._non_persistent_buffers_set:
                raise ValueError(f"{type(original).__qualname__} has no buffer {path + '.' + name!r}")
            elif buffer is not None and device is not None:
                target._buffers[name] = buffer.to(device)
        target.training = source.training
    return replacement


_PLAIN = (bool, int, float, str, type(None))


def check_same_config(replacement: nn.Module, original: nn.Module) -> None:
    """Raises ``ValueError`` where a plain attribute (bool, int, float, str, None) that a submodule of both
    modules has, at the same path and under the same name, differs: an option ``from_original`` did not carry."""
    originals = dict(original.named_modules(remove_duplicate=False))
    for path, target in replacement.named_modules(remove_duplicate=False):
        source = originals.get(path)
        if source is None:
            continue
        theirs = vars(source)
        for name, value in vars(target).items():
            if isinstance(value, _PLAIN) and name in theirs and isinstance(theirs[name], _PLAIN):
                if theirs[name] != value:
                    raise ValueError(
                        f"{type(original).__qualname__}: {(path + '.' if path else '') + name} is {theirs[name]!r} "
                        f"there but {value!r} in fastvq's {type(replacement).__qualname__}; this option is not "
                        "carried over"
                    )


def build_like(original: nn.Module, factory: Callable[[], ModuleT]) -> ModuleT:
    """``factory()`` (a fastvq layer built from ``original``'s configuration), loaded from ``original``'s
    state_dict, checked by :func:`check_same_config`, then holding ``original``'s tensors (:func:`adopt_tensors`).

    The construction draws its random initial values with PyTorch's CPU RNG forked (and Python's ``random`` state
    restored), so swapping a module does not shift the random streams of the training that follows.
    """
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        replacement = factory()
    random.setstate(python_state)
    replacement.load_state_dict(original.state_dict(), strict=True)
    check_same_config(replacement, original)
    return adopt_tensors(replacement, original)
