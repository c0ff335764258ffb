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
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
    Hashes as it writes (`sha256`, `size`) and records where each sample
    starts and, once closed, where the last one ends (`offsets`, count + 1
    entries), so a reader can fetch any run of samples with one ranged
    request.
    """

    def __init__(self, out: Path | BinaryIO):
        """out: a file to create, or anything with `write` (a store's `open_writer`), left open."""
        self._owns = isinstance(out, (str, os.PathLike))
        self._file = open(out, "wb") if self._owns else out
        self._closed = False
        self._hash = hashlib.sha256()
        self._offset = 0
        self.count = 0
        self.offsets: list[int] = []

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._offset += len(data)

    def _member(self, name: str, data: bytes) -> None:
        info, _ = _member(name, data)
        header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="surrogateescape")
        for part in (header, data, tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)):  # no joined copy
            self._write(part)

    def add(self, s: Sample) -> None:
        self.offsets.append(self._offset)
        self._member(f"{s.key}.png", s.png)
        self._member(f"{s.key}.json", json.dumps(s.meta, sort_keys=True, separators=(",", ":")).encode())
        if s.label is not None:
            self._member(f"{s.key}.cls", str(int(s.label)).encode())
        self.count += 1

    def close(self) -> None:
        """End the tar (closing the file if this writer opened it)."""
        if self._closed:
            return
        self._closed = True
        self.offsets.append(self._offset)
        end = self._offset + 2 * tarfile.BLOCKSIZE  # two zero blocks, then pad to a whole record
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        if self._owns:
            self._file.close()

    @property
    def size(self) -> int:
        return self._offset

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

