"""What a dataset reader hands the shard writer: one plan per split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image


class SourceError(ValueError):
    """The source is missing, empty, or not the named dataset; raised before any work."""


class Rejected(Exception):
    """One bad input item (unreadable, truncated, wrong size, not RGB): listed and skipped."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


@dataclass(frozen=True)
class SplitPlan:
    num_samples: int
    how: str
    """How the split was made, in words a reader can check against the paper's code."""
    resolution: int
    get: Callable[[int], tuple[np.ndarray | Image.Image, int | None, dict, bytes | None]]
    """i -> (uint8 image (H, W, 3), or a decoded RGB PIL image, label or None, metadata
    for the sample's json, the source's own PNG bytes to store as they are, or None to
    encode the image). Raises `Rejected` for a bad item."""
