"""Stream a split's shards from S3 (or a folder) into training and evaluation.

Training order is defined for the whole job, not per rank: it is a pure
function of (manifest, seed, epoch, block size), never of the world size,
the batch size, the worker count or timing, so a run can resume on another
number of ranks:

1. The epoch's shard order is a permutation seeded by (seed, epoch); the
   shards' samples, end to end, form the epoch's sequence of N samples.
2. The sequence is cut into `LANES` equal lanes; block k takes the k-th
   stretch of `block_samples / LANES` samples of every lane, and is shuffled
   with a permutation seeded by (seed, epoch, k). The blocks, in order, are
   the epoch's global order (a shuffle within about `block_samples` samples
   drawn from 16 places of the epoch).
3. The position in an epoch is a cursor of samples consumed. From a cursor
   c, with `world` ranks of `batch` samples, micro-batch j of every rank
   together is the next `world * batch` samples of the global order,
   positions c + j * world * batch onwards; rank r takes the r-th `batch` of
   them in shard order (so a rank reads near where its previous batch lay).
   An epoch ends when fewer than `world * batch` samples remain; those few
   (a different few each epoch) wait for the next one. So every rank yields
   the same number of batches; with the global batch unchanged (`batch x
   world x grad_accum`) a resumed run on other ranks sees exactly the
   samples, in the same global batches, that the uninterrupted run would;
   with another global batch every sample left in the epoch is still seen
   exactly once before the next begins.
4. Evaluation: the manifest's order, the ranks split all N samples between
   them (counts differ by at most one) and pad with masked-out rows to the
   same number of batches; no sample is seen twice.

A rank reads its batches in pieces of `piece_samples` of its own samples (a
whole number of batches, about 256 MB decoded); a piece's samples are
fetched with one ranged read per run of them in a shard; a run reads
through the gap to the next sample when the gap is small (64 KiB) or its
gaps in all stay within the bytes it keeps (and each under 1 MB): whatever
the world size (with many ranks their samples interleave in the shards),
a rank reads at most twice the bytes it keeps, plus 64 KiB a read saved.
DataLoader worker w reads pieces w, w + W, ...; the batches are put back in
order in the main process, so W changes nothing.

The state is a world-free cursor (epoch, samples consumed, seed, block
size): restoring it yields exactly the batches, keys included, that would
have come next, with any worker count, and a rank's share for any world
size. A sample that does not decode, differs from its digest in the
manifest, or is missing from a truncated shard, is counted in
`Batch.skipped`; in training its row is filled with the next readable
sample of the rank's batches (the same batch first), in evaluation the row
is masked out (`Batch.valid`), so no rank ever yields fewer batches.

Preprocessing (normalisation, 5-bit targets, [0, 1] scaling) is the
model's `preprocess`, run on the device after `Batch.to(device)`.
"""

from __future__ import annotations

import importlib
import io
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from data_prep.shards import ShardInfo, Split, split_samples
from data_prep.storage import Retry, open_store

_DECODED_PIECE_BYTES = 256 << 20  # default piece: about this much decoded pixel data
_MAX_PIECE_SAMPLES = 4096
_HANDOFF_BYTES, _HANDOFF_BATCHES = 2 << 20, 64  # batches a worker hands over at once (one pipe message)
_GAP_BYTES = 1 << 20  # samples of a shard less than this apart may be fetched by one read (the gap read through)
_SMALL_GAP_BYTES = 64 << 10  # ... a gap this small always, larger ones while their sum stays within the bytes kept
_RUN_BYTES = 64 << 20  # ... up to this much in one read
LANES = 16
"""Places of the epoch's sequence a shuffle block draws from (world-free: part of the order)."""


def _read_through(gap: int, kept: int, skipped: int) -> bool:
    """Whether a run that keeps `kept` bytes and has read through `skipped` bytes of gaps reads
    through a `gap` to its next sample rather than start another read: a gap under `_GAP_BYTES`,
    and no more gap bytes in all than kept bytes (a gap of `_SMALL_GAP_BYTES` always), so the
    bytes read are at most twice those kept, plus `_SMALL_GAP_BYTES` for each read saved."""
    return gap < _GAP_BYTES and (gap <= _SMALL_GAP_BYTES or skipped + gap <= kept)


class StreamError(ValueError):
    """An option that cannot make a stream from a split; raised before any data is read."""


# -- reading shards --------------------------------------------------------------------


