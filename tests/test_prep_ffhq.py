"""`vdvae prep ffhq1024|ffhq256` on FFHQ-like fixtures in the release layout, bad files included."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.prep import prep
from data_prep.source import SourceError

GOOD = [0, 1, 999, 1000, 64999, 65000, 69999]


def face(number: int) -> np.ndarray:
    """A smooth 1024 px image that differs per number (compresses well, so fixtures stay small)."""
    y, x = np.mgrid[0:1024, 0:1024]
    return np.stack([(x + number) % 256, (y * 2 + number) % 256, ((x + y) // 3 + number) % 256],
                    -1).astype(np.uint8)


@pytest.fixture(scope="module")
def ffhq_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffhq") / "images1024x1024"
    for n in GOOD:
        folder = root / f"{n // 1000 * 1000:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(face(n)).save(folder / f"{n:05d}.png", compress_level=1)
    bad = root / "02000"
    bad.mkdir()
    data = (root / "00000" / "00001.png").read_bytes()
    (bad / "02001.png").write_bytes(data[: len(data) // 2])                        # truncated
    Image.fromarray(face(2)[:512, :512]).save(bad / "02002.png")                   # wrong size
    Image.fromarray(face(3)).convert("L").save(bad / "02003.png")                  # not RGB
    (bad / "02004.png").write_bytes(b"not an image at all")                        # unreadable
    (root / "README.txt").write_text("ignored")
    return root.parent


def read(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    samples = list(wds.WebDataset([str(folder / s["name"]) for s in manifest["shards"]], shardshuffle=False))
    return manifest, samples


def test_ffhq1024_keeps_the_original_bytes_and_lists_rejections(ffhq_src, tmp_path):
    prep("ffhq1024", ffhq_src, str(tmp_path), samples_per_shard=3, progress=False)
    train, train_samples = read(tmp_path / "train")
    valid, valid_samples = read(tmp_path / "valid")
    assert [json.loads(s["json"])["index"] for s in train_samples] == [0, 1, 999, 1000, 64999]
    assert [json.loads(s["json"])["index"] for s in valid_samples] == [65000, 69999]
    for s in train_samples + valid_samples:
        n = json.loads(s["json"])["index"]
        path = ffhq_src / "images1024x1024" / f"{n // 1000 * 1000:05d}" / f"{n:05d}.png"
        assert s["png"] == path.read_bytes()  # never re-encoded
    reasons = {r["file"].rsplit("/", 1)[-1]: r["reason"] for r in train["rejections"]}
    assert set(reasons) == {"02001.png", "02002.png", "02003.png", "02004.png"}
    assert "unreadable" in reasons["02001.png"] and "512x512, expected 1024x1024" in reasons["02002.png"]
    assert "mode L" in reasons["02003.png"] and "unreadable" in reasons["02004.png"]
    assert train["num_samples"] == 5 and valid["rejections"] == []


def test_strict_stops_at_the_first_bad_file(ffhq_src, tmp_path):
    with pytest.raises(SourceError, match=r"02001.png: unreadable.*--strict"):
        prep("ffhq1024", ffhq_src, str(tmp_path), samples_per_shard=3, strict=True, progress=False)


def test_ffhq256_split_and_resize(ffhq_src, tmp_path):
    np.random.seed(5)
    perm = np.random.permutation(70000)
    valid_numbers = set(perm[-7000:].tolist())
    prep("ffhq256", ffhq_src, str(tmp_path), samples_per_shard=4, progress=False)
    seen = {}
    for split in ("train", "valid"):
        if not (tmp_path / split / "manifest.json").exists():
            continue
        manifest, samples = read(tmp_path / split)
        assert manifest["resolution"] == 256 and manifest["bits"] == 5
        for s in samples:
            n = json.loads(s["json"])["index"]
            seen[n] = split
            image = np.asarray(Image.open(io.BytesIO(s["png"])))
            expected = np.asarray(Image.fromarray(face(n)).resize((256, 256), Image.BILINEAR))
            assert image.shape == (256, 256, 3) and np.array_equal(image, expected)
    assert seen == {n: "valid" if n in valid_numbers else "train" for n in GOOD}
    order = [json.loads(s["json"])["index"] for s in read(tmp_path / "train")[1]]
    position = {int(n): i for i, n in enumerate(perm)}
    assert order == sorted(order, key=position.get)  # permutation order, as the official code


def test_not_ffhq_fails_before_any_work(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cat.png").write_bytes(b"x")
    with pytest.raises(SourceError, match="holds no FFHQ images"):
        prep("ffhq1024", tmp_path / "src", str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_image_folder_center_crop_resize(tmp_path):
    from data_prep.folder import center_crop_resize

    src = tmp_path / "photos" / "a"
    src.mkdir(parents=True)
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 20:60] = 200  # the center square is uniform
    Image.fromarray(wide).save(src / "wide.png")
    for i in range(5):
        Image.fromarray(face(i)[:300, :200]).save(src / f"p{i}.jpg")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    prep("folder", tmp_path / "photos", str(tmp_path / "out"), resolution=16, num_valid=2, progress=False)
    train, train_s = read(tmp_path / "out" / "train")
    valid, valid_s = read(tmp_path / "out" / "valid")
    assert train["num_samples"] + valid["num_samples"] == 6  # 7 files, one broken
    assert valid["num_samples"] + len(valid["rejections"]) == 2
    rejected = train["rejections"] + valid["rejections"]
    assert [r["file"].rsplit("/", 1)[-1] for r in rejected] == ["broken.jpg"]
    for s in train_s + valid_s:
        meta = json.loads(s["json"])
        image = np.asarray(Image.open(io.BytesIO(s["png"])))
        with Image.open(tmp_path / "photos" / meta["file"]) as original:
            assert np.array_equal(image, center_crop_resize(original.convert("RGB"), 16))
        if meta["file"].endswith("wide.png"):
            assert (image == 200).all()
    with pytest.raises(ValueError, match="--resolution is required"):
        prep("folder", tmp_path / "photos", str(tmp_path / "o2"), progress=False)
