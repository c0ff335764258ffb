"""Downsampled ImageNet, 32 or 64 px, in either layout users have.

- PNG folders `train_32x32/` + `valid_32x32/` (or 64): the set the paper
  used. train/valid = the last 5000 of a `numpy.random.seed(42)`
  permutation of the training files, test = the valid folder. The official
  code takes the files in `glob` order, which depends on the filesystem, so
  its exact membership cannot be reproduced; we take them sorted by name.
  Files over the pixel budget are refused before decoding; a non-RGB one
  is converted by `decode.decode_rgb`'s rules and counted in the
  manifest's conversions (its bytes are kept only where nothing changed).
- Pickled batches `train_data_batch_1` ... `_10` + `val_data` (planar RGB,
  1-indexed labels): the same permutation rule over the batches' rows in
  file order; labels are stored 0-indexed in `.cls`. Read with
  `source.ArrayUnpickler`: a batch that would run code is refused.

Valid samples are written in permutation order; train samples in source
order (training shuffles them; source order keeps the reads sequential
over 1.28M images).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from .decode import decode_rgb, opened
from .source import CONVERSIONS, RefusedGlobal, Rejected, SourceError, SplitPlan, load_data_pickle

SPLIT_SEED, NUM_VALID = 42, 5000


def split_valid(num_train: int) -> np.ndarray:
    """Indices of the valid images among `num_train` training images, in permutation order."""
    np.random.seed(SPLIT_SEED)  # the official code seeds numpy's global generator
    return np.random.permutation(num_train)[-NUM_VALID:]


def _batch_files(src: Path) -> list[Path]:
    files = sorted(src.glob("train_data_batch_*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    return files


def plan(src: Path, size: int) -> dict[str, SplitPlan]:
    src = Path(src)
    folder = src / f"train_{size}x{size}"
    if folder.is_dir():
        return _plan_folders(src, size)
    if _batch_files(src) and (src / "val_data").is_file():
        return _plan_batches(src, size)
    raise SourceError(
        f"{src} is not downsampled ImageNet {size}x{size}: expected the PNG folders "
        f"train_{size}x{size}/ and valid_{size}x{size}/, or the pickled batches "
        "train_data_batch_1 ... train_data_batch_10 and val_data")


def _split(num_train: int) -> tuple[list[int], list[int]]:
    if num_train <= NUM_VALID:
        raise SourceError(f"only {num_train} training images: the split holds out {NUM_VALID}")
    valid = split_valid(num_train)
    held = set(valid.tolist())
    return [i for i in range(num_train) if i not in held], [int(i) for i in valid]


_HOW = (f"numpy.random.seed({SPLIT_SEED}); permutation of the training images: last {NUM_VALID} "
        "valid, the rest train; test = the official validation set")


def _plan_folders(src: Path, size: int) -> dict[str, SplitPlan]:
    train_files = sorted((src / f"train_{size}x{size}").glob("*.png"))
    test_dir = src / f"valid_{size}x{size}"
    test_files = sorted(test_dir.glob("*.png")) if test_dir.is_dir() else []
    if not test_files:
        raise SourceError(f"{test_dir} is missing or holds no PNG files (the test set)")
    train, valid = _split(len(train_files))

    def get(files, indices):
        def item(i):
            path = files[indices[i]]
            with opened(path) as image:  # within the pixel budget, or rejected before decoding
                if image.size != (size, size):
                    raise Rejected(str(path), f"{image.size[0]}x{image.size[1]} {image.mode}, "
                                              f"expected {size}x{size} RGB")
                rgb, conversions = decode_rgb(image, name=str(path))
                # the file's own bytes only where they decode to exactly what is stored
                data = path.read_bytes() if image.format == "PNG" and not conversions else None
            return np.asarray(rgb), None, {"source": f"imagenet{size}", "file": path.name, "index": int(indices[i]),
                                           CONVERSIONS: conversions}, data
        return item

    return {
        "train": SplitPlan(len(train), _HOW, size, get(train_files, train)),
        "valid": SplitPlan(len(valid), _HOW, size, get(train_files, valid)),
        "test": SplitPlan(len(test_files), _HOW, size, get(test_files, list(range(len(test_files))))),
    }


def _load_batch(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = load_data_pickle(f)
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64) - 1
    except RefusedGlobal as err:
        raise SourceError(f"{path}: not an ImageNet batch: {err}; refusing to run code from it") from None
    except Exception as err:
        raise SourceError(f"{path}: not a readable ImageNet batch ({type(err).__name__}: {err})") from None
    if data.ndim != 2 or data.shape[1] != 3 * size * size or len(labels) != len(data):
        raise SourceError(f"{path}: expected 'data' of shape (N, {3 * size * size}) and N labels, "
                          f"got {data.shape}: is this the {size}x{size} release?")
    return data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1), labels


def _plan_batches(src: Path, size: int) -> dict[str, SplitPlan]:
    files = _batch_files(src)
    counts = [len(_load_batch(f, size)[1]) for f in files]  # also checks each file before any work
    starts = np.cumsum([0, *counts])
    train, valid = _split(int(starts[-1]))

    @lru_cache(maxsize=1)
    def batch(k: int):
        return _load_batch(files[k], size)

    def row(i: int):
        k = int(np.searchsorted(starts, i, side="right") - 1)
        images, labels = batch(k)
        j = i - starts[k]
        # a copy, not a view: a view held (the valid cache) would keep its whole batch file in memory
        return images[j].copy(), int(labels[j]), {"source": f"imagenet{size}", "file": files[k].name,
                                                  "index": int(i)}, None

    valid_rows = sorted(valid)  # read once, in file order, then served in permutation order
    cache = {i: row(i) for i in valid_rows}
    test_images, test_labels = _load_batch(src / "val_data", size)

    return {
        "train": SplitPlan(len(train), _HOW, size, lambda i: row(train[i])),
        "valid": SplitPlan(len(valid), _HOW, size, lambda i: cache[valid[i]]),
        "test": SplitPlan(len(test_labels), _HOW, size,
                          lambda i: (test_images[i], int(test_labels[i]),
                                     {"source": f"imagenet{size}", "file": "val_data", "index": i}, None)),
    }
