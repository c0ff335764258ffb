"""Deterministic webdataset shards: plain ustar tars, readable by `tar` and stock webdataset.

One sample = `<key>.png` + `<key>.json` (+ `<key>.cls` where labels exist).
Keys contain no dots (webdataset splits the key at the first dot). Member
order, timestamps, owners and modes are fixed, so the same samples give
byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Sample:
    key: str
    png: bytes
    meta: dict
    label: int | None = None

    def __post_init__(self) -> None:
        if not _KEY.match(self.key):
            raise ValueError(f"sample key {self.key!r}: use letters, digits, '_' and '-' only (no dots)")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def write_shard(samples: list[Sample], path: Path) -> tuple[int, str]:
    """Write `samples` as a tar at `path`; return (bytes, sha256 hex)."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            tar.addfile(*_member(f"{s.key}.png", s.png))
            meta = json.dumps(s.meta, sort_keys=True, separators=(",", ":")).encode()
            tar.addfile(*_member(f"{s.key}.json", meta))
            if s.label is not None:
                tar.addfile(*_member(f"{s.key}.cls", str(int(s.label)).encode()))
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
