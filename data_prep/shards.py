"""The shard format: deterministic webdataset tars, their manifest, and the checks against it.

Shards are plain ustar tars, readable by `tar` and stock webdataset. One
sample = `<key>.png` + `<key>.json` (+ `<key>.cls` where labels exist).
Keys contain no dots (webdataset splits the key at the first dot). Member
order, timestamps, owners and modes are fixed, so the same samples give
byte-identical shards.

Each split has `manifest.json` (FORMAT): per shard its name, sample count,
byte size, SHA-256, where every sample starts (`offsets`, count + 1
entries) and a 64-bit BLAKE2b digest of every sample's bytes
(`digests`). The SHA-256 checks a whole shard (a prep rerun, `vdvae
verify`); the digests check the samples a ranged read fetches (the
training stream), so a damaged byte is a skipped sample, never a different
image trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .storage import Store, StorageError, open_store

FORMAT = "vdvae-shards/3"
"""2: shards list their samples' byte offsets; 3: and a digest of every sample."""
MANIFEST = "manifest.json"
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_DIGEST_BYTES = 8
_READ_CHUNK = 8 << 20


class ManifestError(ValueError):
    """A manifest that is missing, malformed or of another format; the message names the file."""


def sample_digest(data: bytes | memoryview) -> str:
    """The manifest's digest of one sample's bytes (its tar members, headers and padding included)."""
    return hashlib.blake2b(data, digest_size=_DIGEST_BYTES).hexdigest()


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
        self._sample_hash = None
        self._offset = 0
        self.count = 0
        self.offsets: list[int] = []
        self.digests: list[str] = []

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._sample_hash.update(data)
        self._offset += len(data)

    def _member(self, name: str, data: bytes) -> None:
        info, _ = _member(name, data)
        header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="surrogateescape")
        for part in (header, data, tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)):  # no joined copy
            self._write(part)

    def add(self, s: Sample) -> None:
        self.offsets.append(self._offset)
        self._sample_hash = hashlib.blake2b(digest_size=_DIGEST_BYTES)
        self._member(f"{s.key}.png", s.png)
        self._member(f"{s.key}.json", json.dumps(s.meta, sort_keys=True, separators=(",", ":")).encode())
        if s.label is not None:
            self._member(f"{s.key}.cls", str(int(s.label)).encode())
        self.digests.append(self._sample_hash.hexdigest())
        self.count += 1

    def close(self) -> None:
        """End the tar (closing the file if this writer opened it)."""
        if self._closed:
            return
        self._closed = True
        self.offsets.append(self._offset)
        self._sample_hash = hashlib.blake2b()  # the end blocks belong to no sample
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



# -- the manifest ------------------------------------------------------------------------


def build_manifest(dataset: str, split: str, how: str, fingerprint: str, resolution: int, bits: int,
                   records: list[dict], tool_version: str) -> dict:
    """A split's manifest from its shards' records, in order (each: name, count, bytes, sha256,
    offsets, digests, the (3, 256) pixel histogram, rejections, conversions)."""
    histogram = np.sum([r["histogram"] for r in records], 0)  # (3, 256) pixel counts
    levels = np.arange(256)
    n_pix = histogram.sum(1)
    mean = (histogram * levels).sum(1) / n_pix
    std = np.sqrt((histogram * (levels - mean[:, None]) ** 2).sum(1) / n_pix)
    conversions: dict[str, int] = {}
    for r in records:  # records written before conversions were counted have none
        for conversion, count in r.get("conversions", {}).items():
            conversions[conversion] = conversions.get(conversion, 0) + count
    return {
        "format": FORMAT,
        "dataset": dataset,
        "split": split,
        "how": how,
        "fingerprint": fingerprint,
        "num_samples": sum(r["count"] for r in records),
        "resolution": resolution,
        "bits": bits,
        "channel_mean": [round(float(v), 6) for v in mean],
        "channel_std": [round(float(v), 6) for v in std],
        "shards": [{k: r[k] for k in ("name", "count", "bytes", "sha256", "offsets", "digests")} for r in records],
        "rejections": [bad for r in records for bad in r["rejections"]],
        "conversions": dict(sorted(conversions.items())),
        "tool_version": tool_version,
    }


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


# -- reading -----------------------------------------------------------------------------


def parse_tar(data: bytes | memoryview) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a run of ustar members.

    Stops at the end-of-archive blocks; raises `ValueError` at a member
    that is cut short (a truncated shard) after yielding the whole samples
    before it. Keys end at the first dot of the file name, as in webdataset.
    """
    view = memoryview(data)
    pos, end = 0, len(view)
    key, fields = None, {}
    while pos + 512 <= end:
        header = bytes(view[pos:pos + 512])
        if header[0] == 0:
            break
        try:
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode()
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:  # (UnicodeDecodeError included)
            raise ValueError(f"bad tar header at byte {pos}") from None
        if prefix:
            name = f"{prefix}/{name}"
        member_key, _, ext = name.rpartition("/")[2].partition(".")
        if pos + 512 + size > end:
            if member_key != key and key is not None:
                yield key, fields  # whole: the cut is in the next sample
            raise ValueError(f"member {name} cut short at byte {end}")
        if member_key != key:
            if key is not None:
                yield key, fields
            key, fields = member_key, {}
        fields[ext] = bytes(view[pos + 512:pos + 512 + size])
        pos += 512 + size + (-size % 512)
    if key is not None:
        yield key, fields


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    offsets: tuple[int, ...]
    """count + 1 byte offsets: where each sample starts, then where the last one ends."""
    digests: tuple[str, ...]
    """count `sample_digest`s, one per sample."""
    size: int = 0
    sha256: str = ""

    @classmethod
    def from_record(cls, record: dict) -> "ShardInfo":
        """From a manifest's shard entry (or a prep shard record, which holds the same keys)."""
        return cls(str(record["name"]), int(record["count"]), tuple(int(o) for o in record["offsets"]),
                   tuple(str(d) for d in record["digests"]), int(record["bytes"]), str(record["sha256"]))


