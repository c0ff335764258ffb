"""Image grids for samples and reconstructions (TensorBoard and PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_prep.storage import LocalStore


def make_grid(rows: list[torch.Tensor | np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of uint8 images (N, H, W, 3), all the same shape -> one uint8 (H', W', 3) grid."""
    rows = [r.cpu().numpy() if isinstance(r, torch.Tensor) else np.asarray(r) for r in rows]
    n, h, w, c = rows[0].shape
    if any(r.shape != rows[0].shape for r in rows):
        raise ValueError(f"grid rows differ in shape: {[r.shape for r in rows]}")
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = image
    return grid


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    LocalStore(path.parent).write_with(path.name, lambda f: Image.fromarray(image).save(f, format="PNG"))
    return path
