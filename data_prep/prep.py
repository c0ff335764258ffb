"""Turn a dataset split plan into shards plus a manifest in a store, resumably.

Layout in the store: `<split>/<split>-NNNNNN.tar` shards, a
`<split>/<split>-NNNNNN.done.json` record written after each shard is
complete in the store, and `<split>/manifest.json`, written last, after
every shard it lists: the manifest is the commit point. A rerun skips the
shards whose record matches the run's options, so a job killed at any
point finishes with the same shards and manifest as one never interrupted.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import cifar10, ffhq, folder, imagenet
from .parallel import SINGLE, Ranks, assign_shards, wait_for_all_ranks
from .shards import FORMAT, MANIFEST, Sample, ShardInfo, ShardWriter, build_manifest, manifest_bytes, verify_shard
from .source import Rejected, SourceError, SplitPlan
from .storage import ObjectWriter, open_store

READERS = {
    "cifar10": cifar10.plan,
    "imagenet32": lambda src: imagenet.plan(src, 32),
    "imagenet64": lambda src: imagenet.plan(src, 64),
    "ffhq256": ffhq.plan_256,
    "ffhq1024": ffhq.plan_1024,
    "folder": folder.plan,
}
DATASET_BITS = {"cifar10": 8, "imagenet32": 8, "imagenet64": 8, "ffhq256": 5, "ffhq1024": 8, "folder": 8}


# Samples per shard by default: shards of roughly 50-300 MB.
DEFAULT_SAMPLES_PER_SHARD = {"cifar10": 10000, "imagenet32": 10000, "imagenet64": 4000,
                             "ffhq256": 1000, "ffhq1024": 200, "folder": 1000}
_COMMITS_IN_FLIGHT = 2
"""Finished shards that may be on their way into the store while the next is encoded: one slow fsync
or upload (a disk busy writing back, a slow S3 response) then does not stall the decoding."""


@dataclass(frozen=True)
class PrepOptions:
    dataset: str
    samples_per_shard: int = 5000
    strict: bool = False
    """Stop at the first bad input item instead of listing it in the manifest's rejections."""
    resolution: int | None = None
    """folder only: the side of the square images written."""
    num_valid: int | None = None
    """folder only: how many images to hold out for validation."""

    def __post_init__(self) -> None:
        if self.dataset not in READERS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(READERS)}")
        if self.samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard={self.samples_per_shard} must be positive")
        if (self.dataset == "folder") != (self.resolution is not None):
            raise ValueError("--resolution is required for `folder` and only for it")
        if self.resolution is not None and not 1 <= self.resolution <= 4096:
            raise ValueError(f"--resolution {self.resolution}: expected 1 to 4096 pixels")

    def reader_args(self) -> dict:
        if self.dataset != "folder":
            return {}
        return {"resolution": self.resolution, "num_valid": 0 if self.num_valid is None else self.num_valid}

    def fingerprint(self, split: str, plan: SplitPlan) -> str:
        text = json.dumps([FORMAT, self.dataset, split, self.samples_per_shard, plan.num_samples,
                           plan.how, plan.resolution], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# The plans of the running prep, visible to forked workers (a plan holds
# the decoded source and closures, which do not pickle).
_PLANS: dict[str, SplitPlan] = {}


def _encode_shard(args) -> tuple[ObjectWriter, dict]:
    """Read, check and encode one shard, sample by sample, into the store's writer for it (a hidden
    local file, or an S3 upload in progress): visible under its name only when committed.

    Returns the writer and the shard's record (see _commit_shard).
    """
    out_url, options, split, index = args
    plan = _PLANS[split]
    store = open_store(f"{out_url.rstrip('/')}/{split}")
    start = index * options.samples_per_shard
    stop = min(start + options.samples_per_shard, plan.num_samples)
    rejections = []
    conversions: dict[str, int] = {}  # conversion name -> samples it was made for (source.CONVERSIONS)
    name = _shard_name(split, index)
    sink = store.open_writer(name)
    writer = _BackgroundWriter(sink)
    try:
        for i in range(start, stop):
            try:
                image, label, meta, encoded = plan.get(i)
            except Rejected as bad:
                if options.strict:
                    raise SourceError(f"{bad} (stopping: --strict)") from None
                rejections.append({"file": bad.file, "reason": bad.reason})
                continue
            width, height = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
            meta = dict(meta, width=int(width), height=int(height))
            for conversion in meta.pop("conversions", ()):  # counted, not stored in the sample's json
                conversions[conversion] = conversions.get(conversion, 0) + 1
            writer.add(image, Sample(f"{split}{i:07d}", encoded or encode_png(np.asarray(image)), meta, label))
        histogram, shard = writer.close()
    except BaseException:
        writer.close(abandon=True)
        sink.abort()
        raise
    record = {"fingerprint": options.fingerprint(split, plan), "name": name, "count": shard.count,
              "bytes": shard.size, "sha256": shard.sha256, "offsets": shard.offsets, "digests": shard.digests,
              "histogram": histogram.tolist(), "rejections": rejections, "conversions": conversions}
    return sink, record


class _BackgroundWriter:
    """Tars and hashes samples and counts their pixel histograms on a helper thread.

    The reading thread only decodes (and encodes, where needed); a bounded
    queue keeps memory to a few samples.
    """

    def __init__(self, out: ObjectWriter, depth: int = 8):
        self._writer = ShardWriter(out)
        self._histogram = np.zeros((3, 256), dtype=np.int64)  # per channel: exact mean and std
        self._queue: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    image, sample = item
                    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
                    self._histogram += np.asarray(image.histogram(), dtype=np.int64).reshape(3, 256)
                    self._writer.add(sample)
                except BaseException as err:  # reported by add() or close()
                    self._error = err

    def add(self, image: np.ndarray | Image.Image, sample: Sample) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((image, sample))

    def close(self, abandon: bool = False) -> tuple[np.ndarray, ShardWriter]:
        self._queue.put(None)
        self._thread.join()
        self._writer.close()
        if self._error is not None and not abandon:
            raise self._error
        return self._histogram, self._writer


def _commit_shard(out_url: str, split: str, sink: ObjectWriter, record: dict) -> dict:
    """Make the finished tar visible under its name (S3 checks its SHA-256 or its parts' CRC32s), then
    write its record (the commit)."""
    try:
        sink.commit(sha256=record["sha256"])
    except BaseException:
        sink.abort()
        raise
    store = open_store(f"{out_url.rstrip('/')}/{split}")
    store.write_bytes(record["name"].replace(".tar", ".done.json"), json.dumps(record, sort_keys=True).encode())
    return record


def _build_shard(args) -> dict:
    """Encode and commit one shard (a worker process's unit of work)."""
    sink, record = _encode_shard(args)
    return _commit_shard(args[0], args[2], sink, record)


def prep(dataset: str, src: str | os.PathLike, out_url: str, samples_per_shard: int | None = None,
         workers: int = 1, overwrite: bool = False, strict: bool = False, progress: bool = True,
         resolution: int | None = None, num_valid: int | None = None,
         ranks: Ranks | None = None, finalize_only: bool = False) -> dict[str, dict]:
    """Shard every split of `dataset` from `src` to `out_url`; return the manifests written.

    ranks: this process's share of the shards (`assign_shards`).
    Under MPI every rank builds its share, all meet at a barrier, and rank 0
    writes the manifests. A Slurm array task builds its share only; a
    finalize step (`finalize_only`) then writes the manifests once every
    shard is in the store. A single process does both.
    """
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(READERS)}")
    options = PrepOptions(dataset, samples_per_shard or DEFAULT_SAMPLES_PER_SHARD[dataset], strict,
                          resolution, num_valid)
    ranks = ranks or SINGLE
    if not Path(src).exists():
        raise SourceError(f"source {src} does not exist")
    plans = READERS[dataset](Path(src), **options.reader_args())
    for split, plan in plans.items():
        if plan.num_samples == 0:
            raise SourceError(f"{src}: split {split} has no samples")
    if not finalize_only:
        for split, plan in plans.items():
            _check_existing(options, split, plan, out_url, overwrite)
        owners = assign_shards({split: plan.num_samples for split, plan in plans.items()},
                               options.samples_per_shard, ranks.world)
        for split, plan in plans.items():
            mine = [i for i, owner in enumerate(owners[split]) if owner == ranks.rank]
            _build_split(options, split, plan, out_url, workers, ranks, progress, mine)
    if ranks.is_mpi and ranks.world > 1:
        wait_for_all_ranks()
    if ranks.rank != 0 or (ranks.launcher == "slurm-array" and not finalize_only):
        if progress and ranks.launcher == "slurm-array":
            print(f"array task {ranks.rank}/{ranks.world} done; run the same command with --finalize "
                  "once every task has finished, to write the manifests")
        return {}
    return {split: _finalize_split(options, split, plan, out_url, progress) for split, plan in plans.items()}



