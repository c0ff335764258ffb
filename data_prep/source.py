"""What a dataset reader hands the shard writer: one plan per split."""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray, numeric as _np_numeric
except ImportError:  # numpy 1.26
    from numpy.core import multiarray as _np_multiarray, numeric as _np_numeric


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
    encode the image). Raises `Rejected` for a bad item.

    The metadata may hold `CONVERSIONS`: the names of the conversions made to read the item
    as 8-bit RGB (`decode.open_rgb`'s, e.g. "16bit_scaled"). The shard writer takes that
    entry out of the sample's json and counts it in the manifest's "conversions"."""


CONVERSIONS = "conversions"
"""The metadata key of an item's conversions (see `SplitPlan.get`): never stored in its json."""


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global that data does not need: calling it could run any code."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode`, as Python 3 writes bytes (an array's buffer) into protocol 0-2 pickles;
    latin-1 only."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise RefusedGlobal(f"refused _codecs.encode to {encoding!r} (only latin-1 carries bytes)")
    return codecs.encode(text, "latin-1")


_ARRAY_GLOBALS = {
    **{(module, name): getattr(_np_multiarray, name)
       for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")},
    **{(module, "_frombuffer"): _np_numeric._frombuffer  # protocol 5 arrays
       for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
"""Every global a pickle of dicts, lists, strings, numbers and numpy arrays or scalars names, from
Python 2 or 3 and numpy 1 or 2 (a pickle calls the globals it names: nothing else is let through)."""


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: any other global raises `RefusedGlobal`."""

    def find_class(self, module: str, name: str):
        try:
            return _ARRAY_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"it names the global {module}.{name}, which is not numpy array data") from None


def load_data_pickle(file: BinaryIO):
    """A dataset's pickled batch (dicts, lists, numpy arrays; Python 2 strings read as latin-1),
    loaded without running code from it: see `ArrayUnpickler`."""
    return ArrayUnpickler(file, encoding="latin1").load()
