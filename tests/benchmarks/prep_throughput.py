"""Throughput of `vdvae prep` for FFHQ, beside a bare loop over the same images.

    python tests/benchmarks/prep_throughput.py [--images 160] [--samples-per-shard 16] [--repeats 3]

Makes FFHQ-like 1024 px PNG fixtures (real photographs from scikit-learn,
scaled up, with sensor-like noise so they compress like photographs), then
reports images/s per process for ffhq1024 and ffhq256:
  - bare: the same work in a plain loop (ffhq1024: read + decode + check;
    ffhq256: read + decode + resize + PNG encode), no shards;
  - local: `vdvae prep` to a local folder, one process;
  - s3: `vdvae prep` to a local SeaweedFS S3 server, one process;
  - ranks: `mpirun -n 2` to the local folder; its speedup over one process.
Each run's start-up (interpreter, imports, source scan, launcher) is
measured on a one-image source and subtracted. Every timing is the median
of --repeats runs (the bare loop's too), as the server shares the same
cores; before each, the page cache's written data goes to disk (sync), so
that no run pays for an earlier one's writeback. Prints one JSON line per
dataset.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from data_prep.ffhq import resize_256  # noqa: E402
from data_prep.prep import encode_png  # noqa: E402
from services import SeaweedFS  # noqa: E402


def make_fixtures(folder: Path, count: int) -> list[Path]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    paths = []
    for n in range(count):
        photo = Image.fromarray(photos[n % len(photos)])
        side = min(photo.size)
        crop = photo.crop((n % 50, 0, n % 50 + side, side)).resize((1024, 1024), Image.Resampling.BICUBIC)
        pixels = np.asarray(crop).astype(np.int16) + rng.normal(0, 3, (1024, 1024, 3)).astype(np.int16)
        path = folder / "images1024x1024" / "00000" / f"{n:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def bare(paths: list[Path], dataset: str) -> float:
    os.sync()
    start = time.perf_counter()
    for path in paths:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
        if dataset == "ffhq256":
            encode_png(resize_256(array))
    return len(paths) / (time.perf_counter() - start)


def run_prep(dataset: str, src: Path, out: str, env: dict, mpi: int = 0, samples_per_shard: int = 4) -> float:
    cmd = [sys.executable, "-m", "pipeline.cli", "prep", dataset, "--src", str(src), "--out", out,
           "--samples-per-shard", str(samples_per_shard)]
    if mpi:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(mpi), *cmd]
    os.sync()  # earlier runs' written shards go to disk now, not during this run
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spp = args.samples_per_shard

    every: dict[str, list[float]] = {}  # each run's seconds, by what was measured

    def median(measure, what: str = "") -> float:
        times = [measure() for _ in range(args.repeats)]
        every.setdefault(what, []).extend(round(t, 2) for t in times)
        return float(np.median(times))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_fixtures(tmp / "src", args.images)
        server = SeaweedFS(tmp / "weed")
        server.client().create_bucket(Bucket="bench")
        s3_env = dict(env, **server.env)
        try:
            # start-up cost (interpreter, imports, source scan) measured on a single image
            one = tmp / "one"
            (one / "images1024x1024" / "00000").mkdir(parents=True)
            os.link(paths[0], one / "images1024x1024" / "00000" / "00000.png")
            for dataset in ("ffhq1024", "ffhq256"):
                bare_rate = median(lambda dataset=dataset: bare(paths, dataset))
                runs = iter(range(10**6))  # a fresh output for every run

                def timed(src, out, environ, mpi=0, dataset=dataset, runs=runs):
                    return median(lambda: run_prep(dataset, src, f"{out}-{next(runs)}", environ, mpi, spp),
                                  f"{dataset} {'s3 ' if out.startswith('s3://') else ''}{Path(out).name}")
                startup = timed(one, str(tmp / f"startup-{dataset}"), env)
                startup_s3 = timed(one, f"s3://bench/startup-{dataset}", s3_env)
                startup_mpi = timed(one, str(tmp / f"startup-mpi-{dataset}"), env, mpi=2)
                local = timed(tmp / "src", str(tmp / f"local-{dataset}"), env) - startup
                two = timed(tmp / "src", str(tmp / f"ranks-{dataset}"), env, mpi=2) - startup_mpi
                s3 = timed(tmp / "src", f"s3://bench/{dataset}", s3_env) - startup_s3
                n = len(paths) - 1  # images beyond the start-up runs' one

                def rate(seconds: float, n: int = n) -> float:
                    return n / max(seconds, 1e-9)
                print(json.dumps({
                    "dataset": dataset, "images": len(paths), "samples_per_shard": spp,
                    "repeats": args.repeats,
                    "bare_images_per_s": round(bare_rate, 2),
                    "local_images_per_s": round(rate(local), 2),
                    "s3_images_per_s": round(rate(s3), 2),
                    "two_ranks_images_per_s": round(rate(two), 2),
                    "local_over_bare": round(rate(local) / bare_rate, 3),
                    "s3_over_local": round(rate(s3) / rate(local), 3),
                    "two_ranks_speedup": round(rate(two) / rate(local), 3),
                    "startup_s": [round(startup, 2), round(startup_s3, 2), round(startup_mpi, 2)],
                    "runs_s": {k.split(" ", 1)[1]: v for k, v in every.items() if k.startswith(dataset + " ")},
                }), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