@dataclass
class _Sample:
    key: str
    fields: dict[str, bytes] | None  # None: missing from the shard (truncated) or damaged


def _read_segment(store, shard: ShardInfo, start: int, stop: int, wanted: list[int], retry: Retry,
                  verify: bool) -> dict[int, _Sample]:
    """The `wanted` samples (indices in start..stop-1) of a shard, by index, with one ranged read of
    start..stop-1, each checked against its digest (the samples read through are not parsed); the
    missing (a truncated shard) and damaged ones marked unreadable."""
    data = memoryview(store.read_range(shard.name, shard.offsets[start], shard.offsets[stop], retry))
    base, samples = shard.offsets[start], {}
    for i in wanted:
        ((key, fields),) = split_samples(data[shard.offsets[i] - base:shard.offsets[i + 1] - base], shard, i, i + 1,
                                         verify)
        samples[i] = _Sample(key or f"{shard.name}#{i}", fields)
    return samples


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
    """The batch's number on this rank since the stream's cursor in this epoch."""

    def pin_memory(self) -> "Batch":
        return Batch(self.images.pin_memory(), self.keys, self.labels.pin_memory(), self.valid.pin_memory(),
                     self.skipped, self.epoch, self.index)

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking), self.keys,
                     self.labels.to(device, non_blocking=non_blocking),
                     self.valid.to(device, non_blocking=non_blocking), self.skipped, self.epoch, self.index)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Plan:
    """What one rank reads: its batches, as positions in the epoch's sequence of samples, in order
    (see the module's docstring)."""

    split: Split
    batch_size: int
    rank: int
    world: int
    seed: int
    train: bool
    piece_samples: int
    block_samples: int
    verify: bool = True

    def __post_init__(self) -> None:
        n, b, w = self.split.num_samples, self.batch_size, self.world
        if self.train and n // (w * b) == 0:
            raise StreamError(f"{self.split.url}: {n} samples cannot give every one of {w} ranks a batch of "
                              f"{b}; use a smaller batch or fewer ranks")

    @property
    def samples_per_step(self) -> int:
        """Samples one micro-batch of every rank takes from the global order."""
        return self.world * self.batch_size

    def num_batches(self, start: int) -> int:
        """This rank's batches from cursor `start` to the end of the epoch (the same on every rank)."""
        n, b, w = self.split.num_samples, self.batch_size, self.world
        if self.train:
            return max(0, n - start) // (w * b)
        return math.ceil(math.ceil(n / w) / b)

    def shard_order(self, epoch: int) -> list[int]:
        if not self.train:
            return list(range(len(self.split.shards)))
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.split.shards))]

    def global_order(self, epoch: int) -> np.ndarray:
        """Training: the epoch's order of all N positions, blocks of lanes' stretches, each shuffled."""
        n = self.split.num_samples
        lanes = min(LANES, n)
        bounds = [lane * n // lanes for lane in range(lanes + 1)]
        stretch = math.ceil(self.block_samples / lanes)
        longest = max(bounds[lane + 1] - bounds[lane] for lane in range(lanes))
        blocks = []
        for k in range(math.ceil(longest / stretch)):
            members = np.concatenate([np.arange(bounds[lane] + k * stretch,
                                                min(bounds[lane] + (k + 1) * stretch, bounds[lane + 1]))
                                      for lane in range(lanes)])
            blocks.append(members[np.random.default_rng([self.seed, epoch, k]).permutation(len(members))])
        return np.concatenate(blocks)

    def batches(self, epoch: int, start: int) -> list[np.ndarray]:
        """This rank's batches from cursor `start`: each the positions of its rows (eval: an empty
        array is a padding batch)."""
        b, count = self.batch_size, self.num_batches(start)
        if self.train:
            m = self.samples_per_step
            rows = self.global_order(epoch)[start:start + count * m].reshape(count, m)
            rows = np.sort(rows, axis=1)[:, self.rank * b:(self.rank + 1) * b]  # (count, b)
            return list(rows)
        n, w, r = self.split.num_samples, self.world, self.rank
        lo, hi = r * n // w, (r + 1) * n // w
        return [np.arange(min(lo + j * b, hi), min(lo + (j + 1) * b, hi)) for j in range(count)]


class _PieceReader(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker (or in the main process): its pieces, as batches."""

    def __init__(self, plan: _Plan, epoch: int, start: int, first_batch: int, retry: Retry):
        super().__init__()
        self.plan, self.epoch, self.start, self.first_batch, self.retry = plan, epoch, start, first_batch, retry
        self._store = None

    def __iter__(self) -> Iterator[list[tuple]]:
        """Lists of consecutive batches: a worker hands over up to _HANDOFF_BYTES at a time."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan
        order = plan.shard_order(self.epoch)
        self._starts = np.cumsum([0] + [plan.split.shards[i].count for i in order])
        self._order = order
        batches = plan.batches(self.epoch, self.start)
        per_piece = plan.piece_samples // plan.batch_size
        pieces = [range(p, min(p + per_piece, len(batches))) for p in range(0, len(batches), per_piece)]
        mine = [range(max(p.start, self.first_batch), p.stop) for index, p in enumerate(pieces)
                if index % workers == worker and p.stop > self.first_batch]  # (those handed out before: not read)
        with ThreadPoolExecutor(max_workers=1) as fetcher:  # fetch piece k + 1 while k is decoded
            ahead = fetcher.submit(self._read, batches, mine[0]) if mine else None
            group, group_bytes = [], 0
            for k, piece in enumerate(mine):
                samples = ahead.result()
                ahead = fetcher.submit(self._read, batches, mine[k + 1]) if k + 1 < len(mine) else None
                for raw in self._batches(piece, batches, samples):
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

    def _read(self, batches: list[np.ndarray], numbers: range) -> dict[int, _Sample]:
        """The samples of these batches by position, one ranged read per run of them in a shard."""
        positions = np.unique(np.concatenate([batches[j] for j in numbers] + [np.empty(0, np.int64)]))
        if not len(positions):
            return {}
        where = np.searchsorted(self._starts, positions, side="right") - 1  # index into the epoch's shards
        samples: dict[int, _Sample] = {}
        runs: list[list] = []  # [k, first, stop, positions, bytes kept, gap bytes read through]
        for pos, k in zip(positions.tolist(), where.tolist(), strict=True):
            index, shard = pos - int(self._starts[k]), self.plan.split.shards[self._order[k]]
            size = shard.offsets[index + 1] - shard.offsets[index]
            if runs and runs[-1][0] == k:
                _, first, stop, wanted, kept, skipped = runs[-1]
                gap = shard.offsets[index] - shard.offsets[stop]
                if _read_through(gap, kept, skipped) and shard.offsets[index + 1] - shard.offsets[first] <= _RUN_BYTES:
                    runs[-1] = [k, first, index + 1, wanted + [pos], kept + size, skipped + gap]
                    continue
            runs.append([k, index, index + 1, [pos], size, 0])
        for k, first, stop, wanted, _, _ in runs:
            base = int(self._starts[k])
            got = _read_segment(self.store, self.plan.split.shards[self._order[k]], first, stop,
                                [pos - base for pos in wanted], self.retry, self.plan.verify)
            samples.update((pos, got[pos - base]) for pos in wanted)
        return samples

    def _batches(self, piece: range, batches: list[np.ndarray], samples: dict[int, _Sample]) -> Iterator[tuple]:
        plan, res = self.plan, self.plan.split.resolution
        decoded: dict[int, np.ndarray | None] = {}

        def image(pos: int) -> np.ndarray | None:
            if pos not in decoded:
                decoded[pos] = _decode(samples[pos], res)
            return decoded[pos]

        def filler(j: int, row: int) -> tuple[_Sample, np.ndarray]:
            """Training: the next readable sample after this row of this rank's batches (the rest of
            the batch, then the later batches, then the earlier ones): the same for any piece size."""
            mine = batches[j].tolist()
            for pos in mine[row + 1:] + mine[:row]:
                if image(pos) is not None:
                    return samples[pos], decoded[pos]
            for other in list(range(j + 1, len(batches))) + list(range(j)):
                if any(pos not in samples for pos in batches[other].tolist()):  # a batch of another piece
                    samples.update(self._read(batches, range(other, other + 1)))
                for pos in batches[other].tolist():
                    if image(pos) is not None:
                        return samples[pos], decoded[pos]
            raise StreamError(f"{plan.split.url}: no sample of this rank's share of the epoch can be read")

        for number in piece:
            rows = batches[number].tolist()
            size = plan.batch_size if plan.train else max(len(rows), 1)  # eval padding: one masked row
            labels = np.full(size, -1, dtype=np.int64)
            valid = np.zeros(size, dtype=bool)
            keys, skipped, rows_pixels = [""] * size, 0, [None] * size
            for row, pos in enumerate(rows):
                sample, pixels = samples[pos], image(pos)
                if pixels is None:
                    skipped += 1
                    if not plan.train:
                        keys[row] = sample.key
                        continue
                    sample, pixels = filler(number, row)
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


def default_block_samples(resolution: int) -> int:
    """The shuffle block: about 256 MB of decoded pixels (at most 4096 samples); world-free."""
    return default_piece_samples(resolution, 1)


CURSOR_FIELDS = ("seed", "block_samples", "num_samples")
"""What a cursor must share with the stream it is loaded into (the order depends on them)."""


def legacy_cursor(states: list[dict]) -> dict:
    """A cursor from the per-rank positions of checkpoints made before the cursor (same epoch and
    batch on every rank): where it resumes is right, the order after it is the new one."""
    first = states[0]
    return {"epoch": int(first["epoch"]), "consumed": int(first["batch"]) * int(first["world"]) *
            int(first["batch_size"]), "seed": first["seed"], "block_samples": None,
            "num_samples": first["num_samples"], "split": first.get("split"),
            "skipped": sum(int(s["skipped"]) for s in states)}


class ShardStream:
    """One rank's batches from a split, with a resumable, world-free position.

    `iter(stream)` yields the rest of the current epoch and then moves to the
    next epoch; `forever()` chains epochs. `state_dict()` after a batch was
    handed out says that batch was consumed (by every rank: it is the
    global cursor): save it with the checkpoint of the step that used the
    batch, and load it into the stream of any rank of any world size and
    batch size. Every sample is checked against its digest in the
    manifest; `verify=False` skips that (only to measure its cost: damaged
    bytes would then train).
    """

    def __init__(self, url: str, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 train: bool = True, workers: int = 0, piece_samples: int | None = None,
                 block_samples: int | None = None, pin_memory: bool = False, prefetch: int = 2,
                 retry: Retry | None = None, verify: bool = True):
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
        block = block_samples or default_block_samples(split.resolution)
        if block <= 0:
            raise StreamError(f"block_samples={block} must be positive")
        self.split = split
        self.plan = _Plan(split, batch_size, rank, world, seed, train, piece, block, verify)
        self.workers, self.pin_memory, self.prefetch = workers, pin_memory, prefetch
        self.retry = retry or Retry()
        self.epoch, self.start, self.batch = 0, 0, 0
        """The epoch; the cursor this stream's part of it started at; its batches handed out since."""
        self.skipped = 0
        """Unreadable samples met so far by this rank (also counted per batch)."""

    @property
    def batches_per_epoch(self) -> int:
        """This rank's batches in a whole epoch."""
        return self.plan.num_batches(0)

    def state_dict(self) -> dict:
        """The cursor (world-free); `skipped` is this rank's count (a checkpoint stores the sum)."""
        p = self.plan
        return {"epoch": self.epoch, "consumed": self.start + self.batch * p.samples_per_step, "seed": p.seed,
                "block_samples": p.block_samples, "num_samples": p.split.num_samples,
                "split": p.split.url.rsplit("/", 1)[-1], "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a cursor; rank 0 takes over its count of unreadable samples."""
        p = self.plan
        mine = {"seed": p.seed, "block_samples": p.block_samples, "num_samples": p.split.num_samples}
        changed = {k: (state.get(k), v) for k, v in mine.items()
                   if state.get(k) != v and not (k == "block_samples" and state.get(k) is None)}
        if changed:
            raise StreamError("the saved stream position was made with other settings, so it would not "
                              "resume exactly: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        self.epoch, self.start, self.batch = int(state["epoch"]), int(state["consumed"]), 0
        self.skipped = int(state["skipped"]) if p.rank == 0 else 0

    def __iter__(self) -> Iterator[Batch]:
        if self.batch >= self.plan.num_batches(self.start):
            self.epoch, self.start, self.batch = self.epoch + 1, 0, 0
        reader = _PieceReader(self.plan, self.epoch, self.start, self.batch, self.retry)
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
        expected = self.plan.num_batches(self.start)
        if self.batch != expected:  # a bug, never bad data: refuse to desynchronise ranks
            raise RuntimeError(f"stream ended epoch {self.epoch} at batch {self.batch} of {expected}")
        self.epoch, self.start, self.batch = self.epoch + 1, 0, 0

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