@dataclass(frozen=True)
class Split:
    """A split's manifest: where its shards are and what they hold."""

    url: str
    dataset: str
    split: str
    resolution: int
    bits: int
    shards: tuple[ShardInfo, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @classmethod
    def load(cls, url: str) -> "Split":
        """From `.../train` or `.../train/manifest.json`, on S3 or local."""
        url = url.rstrip("/")
        if url.endswith("/" + MANIFEST) or url == MANIFEST:
            url = url[: -len(MANIFEST)].rstrip("/")
        where = f"{url}/{MANIFEST}"
        try:
            text = open_store(url).read_bytes(MANIFEST)
        except FileNotFoundError:
            raise ManifestError(f"{where} does not exist: point at a split prepared by "
                                "`vdvae prep` (e.g. s3://bucket/ffhq256/train)") from None
        except StorageError as err:
            raise ManifestError(f"cannot read {where}: {err}") from None
        manifest = read_json(text, where)
        if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("vdvae-shards/"):
            raise ManifestError(f"{where} is not a `vdvae prep` manifest")
        if manifest["format"] != FORMAT:
            raise ManifestError(f"{where} was written by another version of `vdvae prep` ({manifest['format']}, "
                                f"this one reads {FORMAT}, which records a digest of every sample); run the "
                                "prep again with --overwrite")
        try:
            shards = tuple(ShardInfo.from_record(s) for s in manifest["shards"])
            split = cls(url, str(manifest["dataset"]), str(manifest["split"]), int(manifest["resolution"]),
                        int(manifest["bits"]), shards)
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{where} is malformed ({type(err).__name__}: {err}); run the prep "
                                "again with --overwrite") from None
        for s in shards:
            if len(s.offsets) != s.count + 1 or len(s.digests) != s.count:
                raise ManifestError(f"{where}: shard {s.name} lists {len(s.offsets)} offsets and "
                                    f"{len(s.digests)} digests for {s.count} samples")
            if "/" in s.name or s.name.startswith("."):
                raise ManifestError(f"{where}: shard name {s.name!r} is not a file of the split's folder")
        return split

    def missing_shards(self) -> list[str]:
        """Shards the manifest lists that the store does not hold."""
        present = set(open_store(self.url).list())
        return [s.name for s in self.shards if s.name not in present]


def read_json(text: bytes | str, where: str):
    """json.loads whose error names the file, the line and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where} is not valid JSON: {err.msg} at line {err.lineno}, "
                            f"column {err.colno}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{where} is not valid JSON: not UTF-8 text") from None


def split_samples(data: bytes | memoryview, shard: ShardInfo, start: int, stop: int,
                  verify: bool = True) -> Iterator[tuple[str | None, dict[str, bytes] | None]]:
    """(key, fields) of samples start..stop-1 of a shard from the bytes of one ranged read starting
    at `offsets[start]`: fields is None for a sample whose bytes are missing (a truncated shard) or
    (unless not `verify`) differ from the manifest's digest; key is None where not even its header
    could be read."""
    view, base = memoryview(data), shard.offsets[start]
    for i in range(start, stop):
        lo, hi = shard.offsets[i] - base, shard.offsets[i + 1] - base
        piece = view[lo:hi]
        try:
            key, fields = next(parse_tar(piece))
        except (StopIteration, ValueError):
            key, fields = None, None
        if fields is not None and (len(piece) != hi - lo or verify and sample_digest(piece) != shard.digests[i]):
            fields = None
        yield key, fields


def verify_shard(store: Store, shard: ShardInfo, present: set[str] | None = None) -> str | None:
    """None if the stored shard has the manifest's size and SHA-256, else the problem. `present`: the
    store's names, where the caller has listed them (a shard not among them is missing)."""
    if present is not None and shard.name not in present:
        return "missing"
    digest, got = hashlib.sha256(), 0
    try:
        while got < shard.size + 1:  # one byte past the end: a longer file is a different one
            chunk = store.read_range(shard.name, got, got + min(_READ_CHUNK, shard.size + 1 - got))
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
    except StorageError as err:
        return f"unreadable ({err})"
    if got != shard.size:
        return f"{got} bytes, the manifest says {shard.size}"
    if digest.hexdigest() != shard.sha256:
        return "SHA-256 differs from the manifest's (damaged)"
    return None


def damaged_samples(store: Store, shard: ShardInfo) -> list[int]:
    """Indices of the shard's samples whose bytes differ from their digests (or are missing)."""
    data = store.read_range(shard.name, 0, shard.offsets[-1])
    return [i for i, (_, fields) in enumerate(split_samples(data, shard, 0, shard.count)) if fields is None]
