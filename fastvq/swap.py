"""``fastvq.swap_quantizers(model)``: replace, in place, every quantizer of a live model that fastvq has an
equivalent for.

The pattern of Liger-Kernel's ``apply_liger_kernel_to_*``: build a model with its own library (Hugging Face
transformers, vector-quantize-pytorch, taming-transformers, ...), call ``fastvq.swap_quantizers(model)``, and its
quantizers run on fastvq's fused search from then on. The model's ``state_dict()`` keys and values do not change,
so ``save_pretrained``, ``torch.save`` and reloading into the original library keep working, and an optimizer
built before the swap keeps updating the same parameters.

The registry
------------
:data:`REGISTRY` is the one table of known classes: ``"<module path>:<qualified class name>"`` of the original
class -> ``"<module path>:<class name>"`` of fastvq's equivalent. Both sides are strings: nothing is imported to
match (a model holds only classes whose modules are already imported), and a fastvq module is imported only when a
row of it matches. A module matches a row when its class's ``__module__`` and ``__qualname__`` are exactly the
row's: **subclasses are not matched**, since a subclass may override the methods the replacement would drop. To
swap a subclass you know to be equivalent, or a class of your own, pass the row in ``classes=``.

The ``from_original`` protocol
------------------------------
The fastvq class of a row provides the classmethod ``from_original(original) -> replacement``, which

- returns a module with the original's parameters and buffers as the *same tensor objects* (so device, dtype,
  values and optimizer references are kept), under the same state_dict keys, and the original's configuration
  and training flags (per submodule);
- replaces the original's whole subtree: its known children become fastvq's equivalents, other children (a
  projection, an embedding, a weight-normed convolution) are kept as the same objects;
- refuses, with ``ValueError``, an original it cannot carry exactly (hooks bound to the discarded object, an
  option fastvq's class does not have).

``fastvq/nn/_adopt.py`` holds the two helpers that implement it (``shell`` for a class that mirrors the original
attribute by attribute, ``adopt_tensors`` for one built from the original's configuration and loaded from its
state_dict). A drop-in module joins the table with one more ``REGISTRY.update(_same_names(...))`` block below
(plain rows where fastvq's class name differs from the original's).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import NamedTuple, Optional

from torch import nn

__all__ = ["REGISTRY", "Swapped", "swap_quantizers"]

def _same_names(original_module: str, fastvq_module: str, names: tuple[str, ...]) -> dict[str, str]:
    """Rows for classes that keep their original's name in fastvq's module."""
    return {f"{original_module}:{name}": f"{fastvq_module}:{name}" for name in names}


# One block per library; a library's drop-in module joins with one more REGISTRY.update(...) block.
REGISTRY: dict[str, str] = {}
REGISTRY.update(_same_names(
    "transformers.models.encodec.modeling_encodec", "fastvq.nn.transformers",
    ("EncodecEuclideanCodebook", "EncodecVectorQuantization", "EncodecResidualVectorQuantizer"),
))
REGISTRY.update(_same_names(
    "transformers.models.mimi.modeling_mimi", "fastvq.nn.transformers",
    ("MimiEuclideanCodebook", "MimiVectorQuantization", "MimiResidualVectorQuantizer",
     "MimiSplitResidualVectorQuantizer"),
))
REGISTRY.update(_same_names(
    "transformers.models.dac.modeling_dac", "fastvq.nn.transformers",
    ("DacVectorQuantize", "DacResidualVectorQuantizer"),
))
REGISTRY.update(_same_names(
    "taming.modules.vqvae.quantize", "fastvq.nn.taming", ("VectorQuantizer2", "GumbelQuantize"),
))
REGISTRY.update(_same_names(
    "vector_quantize_pytorch.vector_quantize_pytorch", "fastvq.nn.vector_quantize", ("VectorQuantize",),
))
REGISTRY.update(_same_names("vector_quantize_pytorch.residual_vq", "fastvq.nn.residual_vq", ("ResidualVQ",)))
REGISTRY.update(_same_names("audiocraft.quantization.vq", "fastvq.nn.audiocraft", ("ResidualVectorQuantizer",)))
REGISTRY.update(_same_names("encodec.quantization.vq", "fastvq.nn.encodec", ("ResidualVectorQuantizer",)))
REGISTRY.update(_same_names(
    "moshi.quantization.vq", "fastvq.nn.moshi", ("ResidualVectorQuantizer", "SplitResidualVectorQuantizer"),
))
REGISTRY.update(_same_names("dac.nn.quantize", "fastvq.nn.dac", ("ResidualVectorQuantize",)))
REGISTRY.update(_same_names("snac.vq", "fastvq.nn.snac", ("ResidualVectorQuantize",)))
REGISTRY.update(_same_names("diffusers.models.autoencoders.vae", "fastvq.nn.diffusers", ("VectorQuantizer",)))
# LlamaGen and SEED-Voken are not packages: their code bases import these modules from the repository's root.
REGISTRY.update(_same_names("tokenizer.tokenizer_image.vq_model", "fastvq.nn.llamagen", ("VectorQuantizer",)))
REGISTRY.update(_same_names("src.IBQ.modules.vqvae.quantize", "fastvq.nn.seed_voken", ("IndexPropagationQuantize",)))
REGISTRY.update(_same_names("src.Open_MAGVIT2.modules.vqvae.lookup_free_quantize", "fastvq.nn.seed_voken", ("LFQ",)))


class Swapped(NamedTuple):
    """One replacement: the module's qualified name in the model, its original class and fastvq's class."""

    name: str
    original: type
    replacement: type


def _class_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(target: str) -> type:
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def swap_quantizers(model: nn.Module, *, classes: Optional[Mapping[str, str]] = None) -> list[Swapped]:
    """Replaces, in place, every submodule of ``model`` whose class is in :data:`REGISTRY` by fastvq's equivalent.

    Args:
        model: any ``nn.Module``; it is walked from the top, and a matched module is replaced together with its
            subtree (which is therefore not walked further). A module reachable under several names is replaced
            once, by one replacement shared by all of them.
        classes: extra rows, ``{"<module>:<qualified name>": "<module>:<fastvq class>"}``, taking precedence
            over :data:`REGISTRY`'s (for a subclass you know to be equivalent, or your own classes).

    Returns:
        One :class:`Swapped` ``(name, original class, replacement class)`` per replaced module, in the order of
        ``model.named_modules()``; empty when nothing is known, so a second call on a swapped model returns ``[]``.

    The model's state_dict keys and tensors, its modules' training flags, devices and dtypes are unchanged.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``classes`` is not a mapping of strings to strings.
        ValueError: ``model`` itself is a known quantizer (there is no parent to replace it in: call
            ``FastvqClass.from_original(model)``), or a matched module cannot be carried exactly (see the
            ``from_original`` protocol above).
        RuntimeError: a replacement whose state_dict keys differ from the original's (a bug in fastvq).

    Every replacement is built before any is put in place, so after an error the model is unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rows = dict(REGISTRY)
    if classes is not None:
        if not isinstance(classes, Mapping) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in classes.items()
        ):
            raise TypeError(f"classes must map '<module>:<class>' strings to strings, got {classes!r}")
        rows.update(classes)
    if _class_key(type(model)) in rows:
        raise ValueError(
            f"model is itself a {type(model).__qualname__}, which has no parent to be replaced in: use "
            f"{rows[_class_key(type(model))]}.from_original(model) instead"
        )

    swapped: list[Swapped] = []
    replacements: dict[int, nn.Module] = {}
    placements: list[tuple[nn.Module, str, nn.Module]] = []  # applied once every replacement is built
    visited: set[int] = set()

    def walk(parent: nn.Module, prefix: str) -> None:
        for child_name, child in parent._modules.items():
            if child is None:
                continue
            name = prefix + child_name
            if id(child) in replacements:
                placements.append((parent, child_name, replacements[id(child)]))
                continue
            target = rows.get(_class_key(type(child)))
            if target is None:
                if id(child) not in visited:
                    visited.add(id(child))
                    walk(child, name + ".")
                continue
            replacement = _resolve(target).from_original(child)
            expected, found = list(child.state_dict()), list(replacement.state_dict())
            if expected != found:
                raise RuntimeError(
                    f"{target}.from_original changed the state_dict keys of {name!r}: "
                    f"{sorted(set(expected) ^ set(found))[:8]} differ"
                )
            replacements[id(child)] = replacement
            placements.append((parent, child_name, replacement))
            swapped.append(Swapped(name, type(child), type(replacement)))

    walk(model, "")
    for parent, child_name, replacement in placements:
        parent._modules[child_name] = replacement
    return swapped