def _records(store, fingerprint: str) -> dict[int, dict]:
    """Shard index -> record, for the shards complete in the store and made with these options."""
    names = set(store.list())
    records = {}
    for name in sorted(n for n in names if n.endswith(".done.json")):
        try:
            record = json.loads(store.read_bytes(name))
        except (json.JSONDecodeError, UnicodeDecodeError):  # a damaged record: its shard is built again
            continue
        if isinstance(record, dict) and record.get("fingerprint") == fingerprint and record.get("name") in names:
            records[int(record["name"].split("-")[-1].split(".")[0])] = record
    return records


def _verified(store, records: dict[int, dict], progress: bool, desc: str) -> dict[int, dict]:
    """The records whose shards in the store still match them (size, SHA-256); a damaged or changed
    shard is reported and left out, so that it is built again."""
    good = {}
    for i, record in tqdm(sorted(records.items()), desc=desc, unit="shard", disable=not progress or not records):
        problem = verify_shard(store, ShardInfo.from_record(record))
        if problem is None:
            good[i] = record
        else:
            print(f"{store.url}/{record['name']}: {problem}; writing it again", flush=True)
    return good


def _check_existing(options: PrepOptions, split: str, plan: SplitPlan, out_url: str, overwrite: bool) -> None:
    """Refuse output made with other options (unless overwrite), before any work."""
    if overwrite:
        return
    store = open_store(f"{out_url.rstrip('/')}/{split}")
    fingerprint = options.fingerprint(split, plan)
    names = store.list()
    for name in [n for n in names if n.endswith(".done.json")][:1] + (["manifest.json"] if "manifest.json" in names else []):
        if json.loads(store.read_bytes(name)).get("fingerprint") != fingerprint:
            raise SourceError(
                f"{store.url} holds shards made with other options (dataset, split or "
                "samples per shard); pass --overwrite to replace them, or choose another --out")



