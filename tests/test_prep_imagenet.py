"""`vdvae prep imagenet32|imagenet64` from PNG folders and from pickled batches."""

import json
import pickle

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.prep import prep
from data_prep.source import SourceError

NUM_TRAIN, NUM_TEST = 5012, 7


def read(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, list(wds.WebDataset([str(folder / s["name"]) for s in manifest["shards"]],
                                         shardshuffle=False).decode("rgb8"))


def expected_membership(n):
    np.random.seed(42)
    perm = np.random.permutation(n)
    return sorted(perm[:-5000].tolist()), perm[-5000:].tolist()


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    root = tmp_path_factory.mktemp("in32pkl")
    rng = np.random.default_rng(1)
    rows, labels = [], []
    for k, n in enumerate([2000, 2000, NUM_TRAIN - 4000], start=1):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        lab = rng.integers(1, 1001, n).tolist()
        with open(root / f"train_data_batch_{k}", "wb") as f:
            pickle.dump({"data": data, "labels": lab, "mean": data.mean(0)}, f)
        rows.append(data)
        labels += lab
    test = rng.integers(0, 256, (NUM_TEST, 3072), dtype=np.uint8)
    with open(root / "val_data", "wb") as f:
        pickle.dump({"data": test, "labels": [5] * NUM_TEST}, f)
    images = np.concatenate(rows).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return root, images, np.asarray(labels) - 1


def test_pickled_batches(pickled, tmp_path):
    src, images, labels = pickled
    prep("imagenet32", src, str(tmp_path), samples_per_shard=1000, progress=False)
    train_ids, valid_ids = expected_membership(NUM_TRAIN)
    _, train = read(tmp_path / "train")
    _, valid = read(tmp_path / "valid")
    manifest, test = read(tmp_path / "test")
    assert [s["json"]["index"] for s in train] == train_ids  # source order
    assert [s["json"]["index"] for s in valid] == valid_ids  # permutation order
    for s in train[:20] + valid[:20]:
        i = s["json"]["index"]
        assert np.array_equal(s["png"], images[i]) and s["cls"] == labels[i]
    assert len(test) == NUM_TEST and all(s["cls"] == 4 for s in test)  # 1-indexed 5 -> 4
    assert "seed(42)" in manifest["how"]


def test_png_folders(tmp_path):
    src = tmp_path / "src"
    (src / "train_32x32").mkdir(parents=True)
    (src / "valid_32x32").mkdir()
    rng = np.random.default_rng(2)
    names = [f"{i:08d}_{rng.integers(1000)}.png" for i in range(NUM_TRAIN)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / "train_32x32" / name)
    for i in range(NUM_TEST):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / "valid_32x32" / f"t{i}.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / "valid_32x32" / "small.png")
    prep("imagenet32", src, str(tmp_path / "out"), samples_per_shard=2000, progress=False)
    _, valid_ids = expected_membership(NUM_TRAIN)
    _, valid = read(tmp_path / "out" / "valid")
    assert [s["json"]["file"] for s in valid] == [sorted(names)[i] for i in valid_ids]
    manifest, test = read(tmp_path / "out" / "test")
    assert len(test) == NUM_TEST
    assert [r["reason"] for r in manifest["rejections"]] == ["16x16 RGB, expected 32x32 RGB"]


def test_wrong_resolution_or_layout_is_refused(pickled, tmp_path):
    src, _, _ = pickled
    with pytest.raises(SourceError, match="expected 'data' of shape \\(N, 12288\\).*64x64 release"):
        prep("imagenet64", src, str(tmp_path), progress=False)
    with pytest.raises(SourceError, match="not downsampled ImageNet 32x32"):
        prep("imagenet32", tmp_path, str(tmp_path / "o"), progress=False)


def test_pickled_plan_holds_no_view_into_a_batch_file(pickled):
    """The valid images are read ahead; views would pin every training batch file in memory."""
    from data_prep.imagenet import plan

    src, images, _ = pickled
    plans = plan(src, 32)
    for split in ("train", "valid"):
        image = plans[split].get(3)[0]
        assert image.base is None and image.nbytes == 32 * 32 * 3
