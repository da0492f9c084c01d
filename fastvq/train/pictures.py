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


def save_usage_chart(
    counts: Sequence[Tensor], names: Sequence[str], path: Path, width: int = 640, height: int = 140
) -> Path:
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



# The panels of a run's training curves: (title, metrics drawn in it); a panel none of whose metrics
# the rows hold is left out, so the stage-1 and prior runs share the list.
CURVE_PANELS = (
    ("loss", ("train_loss", "val_loss")),
    ("held-out val_nmse", ("val_nmse",)),
    ("perplexity", ("perplexity",)),
    ("codes used", ("codes_used",)),
    ("held-out bits per code", ("val_bits_per_code", "val_masked_bits_per_code")),
)


def save_training_curves(rows: Sequence[dict], path: Path, title: str) -> Optional[Path]:
    """Draws the metrics rows of a run (``metrics.jsonl`` or ``prior_metrics.jsonl``) against the
    epoch as a PNG at ``path``: one panel per quantity of ``CURVE_PANELS`` the rows hold (codes used
    with the codebook size as a dashed line). Returns ``path``, or None when matplotlib, an optional
    dependency (``pip install matplotlib``), is missing or there are no rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed or touched
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    epochs = [row["epoch"] for row in rows]
    panels = [(name, [key for key in keys if any(isinstance(row.get(key), (int, float)) for row in rows)])
              for name, keys in CURVE_PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for axis, (name, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(epoch, row[key]) for epoch, row in zip(epochs, rows) if isinstance(row.get(key), (int, float))]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None,
                      label=key)
        size = rows[-1].get("codebook_size")
        if name == "codes used" and isinstance(size, int):
            axis.axhline(size, linestyle="--", color="grey", linewidth=1, label=f"codebook size {size}")
        if name == "held-out val_nmse" and min(row.get("val_nmse", 1.0) for row in rows) > 0:
            axis.set_yscale("log")
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if len(keys) > 1 or name == "codes used":
            axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
