"""The PNG pictures of a run: image grids (reconstructions, samples) and code-usage charts (Pillow)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

BACKGROUND = (255, 255, 255)
BAR_COLOUR = (52, 101, 164)
UNUSED_COLOUR = (204, 0, 0)
TEXT_COLOUR = (20, 20, 20)
# Small images are enlarged (nearest neighbour) so that an 8 x 8 digit is visible.
MIN_TILE = 32


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:  # pragma: no cover - Pillow is a dependency of fastvq
        raise ImportError("writing pictures needs Pillow: pip install pillow") from None
    return Image, ImageDraw, ImageFont


def image_grid(images: Tensor, columns: int, padding: int = 2) -> Tensor:
    """``images [N, C, H, W]`` in ``[0, 1]`` -> one uint8 picture ``[H', W', 3]``, ``columns`` per row,
    each tile enlarged to at least ``MIN_TILE`` pixels, on a white background."""
    images = images.detach().float().cpu().clamp(0, 1)
    count, channels, height, width = images.shape
    if channels == 1:
        images = images.expand(-1, 3, -1, -1)
    elif channels != 3:
        raise ValueError(f"pictures need 1 or 3 channels, got {channels}")
    scale = max(1, math.ceil(MIN_TILE / max(height, width)))
    images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    tile_h, tile_w = height * scale, width * scale
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    grid = torch.ones(3, rows * (tile_h + padding) + padding, columns * (tile_w + padding) + padding)
    for index in range(count):
        top = padding + (index // columns) * (tile_h + padding)
        left = padding + (index % columns) * (tile_w + padding)
        grid[:, top : top + tile_h, left : left + tile_w] = images[index]
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def save_image_grid(images: Tensor, path: Path, columns: int, title: Optional[str] = None) -> Path:
    """Writes ``image_grid(images, columns)`` to ``path`` as PNG, with an optional title line above."""
    Image, ImageDraw, ImageFont = _pil()
    pixels = image_grid(images, columns)
    picture = Image.fromarray(pixels.numpy())
    if title:
        font = ImageFont.load_default()
        banner = 16
        canvas = Image.new("RGB", (picture.width, picture.height + banner), BACKGROUND)
        canvas.paste(picture, (0, banner))
        ImageDraw.Draw(canvas).text((4, 2), title, fill=TEXT_COLOUR, font=font)
        picture = canvas
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG", optimize=True)
    return path


def save_reconstructions(originals: Tensor, reconstructions: Tensor, path: Path, columns: int = 16) -> Path:
    """Originals in the upper rows, their reconstructions in the rows below, same order."""
    count = min(originals.shape[0], columns * max(1, 32 // columns))
    top, bottom = originals[:count], reconstructions[:count]
    return save_image_grid(torch.cat([top, bottom]), path, columns, title="originals (top) / reconstructions (bottom)")


def save_usage_chart(counts: Sequence[Tensor], names: Sequence[str], path: Path, width: int = 640, height: int = 140) -> Path:
    """One bar chart per codebook of how often each code was used (codes sorted by use; unused
    codes marked red along the axis), with codes used and perplexity in the panel's title."""
    Image, ImageDraw, ImageFont = _pil()
    font = ImageFont.load_default()
    banner, margin = 16, 6
    panel = height + banner
    canvas = Image.new("RGB", (width, panel * len(counts) + margin), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for index, (count, name) in enumerate(zip(counts, names)):
        count = count.detach().double().cpu()
        size = count.numel()
        total = float(count.sum())
        probs = count / max(total, 1.0)
        perplexity = math.exp(-float((probs * probs.clamp_min(1e-12).log()).sum())) if total else 0.0
        used = int((count > 0).sum())
        top = index * panel
        draw.text((margin, top + 2), f"{name}: {used}/{size} codes used, perplexity {perplexity:.1f} "
                                     f"(codes sorted by use, {int(total)} vectors)", fill=TEXT_COLOUR, font=font)
        ordered = count.sort(descending=True).values
        peak = float(ordered[0]) if size and total else 1.0
        plot_left, plot_right = margin, width - margin
        base = top + panel - 4
        bar_width = (plot_right - plot_left) / max(size, 1)
        for code in range(size):
            left = plot_left + code * bar_width
            right = max(left, plot_left + (code + 1) * bar_width - (1 if bar_width >= 3 else 0))
            value = float(ordered[code])
            if value > 0:
                bar = max(1.0, (height - 8) * value / peak)
                draw.rectangle([left, base - bar, right, base], fill=BAR_COLOUR)
            else:
                draw.rectangle([left, base - 2, right, base], fill=UNUSED_COLOUR)
        draw.line([plot_left, base + 1, plot_right, base + 1], fill=TEXT_COLOUR)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", optimize=True)
    return path

