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


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


class ShardWriter:
    """Stream samples into a tar file: memory holds one sample, not the shard."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, s: Sample) -> None:
        self._tar.addfile(*_member(f"{s.key}.png", s.png))
        meta = json.dumps(s.meta, sort_keys=True, separators=(",", ":")).encode()
        self._tar.addfile(*_member(f"{s.key}.json", meta))
        if s.label is not None:
            self._tar.addfile(*_member(f"{s.key}.cls", str(int(s.label)).encode()))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._file.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
