"""`vdvae prep` reads what it is given correctly: 16-bit, EXIF-rotated, palette, gray+alpha and CMYK
images, images over the pixel budget, and pickled batch files that would run code."""

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep import cifar10, imagenet
from data_prep.decode import MAX_PIXELS
from data_prep.ffhq import resize_256
from data_prep.prep import prep
from data_prep.source import SourceError, load_data_pickle

REPO = Path(__file__).resolve().parents[1]


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows=None) -> bytes:
    """A PNG written by hand (PIL writes no 16-bit colour PNGs): `rows` (H, W[, C]) samples, or
    all zeros streamed through zlib (a huge image that compresses to a few KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    if rows is None:
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
        row = bytes(1 + width * channels * bit_depth // 8)  # filter byte 0, then zero samples
        idat = b"".join(packer.compress(row * min(256, height - r)) for r in range(0, height, 256))
    else:
        dtype = ">u2" if bit_depth == 16 else "u1"
        idat = b"".join(packer.compress(b"\0" + np.ascontiguousarray(r, dtype).tobytes()) for r in rows)
    idat += packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def read(folder: Path):
    manifest = json.loads((folder / "manifest.json").read_text())
    samples = list(wds.WebDataset([str(folder / s["name"]) for s in manifest["shards"]], shardshuffle=False))
    return manifest, {json.loads(s["json"])["file"].rsplit("/", 1)[-1]: s for s in samples}


def pixels(sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["png"])))


def prep_folder(src: Path, out: Path, resolution: int):
    prep("folder", src, str(out), resolution=resolution, num_valid=0, progress=False)
    return read(out / "train")


def gradient16(size: int = 64) -> np.ndarray:
    """0 .. 65535 over a size x size image."""
    return np.round(np.linspace(0, 65535, size * size)).astype(np.uint16).reshape(size, size)


def exif_rotated_jpeg(path: Path, width: int = 24, height: int = 16) -> np.ndarray:
    """A JPEG whose EXIF says orientation 6 (shown turned 90 degrees clockwise); returns the pixels a
    viewer shows."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 10, y * 15, (x < width // 2) * 200], -1).astype(np.uint8)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, quality=95, exif=exif)
    with Image.open(path) as stored:
        return np.rot90(np.asarray(stored.convert("RGB")), k=-1)  # 6: rotate 90 degrees clockwise


def test_16bit_images_are_scaled_not_clipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    gray = gradient16()
    Image.fromarray(gray).save(src / "gray16.png")  # PIL mode I;16
    rgb = np.stack([gray, gray.T, 65535 - gray], -1)
    (src / "rgb16.png").write_bytes(png_bytes(64, 64, 16, 2, rgb))
    manifest, samples = prep_folder(src, tmp_path / "out", 64)
    stored = pixels(samples["gray16.png"])
    assert stored.min() == 0 and stored.max() == 255
    assert np.array_equal(stored, np.repeat((gray >> 8)[..., None], 3, -1).astype(np.uint8))
    assert np.array_equal(pixels(samples["rgb16.png"]), (rgb >> 8).astype(np.uint8))
    assert manifest["conversions"] == {"16bit_scaled": 2, "grayscale": 1}
    assert manifest["rejections"] == []
    assert "conversions" not in json.loads(samples["gray16.png"]["json"])  # counted, not stored per sample
    assert set(json.loads(samples["gray16.png"]["json"])) == {"source", "index", "width", "height", "file"}


def test_exif_orientation_is_applied_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shown = exif_rotated_jpeg(src / "turned.jpg")  # 16 wide, 24 high as shown
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(src / "plain.png")
    manifest, samples = prep_folder(src, tmp_path / "out", 16)
    assert np.array_equal(pixels(samples["turned.jpg"]), shown[4:20])  # the center square, as shown
    assert manifest["conversions"] == {"exif_orientation": 1}


