"""`vdvae prep | verify`: shard a dataset into webdataset tars plus a manifest, and check one."""

from __future__ import annotations

import argparse
import inspect

from data_prep.prep import DEFAULT_SAMPLES_PER_SHARD, READERS, prep
from data_prep.shards import Split, damaged_samples, verify_shard
from data_prep.storage import open_store
from pipeline.distributed import detect_ranks

DATASETS = tuple(READERS)
_PREP_DEFAULTS = {name: p.default for name, p in inspect.signature(prep).parameters.items()}
_SOURCE_LAYOUTS = {
    "cifar10": "cifar-10-batches-py/",
    "imagenet32": "train_32x32/ + valid_32x32/, or train_data_batch_1..10 + val_data",
    "imagenet64": "train_64x64/ + valid_64x64/, or train_data_batch_1..10 + val_data",
    "ffhq256": "images1024x1024/ or a flat folder of 00000.png ... 69999.png",
    "ffhq1024": "images1024x1024/ or a flat folder of 00000.png ... 69999.png",
    "folder": "any folder of images",
}


def _cmd_prep(args: argparse.Namespace) -> int:
    ranks = detect_ranks()
    if ranks.launcher in ("slurm", "env") and ranks.world > 1 and not args.finalize:
        raise ValueError(f"{ranks.world} prep tasks without MPI cannot meet before the manifest is written: "
                         "start the ranks with mpirun (or srun --mpi=pmix), or run an array job and then "
                         "--finalize (vdvae submit prep does either)")
    prep(args.dataset, args.src, args.out, samples_per_shard=args.samples_per_shard,
         workers=args.workers or _PREP_DEFAULTS["workers"], overwrite=args.overwrite, strict=args.strict,
         resolution=args.resolution, num_valid=args.num_valid, ranks=ranks,
         finalize_only=args.finalize, progress=ranks.rank == 0 or ranks.launcher == "slurm-array")
    return 0


def _splits_under(url: str) -> list[str]:
    """The split folders a dataset URL holds (or the URL itself when it is a split)."""
    store = open_store(url)
    if "manifest.json" in store.list():
        return [url.rstrip("/")]
    return [f"{url.rstrip('/')}/{name}" for name in store.list_folders()
            if "manifest.json" in open_store(f"{url.rstrip('/')}/{name}").list()]


def _cmd_verify(args: argparse.Namespace) -> int:
    splits = _splits_under(args.url)
    if not splits:
        raise ValueError(f"{args.url} holds no split prepared by `vdvae prep` (no manifest.json in it or "
                         "in a folder below it)")
    bad = 0
    for url in splits:
        split = Split.load(url)
        store = open_store(url)
        present = set(store.list())
        print(f"{url}: {split.num_samples} samples in {len(split.shards)} shards")
        for shard in split.shards:
            problem = verify_shard(store, shard, present)
            if problem and problem != "missing" and not problem.startswith("unreadable"):
                damaged = damaged_samples(store, shard)
                problem += f"; {len(damaged)} of {shard.count} samples damaged" + (
                    f" (first: {damaged[0]})" if damaged else "")
            bad += problem is not None
            if problem or args.verbose:
                print(f"  {shard.name}: {problem or 'ok'}")
    print(f"{bad} damaged or missing shards" if bad else "every shard matches its manifest")
    if bad:
        print("fix: run the same `vdvae prep` command again; it verifies every shard and rewrites the "
              "damaged ones")
    return 1 if bad else 0


def prep_arguments(p: argparse.ArgumentParser) -> None:
    """What `vdvae prep` and `vdvae submit prep` both take (PREP_OPTIONS: those passed on as given)."""
    p.add_argument("dataset", choices=DATASETS,
                   help="the dataset; `folder`: any folder of images, center-cropped and resized")
    p.add_argument("--src", required=True, help="the dataset folder: " + "; ".join(
        f"{layout} ({name})" for name, layout in _SOURCE_LAYOUTS.items()))
    p.add_argument("--out", required=True, help="s3://bucket/prefix or a local folder")
    p.add_argument("--samples-per-shard", type=int, help="default by dataset, for shards of roughly 50-300 MB: " +
                   ", ".join(f"{name} {n}" for name, n in DEFAULT_SAMPLES_PER_SHARD.items()))
    p.add_argument("--workers", type=int,
                   help=f"local worker processes per rank (default {_PREP_DEFAULTS['workers']})")
    p.add_argument("--overwrite", action="store_true", help="replace existing output made with other options")
    p.add_argument("--resolution", type=int, help="folder: side of the square images written")
    p.add_argument("--num-valid", type=int, help="folder: images held out for validation (default 0)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad image instead of listing it in the manifest's rejections")


PREP_OPTIONS = ("samples_per_shard", "workers", "resolution", "num_valid", "overwrite", "strict")


def add_commands(sub) -> None:
    p = sub.add_parser(
        "prep", help="shard a dataset into webdataset tars plus a manifest, locally or on S3",
        description="Read a dataset as it is distributed, split it as the official code does, and "
                    "write <out>/<split>/<split>-NNNNNN.tar shards and <out>/<split>/manifest.json. "
                    "Rerunning after an interruption verifies the shards already written and completes "
                    "or rewrites only what is missing or damaged. Parallel: under mpirun (or srun with "
                    "PMI) the ranks share the shards and rank 0 writes the manifests; as a Slurm array "
                    "each task writes its share and a last run with --finalize writes the manifests.")
    prep_arguments(p)
    p.add_argument("--finalize", action="store_true",
                   help="only write the manifests, once every shard is complete (after a Slurm array)")
    p.set_defaults(func=_cmd_prep)

    p = sub.add_parser(
        "verify", help="check a prepared dataset against its manifests, shard by shard",
        description="Read every shard of every split under URL (or of the split at URL) and compare its "
                    "size and SHA-256, and each damaged shard's samples, with the manifest. Exit status 1 "
                    "when a shard is missing or damaged.")
    p.add_argument("url", help="the prepared dataset (`vdvae prep --out`) or one split of it")
    p.add_argument("--verbose", action="store_true", help="list every shard, not only the bad ones")
    p.set_defaults(func=_cmd_verify)
