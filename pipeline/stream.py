"""Stream a split's shards from S3 (or a folder) into training and evaluation.

The order of an epoch is a pure function of (manifest, seed, epoch, rank,
world size, batch size, piece size), never of the worker count or of
timing:

1. The epoch's shard order is a permutation seeded by (seed, epoch) (train)
   or the manifest's order (eval); the shards' samples, end to end, form
   one sequence.
2. Rank r takes a contiguous stretch of it. Training: every rank takes
   `N // (world * batch)` batches' worth, the few samples left over (a
   different few each epoch) wait for the next epoch, so every rank yields
   exactly the same number of batches. Evaluation: the ranks split all N
   samples between them (counts differ by at most one) and pad with
   masked-out rows to the same number of batches; no sample is seen twice.
3. A rank's stretch is cut into pieces of `piece_samples` (a whole number of
   batches). A piece is fetched with one ranged read per shard it touches
   (the manifest records where every sample starts), shuffled with a
   permutation seeded by (seed, epoch, rank, piece) (train), decoded and
   batched. DataLoader worker w reads pieces w, w + W, ...; the batches are
   put back in order in the main process, so W changes nothing.

The state is (epoch, batches handed out in that epoch): restoring it yields
exactly the batches, keys included, that would have come next, with any
worker count. A sample that does not decode, differs from its digest in
the manifest, or is missing from a truncated shard, is counted in `Batch.skipped`; in training its row is
filled with another sample of the same piece, in evaluation the row is
masked out (`Batch.valid`), so no rank ever yields fewer batches.

Preprocessing (normalisation, 5-bit targets, [0, 1] scaling) is the
model's `preprocess`, run on the device after `Batch.to(device)`.
"""

from __future__ import annotations

import importlib
import io
import math
from bisect import bisect_right
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from data_prep.shards import ShardInfo, Split, split_samples
from data_prep.storage import Retry, open_store

_DECODED_PIECE_BYTES = 256 << 20  # default piece: about this much decoded pixel data
_MAX_PIECE_SAMPLES = 4096
_HANDOFF_BYTES, _HANDOFF_BATCHES = 2 << 20, 64  # batches a worker hands over at once (one pipe message)


class StreamError(ValueError):
    """An option that cannot make a stream from a split; raised before any data is read."""


# -- reading shards --------------------------------------------------------------------


@dataclass
class _Sample:
    key: str
    fields: dict[str, bytes] | None  # None: missing from the shard (truncated) or damaged


def _read_segment(store, shard: ShardInfo, start: int, stop: int, retry: Retry, verify: bool) -> list[_Sample]:
    """Samples start..stop-1 of a shard, with one ranged read, each checked against its digest; the
    missing (a truncated shard) and damaged ones marked unreadable."""
    data = store.read_range(shard.name, shard.offsets[start], shard.offsets[stop], retry)
    return [_Sample(key or f"{shard.name}#{i}", fields)
            for i, (key, fields) in enumerate(split_samples(data, shard, start, stop, verify), start)]


def _decode(sample: _Sample, resolution: int) -> np.ndarray | None:
    """uint8 (H, W, 3), or None for a sample that is not a readable RGB image of the split's size."""
    if sample.fields is None or "png" not in sample.fields:
        return None
    try:
        with Image.open(io.BytesIO(sample.fields["png"])) as image:
            if image.size != (resolution, resolution) or image.mode != "RGB":
                return None
            image.load()
            return np.asarray(image)
    except Exception:
        return None


def _label(sample: _Sample) -> int:
    try:
        return int(sample.fields["cls"])
    except (TypeError, KeyError, ValueError):
        return -1


# -- batches ---------------------------------------------------------------------------


