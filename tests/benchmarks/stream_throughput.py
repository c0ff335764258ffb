"""Decoded images/s of the shard stream, from local disk and from a local SeaweedFS.

    python tests/benchmarks/stream_throughput.py [--sizes 32,64,256,1024] [--repeats 3]

For each size, makes photograph-like PNGs (scikit-learn's sample photos,
cropped, scaled, with noise), shards them with `vdvae prep folder`, uploads
the same shards to a SeaweedFS server started here, and times one epoch of
`ShardStream` with one DataLoader worker process at the paper's per-GPU
batch size, in the steady state (images after the first batch over the
time after it; the time to the first batch, worker start and first fetch,
is printed apart), beside:
  - bare: decoding the same PNG bytes, already in memory, with PIL into a
    uint8 array (the floor: no I/O, no tar, no batching);
  - webdataset: stock `webdataset.WebDataset(...).decode("rgb8")` over the
    same local shards, one process;
  - unverified: the same local stream without its per-sample digest check
    (`verify=False`), run in turn with the verified one, for the check's cost.
Every timing is the median of --repeats. Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from data_prep.prep import prep  # noqa: E402
from data_prep.shards import Split, parse_tar  # noqa: E402
from pipeline.stream import ShardStream  # noqa: E402
from services import SeaweedFS  # noqa: E402

COUNT = {32: 20000, 64: 8000, 256: 600, 1024: 48}  # images per size: a few seconds of streaming each
BATCH = {32: 8, 64: 4, 256: 1, 1024: 1}  # the paper's per-GPU batch (imagenet32, imagenet64, ffhq)
PER_SHARD = {32: 5000, 64: 2000, 256: 200, 1024: 16}


def make_images(folder: Path, size: int, count: int) -> None:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(size)
    folder.mkdir(parents=True)
    for n in range(count):
        photo = photos[n % len(photos)]
        side = int(rng.integers(64, min(photo.size)))
        x, y = int(rng.integers(0, photo.size[0] - side)), int(rng.integers(0, photo.size[1] - side))
        crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(crop).astype(np.int16) + rng.normal(0, 3, (size, size, 3)).astype(np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{n:06d}.png")


def median_rate(count: int, run, repeats: int) -> float:
    """Median images/s of `run()`: its own rate where it returns one, else count / its time."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        rate = run()
        rates.append(rate if rate is not None else count / (time.perf_counter() - start))
    return float(np.median(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,64,256,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = SeaweedFS(tmp / "weed")
        os.environ.update(server.env)
        server.client().create_bucket(Bucket="bench")
        try:
            for size in (int(s) for s in args.sizes.split(",")):
                make_images(tmp / f"src{size}", size, COUNT[size])
                local, s3 = str(tmp / f"shards{size}"), f"s3://bench/shards{size}"
                for out in (local, s3):
                    prep("folder", tmp / f"src{size}", out, samples_per_shard=PER_SHARD[size], resolution=size,
                         num_valid=1, progress=False)
                split = Split.load(f"{local}/train")
                pngs = [fields["png"] for shard in split.shards
                        for _, fields in parse_tar(Path(local, "train", shard.name).read_bytes())]
                n, batch = len(pngs), BATCH[size]

                def bare(pngs=pngs):
                    for data in pngs:
                        with Image.open(io.BytesIO(data)) as image:
                            np.asarray(image)

                first_batch_s = {}

                def stream(url, batch=batch, first_batch_s=first_batch_s, verify=True):
                    """Steady state: images after the first batch over the time after it."""
                    start = time.perf_counter()
                    count = 0
                    for b in ShardStream(url, batch, workers=args.workers, verify=verify):
                        if count == 0:
                            first = time.perf_counter()
                            first_batch_s[url] = round(first - start, 3)
                        count += len(b)
                    return (count - batch) / (time.perf_counter() - first)

                def stock(split=split, local=local):
                    import webdataset as wds

                    urls = [str(Path(local, "train", s.name)) for s in split.shards]
                    for _ in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
                        pass
                verified, unverified = [], []
                for _ in range(args.repeats):  # in turn, so that a slow stretch of the host hits both
                    verified.append(stream(f"{local}/train"))
                    unverified.append(stream(f"{local}/train", verify=False))
                rates = {
                    "bare_decode": median_rate(n, bare, args.repeats),
                    "stream_local": float(np.median(verified)),
                    "stream_local_unverified": float(np.median(unverified)),
                    "stream_s3": median_rate(n, lambda s3=s3: stream(f"{s3}/train"), args.repeats),
                    "webdataset_local": median_rate(n, stock, args.repeats),
                }
                print(json.dumps({
                    "size": size, "images": n, "batch": batch, "workers": args.workers,
                    **{f"{k}_images_per_s": round(v, 1) for k, v in rates.items()},
                    "stream_time_over_bare": round(rates["bare_decode"] / rates["stream_local"], 3),
                    "verified_over_unverified": round(rates["stream_local"] / rates["stream_local_unverified"], 3),
                    "s3_over_local": round(rates["stream_s3"] / rates["stream_local"], 3),
                    "stream_over_webdataset": round(rates["stream_local"] / rates["webdataset_local"], 2),
                    "first_batch_s": first_batch_s,
                }), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