def face(number: int) -> np.ndarray:
    y, x = np.mgrid[0:1024, 0:1024]
    return np.stack([(x + number) % 256, (y * 3 + number) % 256, (x // 2) % 256], -1).astype(np.uint8)


def test_ffhq_exif_orientation_rejected_for_1024_applied_for_256(tmp_path):
    src = tmp_path / "ffhq"
    src.mkdir()
    Image.fromarray(face(0)).save(src / "00000.png", compress_level=1)
    turned = Image.fromarray(face(1))
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(src / "00001.png", compress_level=1, exif=exif)
    prep("ffhq1024", src, str(tmp_path / "o1024"), progress=False)
    manifest, samples = read(tmp_path / "o1024" / "train")
    assert set(samples) == {"00000.png"}
    [rejection] = manifest["rejections"]
    assert rejection["file"].endswith("00001.png")
    assert "EXIF orientation 6" in rejection["reason"] and "cannot be rotated" in rejection["reason"]
    assert manifest["conversions"] == {}

    prep("ffhq256", src, str(tmp_path / "o256"), progress=False)
    found = {}
    for split in ("train", "valid"):
        if (tmp_path / "o256" / split / "manifest.json").exists():
            manifest, samples = read(tmp_path / "o256" / split)
            found.update(samples)
            if "00001.png" in samples:
                assert manifest["conversions"] == {"exif_orientation": 1}
    assert np.array_equal(pixels(found["00001.png"]), resize_256(np.ascontiguousarray(np.rot90(face(1), k=-1))))
    assert np.array_equal(pixels(found["00000.png"]), resize_256(face(0)))


def test_palette_gray_alpha_and_cmyk_are_converted_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(src / "palette.png")
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    alpha = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(np.stack([gray, alpha], -1)).save(src / "gray_alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(src / "cmyk.jpg", quality=95)
    manifest, samples = prep_folder(src, tmp_path / "out", 16)
    assert np.array_equal(pixels(samples["palette.png"]), np.asarray(palette.convert("RGB")))
    assert np.array_equal(pixels(samples["gray_alpha.png"]), np.repeat(gray[..., None], 3, -1))  # alpha dropped
    with Image.open(src / "cmyk.jpg") as cmyk:
        assert cmyk.mode == "CMYK"
        assert np.array_equal(pixels(samples["cmyk.jpg"]), np.asarray(cmyk.convert("RGB")))
    assert manifest["conversions"] == {"alpha_dropped": 1, "cmyk": 1, "grayscale": 1, "palette": 1}


@pytest.fixture(scope="module")
def huge_pngs():
    """Small files whose headers declare 81 MP (over our budget, under PIL's warning), 100 MP
    (PIL warns) and 196 MP (PIL raises DecompressionBombError)."""
    return {f"blank{side}.png": png_bytes(side, side, 8, 0) for side in (9000, 10000, 14000)}


def test_images_over_the_pixel_budget_are_rejected_before_decoding(tmp_path, huge_pngs):
    assert 9000 * 9000 > MAX_PIXELS
    src = tmp_path / "src"
    src.mkdir()
    for name, data in huge_pngs.items():
        assert len(data) < 200_000
        (src / name).write_bytes(data)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "small.png")
    # in a fresh process, so that its peak memory is the prep's own
    script = ("import resource, sys\nfrom data_prep.prep import prep\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "prep('folder', sys.argv[1], sys.argv[2], resolution=8, num_valid=0, progress=False)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    run = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "DecompressionBomb" not in run.stderr, run.stderr
    growth_kib = int(run.stdout.split()[-1])
    assert growth_kib < 40 * 1024, f"peak memory grew by {growth_kib} KiB: the image was decoded"
    manifest, samples = read(tmp_path / "out" / "train")
    assert set(samples) == {"small.png"}
    reasons = {r["file"].rsplit("/", 1)[-1]: r["reason"] for r in manifest["rejections"]}
    assert set(reasons) == set(huge_pngs)
    budget = f"over the budget of {MAX_PIXELS:,} pixels per image: refused before decoding"
    assert reasons["blank9000.png"] == f"9000x9000 = 81,000,000 pixels, {budget}"
    assert reasons["blank10000.png"] == f"10000x10000 = 100,000,000 pixels, {budget}"
    assert reasons["blank14000.png"].startswith(budget) and "196000000 pixels" in reasons["blank14000.png"]


def test_imagenet_folders_convert_non_rgb_and_apply_the_budget(tmp_path, monkeypatch, huge_pngs):
    monkeypatch.setattr(imagenet, "NUM_VALID", 1)  # a tiny folder may hold one valid image out
    src = tmp_path / "src"
    (src / "train_32x32").mkdir(parents=True)
    (src / "valid_32x32").mkdir()
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(rgb).save(src / "valid_32x32" / "a_rgb.png")
    Image.fromarray(gray).save(src / "valid_32x32" / "b_gray.png")
    Image.fromarray(gradient16(32)).save(src / "valid_32x32" / "c_gray16.png")
    (src / "valid_32x32" / "d_huge.png").write_bytes(huge_pngs["blank9000.png"])
    for i in range(3):
        Image.fromarray(rgb).save(src / "train_32x32" / f"{i}.png")
    prep("imagenet32", src, str(tmp_path / "out"), progress=False)
    manifest, samples = read(tmp_path / "out" / "test")
    assert samples["a_rgb.png"]["png"] == (src / "valid_32x32" / "a_rgb.png").read_bytes()  # kept as it is
    assert np.array_equal(pixels(samples["b_gray.png"]), np.repeat(gray[..., None], 3, -1))
    assert np.array_equal(pixels(samples["c_gray16.png"]), np.repeat((gradient16(32) >> 8)[..., None], 3, -1))
    assert manifest["conversions"] == {"16bit_scaled": 1, "grayscale": 2}
    [rejection] = manifest["rejections"]
    assert rejection["file"].endswith("d_huge.png") and "refused before decoding" in rejection["reason"]


class _RunsCode:
    """Pickles as a call to `call(*args)`: what a crafted batch file does when unpickled."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _crafted(marker: Path, how: str) -> dict:
    payload = (_RunsCode(os.system, f"touch '{marker}'") if how == "os.system"
               else _RunsCode(open, str(marker), "w"))
    return {"data": payload, "labels": [0]}


@pytest.mark.parametrize("how", ["os.system", "open"])
def test_a_cifar_batch_that_would_run_code_is_refused(cifar_src, tmp_path, how):
    src, _ = cifar_src
    root = tmp_path / "cifar-10-batches-py"
    shutil.copytree(src / "cifar-10-batches-py", root)
    marker = tmp_path / "marker"
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump(_crafted(marker, how), f)
    with pytest.raises(SourceError, match=r"data_batch_3: not a CIFAR-10 batch: it names the global "
                                          r"\S+, which is not numpy array data; refusing to run code"):
        prep("cifar10", tmp_path, str(tmp_path / "out"), progress=False)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    plans = cifar10.plan(src)  # the genuine fixture batches still load
    assert plans["train"].num_samples + plans["valid"].num_samples == 5500


def test_an_imagenet_batch_that_would_run_code_is_refused(tmp_path):
    data = np.zeros((6000, 3072), np.uint8)
    with open(tmp_path / "train_data_batch_1", "wb") as f:
        pickle.dump({"data": data, "labels": [1] * 6000, "mean": data[:10].mean(0)}, f)
    marker = tmp_path / "marker"
    with open(tmp_path / "val_data", "wb") as f:
        pickle.dump(_crafted(marker, "os.system"), f)
    with pytest.raises(SourceError, match=r"val_data: not an ImageNet batch: it names the global .*"
                                          r"refusing to run code from it"):
        prep("imagenet32", tmp_path, str(tmp_path / "out"), progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_genuine_batches_load_from_any_pickle_protocol_and_numpy(protocol):
    batch = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "labels": [3, 4],
             "mean": np.linspace(0, 1, 6), "batch_label": "training batch 1 of 5", "n": np.int64(7)}
    data = pickle.dumps(batch, protocol=protocol)
    variants = [data]
    if protocol <= 3:  # names written as text: the numpy 1 spelling, as the released batch files have
        variants.append(data.replace(b"numpy._core.", b"numpy.core."))
    for variant in variants:
        loaded = load_data_pickle(io.BytesIO(variant))
        assert loaded.keys() == batch.keys() and loaded["labels"] == [3, 4] and loaded["n"] == 7
        assert np.array_equal(loaded["data"], batch["data"]) and np.array_equal(loaded["mean"], batch["mean"])