def _build_split(options: PrepOptions, split: str, plan: SplitPlan, out_url: str, workers: int,
                 ranks: Ranks, progress: bool, mine: list[int]) -> None:
    store = open_store(f"{out_url.rstrip('/')}/{split}")
    records = _records(store, options.fingerprint(split, plan))
    records = _verified(store, {i: records[i] for i in mine if i in records}, progress,
                        f"{options.dataset}/{split}: verify")
    todo = [i for i in mine if i not in records]
    store.discard_unfinished([_shard_name(split, i) for i in todo])  # what a killed run left of them
    shard_size = lambda i: min(options.samples_per_shard, plan.num_samples - i * options.samples_per_shard)  # noqa: E731
    start = time.perf_counter()
    bar = tqdm(total=sum(shard_size(i) for i in mine), unit="img", disable=not progress,
               desc=f"{options.dataset}/{split}" + (f" rank {ranks.rank}/{ranks.world}" if ranks.world > 1 else ""),
               initial=sum(shard_size(i) for i in mine if i in records))
    _PLANS[split] = plan
    jobs = [(out_url, options, split, i) for i in todo]
    if workers > 1 and len(jobs) > 1:
        with get_context("fork").Pool(min(workers, len(jobs))) as pool:
            for i, _ in zip(todo, pool.imap(_build_shard, jobs), strict=True):
                bar.update(shard_size(i))
    else:  # one process: shards k-1 and k go into the store (fsync, upload) while shard k+1 is encoded
        with ThreadPoolExecutor(max_workers=_COMMITS_IN_FLIGHT) as uploader:
            pending: list = []
            for i, job in zip(todo, jobs, strict=True):
                sink, record = _encode_shard(job)
                if len(pending) == _COMMITS_IN_FLIGHT:
                    pending.pop(0).result()
                pending.append(uploader.submit(_commit_shard, out_url, split, sink, record))
                bar.update(shard_size(i))
            for commit in pending:
                commit.result()
    bar.close()
    if progress:
        print(f"{options.dataset}/{split}: {len(todo)} of {len(mine)} shards written this run "
              f"({len(mine) - len(todo)} already done), {time.perf_counter() - start:.1f}s")


def _finalize_split(options: PrepOptions, split: str, plan: SplitPlan, out_url: str, progress: bool) -> dict:
    """Write the split's manifest from the shard records: only when every shard is complete."""
    store = open_store(f"{out_url.rstrip('/')}/{split}")
    fingerprint = options.fingerprint(split, plan)
    records = _records(store, fingerprint)
    num_shards = math.ceil(plan.num_samples / options.samples_per_shard)
    missing = [i for i in range(num_shards) if i not in records]
    if missing:
        raise SourceError(f"{store.url}: {len(missing)} of {num_shards} shards are not complete "
                          f"({', '.join(_shard_name(split, i) for i in missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                          "run the prep again (or the array tasks that failed), then finalize")
    shards = [records[i] for i in range(num_shards)]
    manifest = build_manifest(options.dataset, split, plan.how, fingerprint, plan.resolution,
                              DATASET_BITS[options.dataset], shards, _tool_version())
    store.write_bytes(MANIFEST, manifest_bytes(manifest))
    if progress:
        total_bytes = sum(r["bytes"] for r in shards)
        print(f"{options.dataset}/{split}: {manifest['num_samples']} samples in {len(shards)} shards, "
              f"{total_bytes / 2**20:.1f} MiB, {len(manifest['rejections'])} rejected "
              f"-> {store.url}/manifest.json")
    return manifest


def _tool_version() -> str:
    try:
        return version("vdvae-pipeline")
    except PackageNotFoundError:  # running from a checkout without installing
        return "unknown"
