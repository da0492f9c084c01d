"""Sampling: code maps drawn from a run's prior, decoded by its stage-1 model, saved as a picture."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from ..models import HierarchicalPrior
from ..models.priors import prior_sample
from . import checkpoint
from .common import PRIOR_CHECKPOINT, PRIOR_MODELS, SAMPLES, RunError
from .distributed import default_threads, resolve_device
from .pictures import save_image_grid
from .prior import build_prior, check_prior_fits
from .stage1 import trained_stage1


def sample(
    run: Path,
    n: int = 64,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    steps: Optional[int] = None,
    seed: int = 0,
    device: str = "auto",
    threads: Optional[int] = None,
    out: Optional[Path] = None,
    columns: Optional[int] = None,
) -> Path:
    """Draws ``n`` code maps from the run's prior, decodes them and writes the picture (``samples.png``).

    ``steps`` is the number of parallel decoding steps of a ``maskgit`` prior (its default when None);
    the other priors draw one position at a time and refuse it."""
    run = Path(run)
    if n < 1:
        raise RunError(f"-n must be at least 1, got {n}")
    torch.set_num_threads(threads or default_threads())
    target = resolve_device(device, 0)
    config, stage1_state = checkpoint.load_run(run)
    prior_path = run / PRIOR_CHECKPOINT
    prior_state = checkpoint.read_checkpoint(prior_path, checkpoint.PRIOR_FORMAT)
    check_prior_fits(prior_state, config, prior_path)
    path = Path(out) if out is not None else run / SAMPLES
    checkpoint.require_writable(path.parent, f"fastvq sample writes {path.name} there (--out chooses another path)")
    model = trained_stage1(config, stage1_state, target)
    image_size = tuple(config["image_size"])
    prior_config = prior_state.get("config")
    if not isinstance(prior_config, dict) or prior_config.get("prior") not in PRIOR_MODELS \
            or not isinstance(prior_config.get("prior_args"), dict):
        raise RunError(f"{prior_path}: its config does not name one of fastvq's priors ({', '.join(PRIOR_MODELS)}) "
                       "with a dict of arguments (fields 'prior', 'prior_args'): refused")
    try:
        prior = build_prior(prior_config["prior"], prior_config["prior_args"], model, image_size).to(target)
        prior.load_state_dict(prior_state["model"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise RunError(f"{prior_path} does not fit the model of {run} ({type(error).__name__}: {error}): "
                       f"train its prior again with fastvq prior --run {run}") from None
    prior.eval()
    generator = torch.Generator(device=target).manual_seed(seed)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, steps=steps)
    try:
        if isinstance(prior, HierarchicalPrior):
            top_shape, bottom_shape = model.code_shape(*image_size)
            codes = prior.sample(n, top_shape, bottom_shape, **options)
        else:
            codes = prior_sample(prior, n, model.code_shape(*image_size), **options)
    except ValueError as error:
        raise RunError(str(error)) from None
    with torch.no_grad():
        images = model.decode_codes(codes).float().cpu()
    save_image_grid(images, path, columns or max(1, math.ceil(math.sqrt(n))))
    return path
