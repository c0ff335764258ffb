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
    """Stream samples into a tar file: memory holds one sample, not the shard.

    Writes each member as one header + data + padding, the bytes
    `tarfile` writes for it (tested), without its per-16-KiB copy loop.
    """

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self._offset = 0
        self.count = 0

    def _member(self, name: str, data: bytes) -> None:
        info, _ = _member(name, data)
        header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="surrogateescape")
        padding = -len(data) % tarfile.BLOCKSIZE
        self._file.write(b"".join((header, data, tarfile.NUL * padding)))
        self._offset += len(header) + len(data) + padding

    def add(self, s: Sample) -> None:
        self._member(f"{s.key}.png", s.png)
        self._member(f"{s.key}.json", json.dumps(s.meta, sort_keys=True, separators=(",", ":")).encode())
        if s.label is not None:
            self._member(f"{s.key}.cls", str(int(s.label)).encode())
        self.count += 1

    def close(self) -> None:
        if self._file.closed:
            return
        end = self._offset + 2 * tarfile.BLOCKSIZE  # two zero blocks, then pad to a whole record
        self._file.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
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
