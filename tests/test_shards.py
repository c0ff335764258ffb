"""The shard writer writes exactly the bytes of Python's tarfile, and stock readers read them."""

import hashlib
import io
import json
import tarfile

import pytest

from data_prep.shards import Sample, ShardWriter, _member


def samples():
    return [Sample("a0000001", b"\x89PNG fake" * 70, {"index": 1, "source": "x"}, 3),
            Sample("a0000002", b"", {"index": 2}, None),
            Sample("a-3_x", bytes(range(256)) * 9, {"i": 3}, 0)]


def test_bytes_equal_tarfile(tmp_path):
    with ShardWriter(tmp_path / "ours.tar") as writer:
        for s in samples():
            writer.add(s)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples():
            tar.addfile(*_member(f"{s.key}.png", s.png))
            tar.addfile(*_member(f"{s.key}.json", json.dumps(s.meta, sort_keys=True, separators=(",", ":")).encode()))
            if s.label is not None:
                tar.addfile(*_member(f"{s.key}.cls", str(s.label).encode()))
    assert (tmp_path / "ours.tar").read_bytes() == buf.getvalue()
    with tarfile.open(tmp_path / "ours.tar") as tar:
        assert tar.getnames()[:3] == ["a0000001.png", "a0000001.json", "a0000001.cls"]
        assert tar.extractfile("a-3_x.png").read() == bytes(range(256)) * 9


def test_size_digest_and_sample_offsets(tmp_path):
    with ShardWriter(tmp_path / "s.tar") as writer:
        for s in samples():
            writer.add(s)
    data = (tmp_path / "s.tar").read_bytes()
    assert writer.size == len(data) and writer.sha256 == hashlib.sha256(data).hexdigest()
    with tarfile.open(tmp_path / "s.tar") as tar:
        first_members = {m.name: m.offset for m in tar.getmembers() if m.name.endswith(".png")}
    assert writer.offsets[:-1] == [first_members[f"{s.key}.png"] for s in samples()]
    assert len(data) - writer.offsets[-1] >= 1024 and set(data[writer.offsets[-1]:]) == {0}  # the trailer
    assert data[writer.offsets[-1] - 512:writer.offsets[-1]] != bytes(512)  # the last sample's data


def test_keys_with_dots_are_refused():
    with pytest.raises(ValueError, match="no dots"):
        Sample("a.b", b"", {})