@dataclass
class Batch:
    """One rank's batch: uint8 images (B, H, W, 3), as stored; preprocess on the device."""

    images: torch.Tensor
    keys: list[str]
    labels: torch.Tensor
    """int64 (B,), -1 where the split has no labels."""
    valid: torch.Tensor
    """bool (B,): rows that count. False for eval padding and unreadable eval samples."""
    skipped: int
    """Samples of this batch that could not be read (replaced in training, masked in eval)."""
    epoch: int
    index: int
    """The batch's number within its epoch, on this rank."""

    def pin_memory(self) -> "Batch":
        return Batch(self.images.pin_memory(), self.keys, self.labels.pin_memory(), self.valid.pin_memory(),
                     self.skipped, self.epoch, self.index)

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking), self.keys,
                     self.labels.to(device, non_blocking=non_blocking),
                     self.valid.to(device, non_blocking=non_blocking), self.skipped, self.epoch, self.index)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class _Piece:
    index: int
    segments: tuple[tuple[int, int, int], ...]  # (shard, start, stop)
    first_batch: int
    num_batches: int

    @property
    def num_samples(self) -> int:
        return sum(stop - start for _, start, stop in self.segments)


@dataclass
class _Plan:
    """What one rank reads: its pieces, in order (see the module's docstring)."""

    split: Split
    batch_size: int
    rank: int
    world: int
    seed: int
    train: bool
    piece_samples: int
    verify: bool = True
    batches_per_epoch: int = field(init=False)

    def __post_init__(self) -> None:
        n, b, w = self.split.num_samples, self.batch_size, self.world
        if self.train:
            self.batches_per_epoch = n // (w * b)
            if self.batches_per_epoch == 0:
                raise StreamError(f"{self.split.url}: {n} samples cannot give every one of {w} ranks a batch of "
                                  f"{b}; use a smaller batch or fewer ranks")
        else:
            self.batches_per_epoch = math.ceil(math.ceil(n / w) / b)

    def rank_range(self) -> tuple[int, int]:
        n, w, r = self.split.num_samples, self.world, self.rank
        if self.train:
            per_rank = self.batches_per_epoch * self.batch_size
            return r * per_rank, (r + 1) * per_rank
        return r * n // w, (r + 1) * n // w

    def shard_order(self, epoch: int) -> list[int]:
        if not self.train:
            return list(range(len(self.split.shards)))
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.split.shards))]

    def pieces(self, epoch: int) -> list[_Piece]:
        order = self.shard_order(epoch)
        starts = np.cumsum([0] + [self.split.shards[i].count for i in order]).tolist()
        lo, hi = self.rank_range()
        pieces, batch = [], 0
        for index, p0 in enumerate(range(lo, hi, self.piece_samples)):
            p1 = min(p0 + self.piece_samples, hi)
            segments, at = [], p0
            while at < p1:
                k = bisect_right(starts, at) - 1
                stop = min(p1, starts[k + 1])
                segments.append((order[k], at - starts[k], stop - starts[k]))
                at = stop
            num_batches = math.ceil((p1 - p0) / self.batch_size)
            pieces.append(_Piece(index, tuple(segments), batch, num_batches))
            batch += num_batches
        if batch < self.batches_per_epoch:  # eval: pad to the ranks' common batch count
            pieces.append(_Piece(len(pieces), (), batch, self.batches_per_epoch - batch))
        return pieces


