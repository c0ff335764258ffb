"""Shards are checked against their manifest: by the stream (per-sample digests), by a prep rerun
(whole-shard SHA-256, damaged shards rewritten) and by `vdvae verify` (a report per shard)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.prep import prep
from data_prep.shards import parse_tar
from launch.cli import main as cli_main
from pipeline.stream import ShardStream

RES, PER_SHARD, COUNT, NUM_VALID = 16, 8, 40, 8


def _source(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    rng = np.random.default_rng(7)
    for i in range(COUNT + NUM_VALID):  # smooth images, as photographs are: some PNG flips decode silently
        base = np.linspace(0, 1, RES)[None, :, None] * rng.uniform(60, 200, 3) + rng.uniform(0, 50, 3)
        pixels = np.broadcast_to(base, (RES, RES, 3)) + rng.normal(0, 4, (RES, RES, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(src / f"img{i:03d}.png")
    return src


def _prep(src: Path, out: Path, capsys=None) -> str:
    prep("folder", src, str(out), samples_per_shard=PER_SHARD, resolution=RES, num_valid=NUM_VALID, progress=False)
    return str(out)


def _png_span(shard: bytes, offsets: list[int], i: int) -> tuple[int, int]:
    """Where sample i's PNG bytes lie in its shard (its first member)."""
    start = offsets[i] + 512
    size = int(shard[offsets[i] + 124:offsets[i] + 136].split(b"\0")[0].strip(), 8)
    return start, start + size


def _silent_flip(shard: bytearray, offsets: list[int], i: int) -> int:
    """A byte of sample i's PNG whose flip still decodes, to other pixels: the damage that trains
    silently without a digest. Returns its position (the shard is changed in place)."""
    start, end = _png_span(bytes(shard), offsets, i)
    original = np.asarray(Image.open(io.BytesIO(bytes(shard[start:end]))))
    for pos in range(start + 33, end - 12):  # past the header chunk, before IEND
        for bit in (0x01, 0x80, 0x10):
            shard[pos] ^= bit
            try:
                with Image.open(io.BytesIO(bytes(shard[start:end]))) as image:
                    pixels = np.asarray(image.convert("RGB"))
                if pixels.shape == original.shape and not np.array_equal(pixels, original):
                    return pos
            except Exception:
                pass
            shard[pos] ^= bit
    raise AssertionError("no flip of this PNG decodes silently")


@pytest.fixture
def damaged(tmp_path):
    """A prepared split with one silently-decoding flipped byte in shard 0 and shard 2 cut short."""
    src = _source(tmp_path)
    out = _prep(src, tmp_path / "out")
    train = Path(out, "train")
    manifest = json.loads((train / "manifest.json").read_text())
    shard0 = train / manifest["shards"][0]["name"]
    data = bytearray(shard0.read_bytes())
    offsets = manifest["shards"][0]["offsets"]
    _silent_flip(data, offsets, 3)
    shard0.write_bytes(bytes(data))
    shard2 = train / manifest["shards"][2]["name"]
    shard2.write_bytes(shard2.read_bytes()[:manifest["shards"][2]["offsets"][5] + 100])
    bad_key = next(k for k, _ in parse_tar(bytes(data[offsets[3]:])))
    return {"src": src, "out": out, "manifest": manifest, "bad_key": bad_key}


def test_a_flipped_byte_that_still_decodes_is_skipped_and_counted(damaged):
    stream = ShardStream(f"{damaged['out']}/train", 4, train=False)
    batches = list(stream)
    seen = {k: bool(v) for b in batches for k, v in zip(b.keys, b.valid, strict=True) if k}
    # the flipped sample and the 3 samples lost from shard 2 (5..7) are left out, and counted
    assert seen[damaged["bad_key"]] is False
    assert stream.skipped == 1 + 3
    assert sum(seen.values()) == COUNT - 4
    train = ShardStream(f"{damaged['out']}/train", 4, seed=3)
    keys = [k for b in train for k in b.keys]
    assert damaged["bad_key"] not in keys and train.skipped == 4 and len(keys) == COUNT


def test_vdvae_verify_reports_each_damaged_shard(damaged, capsys):
    names = [s["name"] for s in damaged["manifest"]["shards"]]
    assert cli_main(["verify", damaged["out"]]) == 1
    out = capsys.readouterr().out
    assert f"{names[0]}: SHA-256 differs from the manifest's (damaged); 1 of {PER_SHARD} samples damaged (first: 3)" in out
    assert f"{names[2]}: " in out and "bytes, the manifest says" in out
    assert "2 damaged or missing shards" in out and names[1] not in out
    Path(damaged["out"], "train", names[4]).unlink()
    assert cli_main(["verify", f"{damaged['out']}/train"]) == 1
    assert f"{names[4]}: missing" in capsys.readouterr().out


def test_prep_rerun_rewrites_damaged_shards(damaged, tmp_path, capsys):
    _prep(damaged["src"], Path(damaged["out"]))
    out = capsys.readouterr().out
    names = [s["name"] for s in damaged["manifest"]["shards"]]
    assert f"{names[0]}: SHA-256 differs" in out and f"{names[2]}: " in out and "writing it again" in out
    clean = _prep(damaged["src"], tmp_path / "clean")
    for split in ("train", "valid"):
        for path in sorted(Path(clean, split).iterdir()):
            assert Path(damaged["out"], split, path.name).read_bytes() == path.read_bytes(), path.name
    assert cli_main(["verify", damaged["out"]]) == 0
    assert "every shard matches its manifest" in capsys.readouterr().out
