"""Image helpers: ``[-1, 1]`` tensors to uint8 arrays and sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastdiff.errors import InputError

__all__ = ["to_pixels", "from_pixels", "to_uint8", "image_grid", "save_grid", "save_panels"]


def to_pixels(images: Tensor) -> Tensor:
    """``[-1, 1]`` floats -> the uint8 pixels a saved image holds (clipped, rounded), same layout and device.

    The one quantisation rule of fastdiff: saving (:func:`to_uint8`), content hashes and every FID use it, so a
    sample scored on the fly and the same sample scored from its saved file give the same figure (the protocol of
    EDM, clean-fid, OpenAI's evaluator and torch-fidelity, which all score uint8 images)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_pixels(pixels: Tensor) -> Tensor:
    """uint8 pixels -> float32 in ``[-1, 1]`` (exact inverse of :func:`to_pixels` on the 8-bit grid)."""
    return pixels.float() / 127.5 - 1


def to_uint8(images: Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in ``[-1, 1]`` -> ``(N, H, W, C)`` uint8 (values outside are clipped, as when saving a PNG)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"expected images of shape (N, 1 or 3, H, W); got {tuple(images.shape)}")
    return to_pixels(images.cpu()).permute(0, 2, 3, 1).numpy()


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 1):
    """A PIL image tiling ``images`` ``nrow`` per row (default: a square-ish grid) with ``pad`` pixels between."""
    from PIL import Image

    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Save a grid PNG, upscaled ``scale`` times with nearest neighbours (small images stay readable)."""
    from PIL import Image

    grid = image_grid(images, nrow)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def save_panels(panels: list[tuple[str, Tensor]], path: str | Path, nrow: int = 10) -> Path:
    """Sample grids side by side in one picture, each under its title (e.g. teacher | solver | student on the same
    classes and seeds)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's plotting backend stays as it is

    if not panels:
        raise InputError("save_panels needs at least one (title, images) panel")
    fig = Figure(figsize=(3.2 * len(panels), 3.6), dpi=150)
    for ax, (title, images) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.imshow(image_grid(images, nrow), cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