class _PieceReader(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker (or in the main process): its pieces, as batches."""

    def __init__(self, plan: _Plan, epoch: int, start_batch: int, retry: Retry):
        super().__init__()
        self.plan, self.epoch, self.start_batch, self.retry = plan, epoch, start_batch, retry
        self._store = None

    def __iter__(self) -> Iterator[list[tuple]]:
        """Lists of consecutive batches: a worker hands over up to _HANDOFF_BYTES at a time."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pieces = self.plan.pieces(self.epoch)
        mine = [p for p in pieces
                if p.index % workers == worker and p.first_batch + p.num_batches > self.start_batch]
        with ThreadPoolExecutor(max_workers=1) as fetcher:  # fetch piece k + 1 while k is decoded
            ahead = fetcher.submit(self._read, mine[0]) if mine else None
            group, group_bytes = [], 0
            for k, piece in enumerate(mine):
                samples = ahead.result()
                ahead = fetcher.submit(self._read, mine[k + 1]) if k + 1 < len(mine) else None
                for raw in self._batches(piece, samples, pieces):
                    group.append(raw)
                    group_bytes += raw[1].nbytes
                    if group_bytes >= _HANDOFF_BYTES or len(group) == _HANDOFF_BATCHES:
                        yield group
                        group, group_bytes = [], 0
                if group:  # never hold batches across a piece boundary
                    yield group
                    group, group_bytes = [], 0

    @property
    def store(self):
        if self._store is None:
            self._store = open_store(self.plan.split.url)
        return self._store

    def _read(self, piece: _Piece) -> list[_Sample]:
        samples = []
        for shard, start, stop in piece.segments:
            samples += _read_segment(self.store, self.plan.split.shards[shard], start, stop, self.retry,
                                     self.plan.verify)
        if self.plan.train:
            rng = np.random.default_rng([self.plan.seed, self.epoch, self.plan.rank, piece.index])
            samples = [samples[i] for i in rng.permutation(len(samples))]
        return samples

    def _batches(self, piece: _Piece, samples: list[_Sample], pieces: list[_Piece]) -> Iterator[tuple]:
        plan, res = self.plan, self.plan.split.resolution
        decoded: dict[int, np.ndarray | None] = {}

        def image(i: int) -> np.ndarray | None:
            if i not in decoded:
                decoded[i] = _decode(samples[i], res)
            return decoded[i]

        def filler(i: int) -> tuple[_Sample, np.ndarray]:
            """Training: the next readable sample after row i of the piece (cyclic), else of later pieces."""
            for j in list(range(i + 1, len(samples))) + list(range(i)):
                if image(j) is not None:
                    return samples[j], decoded[j]
            for other in pieces[piece.index + 1:] + pieces[:piece.index]:
                for s in self._read(other):
                    if (pixels := _decode(s, res)) is not None:
                        return s, pixels
            raise StreamError(f"{plan.split.url}: no sample of this rank's share of the epoch can be read")

        for b in range(piece.num_batches):
            number = piece.first_batch + b
            if number < self.start_batch:
                continue
            rows = range(b * plan.batch_size, min((b + 1) * plan.batch_size, len(samples)))
            size = plan.batch_size if plan.train else max(len(rows), 1)  # eval padding: one masked row
            labels = np.full(size, -1, dtype=np.int64)
            valid = np.zeros(size, dtype=bool)
            keys, skipped, rows_pixels = [""] * size, 0, [None] * size
            for row, i in enumerate(rows):
                sample, pixels = samples[i], image(i)
                if pixels is None:
                    skipped += 1
                    if not plan.train:
                        keys[row] = sample.key
                        continue
                    sample, pixels = filler(i)
                rows_pixels[row] = pixels
                labels[row] = _label(sample)
                valid[row] = True
                keys[row] = sample.key
            if valid.all():  # one copy (none for a batch of one), not a zero fill and a copy
                images = rows_pixels[0][None] if size == 1 else np.stack(rows_pixels)
            else:
                images = np.zeros((size, res, res, 3), np.uint8)
                for row in np.flatnonzero(valid):
                    images[row] = rows_pixels[row]
            # numpy, not tensors: a worker hands arrays through its pipe faster than it hands
            # tensors through shared memory (one segment per tensor; measured at 32 and 256 px)
            yield number, images, keys, labels, valid, skipped


def _identity(batch):
    return batch


def default_piece_samples(resolution: int, batch_size: int) -> int:
    """About 256 MB of decoded pixels per piece (at most 4096 samples), a whole number of batches."""
    samples = min(_MAX_PIECE_SAMPLES, _DECODED_PIECE_BYTES // (resolution * resolution * 3))
    return max(1, samples // batch_size) * batch_size


class ShardStream:
    """One rank's batches from a split, with a resumable position.

    `iter(stream)` yields the rest of the current epoch and then moves to the
    next epoch; `forever()` chains epochs. `state_dict()` after a batch was
    handed out says that batch was consumed: save it with the checkpoint of
    the step that used the batch. Every sample is checked against its
    digest in the manifest; `verify=False` skips that (only to measure its
    cost: damaged bytes would then train).
    """

    def __init__(self, url: str, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 train: bool = True, workers: int = 0, piece_samples: int | None = None,
                 pin_memory: bool = False, prefetch: int = 2, retry: Retry | None = None, verify: bool = True):
        if batch_size <= 0:
            raise StreamError(f"batch_size={batch_size} must be positive")
        if not 0 <= rank < world:
            raise StreamError(f"rank {rank} is not in a world of {world}")
        if workers < 0:
            raise StreamError(f"workers={workers} must be 0 (read in this process) or more")
        split = url if isinstance(url, Split) else Split.load(url)
        piece = piece_samples or default_piece_samples(split.resolution, batch_size)
        if piece % batch_size:
            raise StreamError(f"piece_samples={piece} must be a multiple of batch_size={batch_size}")
        self.split = split
        self.plan = _Plan(split, batch_size, rank, world, seed, train, piece, verify)
        self.workers, self.pin_memory, self.prefetch = workers, pin_memory, prefetch
        self.retry = retry or Retry()
        self.epoch, self.batch = 0, 0
        self.skipped = 0
        """Unreadable samples met so far by this rank (also counted per batch)."""

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    def state_dict(self) -> dict:
        p = self.plan
        return {"epoch": self.epoch, "batch": self.batch, "seed": p.seed, "rank": p.rank, "world": p.world,
                "batch_size": p.batch_size, "piece_samples": p.piece_samples, "skipped": self.skipped,
                "split": p.split.url.rsplit("/", 1)[-1], "num_samples": p.split.num_samples}

    def load_state_dict(self, state: dict) -> None:
        p = self.plan
        mine = {"seed": p.seed, "world": p.world, "batch_size": p.batch_size, "piece_samples": p.piece_samples,
                "num_samples": p.split.num_samples}
        changed = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if changed:
            raise StreamError("the saved stream position was made with other settings, so it would not "
                              "resume exactly: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        self.epoch, self.batch, self.skipped = int(state["epoch"]), int(state["batch"]), int(state["skipped"])

    def __iter__(self) -> Iterator[Batch]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        reader = _PieceReader(self.plan, self.epoch, self.batch, self.retry)
        if self.workers == 0:
            source = iter(reader)
        else:
            source = iter(torch.utils.data.DataLoader(
                reader, batch_size=None, num_workers=self.workers, collate_fn=_identity,
                prefetch_factor=self.prefetch, multiprocessing_context="fork"))
        waiting: dict[int, tuple] = {}  # batches that came early from another worker
        for group in source:
            waiting.update((raw[0], raw) for raw in group)
            while self.batch in waiting:
                number, images, keys, labels, valid, skipped = waiting.pop(self.batch)
                images = np.require(images, requirements="W")  # PIL's read-only array (no workers): copy
                batch = Batch(torch.from_numpy(images), keys, torch.from_numpy(labels), torch.from_numpy(valid),
                              skipped, self.epoch, number)
                self.batch += 1
                self.skipped += skipped
                yield batch.pin_memory() if self.pin_memory else batch
        if self.batch != self.batches_per_epoch:  # a bug, never bad data: refuse to desynchronise ranks
            raise RuntimeError(f"stream ended epoch {self.epoch} at batch {self.batch} of {self.batches_per_epoch}")
        self.epoch, self.batch = self.epoch + 1, 0

    def forever(self) -> Iterator[Batch]:
        while True:
            yield from self


# -- webdataset -----------------------------------------------------------------------


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    """webdataset opener for s3:// URLs: boto3, the standard AWS chain, resuming reads."""
    if mode != "rb":
        raise ValueError(f"{url}: only reading is supported (mode {mode!r})")
    parsed = urlparse(url)
    folder, _, name = parsed.path.lstrip("/").rpartition("/")
    store = open_store(f"s3://{parsed.netloc}/{folder}")
    return io.BufferedReader(store.open_reader(name), buffer_size=max(bufsize, 1 << 20))


def register_webdataset_opener() -> None:
    """Let stock `webdataset.WebDataset("s3://...")` read through our opener (no AWS CLI)."""
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = gopen_s3  # the module, not the function


register_webdataset_opener()
