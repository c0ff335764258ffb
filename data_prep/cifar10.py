"""CIFAR-10 from the python release (`cifar-10-batches-py/`), split as the official code splits it.

train/valid: scikit-learn's `train_test_split(test_size=5000,
random_state=11172018)` of the 50,000 training images, i.e. a
`RandomState(11172018)` permutation whose first 5000 are valid and the
rest train, in permutation order; test: `test_batch` in file order.
The batches are read with `source.ArrayUnpickler`: one that would run code is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .source import RefusedGlobal, SourceError, SplitPlan, load_data_pickle

SPLIT_SEED = 11172018
NUM_VALID = 5000
_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def _find_root(src: Path) -> Path:
    for candidate in (src, src / "cifar-10-batches-py"):
        if all((candidate / f).is_file() for f in [*_TRAIN_FILES, "test_batch"]):
            return candidate
    raise SourceError(
        f"{src} is not the CIFAR-10 python release: expected cifar-10-batches-py/ (or its contents) "
        "with data_batch_1 ... data_batch_5 and test_batch, as unpacked from cifar-10-python.tar.gz")


def _load(path: Path) -> tuple[np.ndarray, list[int]]:
    try:
        with open(path, "rb") as f:
            batch = load_data_pickle(f)
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = list(batch["labels"])
    except RefusedGlobal as err:
        raise SourceError(f"{path}: not a CIFAR-10 batch: {err}; refusing to run code from it") from None
    except Exception as err:  # a truncated or foreign pickle
        raise SourceError(f"{path}: not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise SourceError(f"{path}: expected 'data' of shape (N, 3072) and N labels, got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def split_indices(num_train: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) indices into the training set, exactly as scikit-learn's ShuffleSplit draws them."""
    perm = np.random.RandomState(SPLIT_SEED).permutation(num_train)
    return perm[NUM_VALID:], perm[:NUM_VALID]


def plan(src: Path) -> dict[str, SplitPlan]:
    root = _find_root(Path(src))
    parts = [_load(root / f) for f in _TRAIN_FILES]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = [y for p in parts for y in p[1]]
    test_x, test_y = _load(root / "test_batch")
    tr, va = split_indices(len(train_x))
    how_trva = (f"train_test_split(test_size={NUM_VALID}, random_state={SPLIT_SEED}) of the "
                f"{len(train_x)} training images (RandomState permutation; first {NUM_VALID} valid)")

    def split(images, labels, indices, how, source_files):
        return SplitPlan(
            num_samples=len(indices), how=how, resolution=32,
            get=lambda i: (images[indices[i]], int(labels[indices[i]]),
                           {"source": "cifar10", "file": source_files, "index": int(indices[i])}, None))

    return {
        "train": split(train_x, train_y, tr, how_trva, "data_batch_1-5"),
        "valid": split(train_x, train_y, va, how_trva, "data_batch_1-5"),
        "test": split(test_x, test_y, np.arange(len(test_x)), "test_batch in file order", "test_batch"),
    }
