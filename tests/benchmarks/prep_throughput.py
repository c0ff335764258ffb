"""Throughput of `vdvae prep` for FFHQ, beside a bare loop over the same images.

    python tests/benchmarks/prep_throughput.py [--images 160] [--samples-per-shard 16] [--repeats 3]
                                               [--datasets ffhq1024,ffhq256]

Makes FFHQ-like 1024 px PNG fixtures (real photographs from scikit-learn,
scaled up, with sensor-like noise so they compress like photographs), then
reports images/s per process for ffhq1024 and ffhq256:
  - bare: the same work in a plain loop (ffhq1024: read + decode + check;
    ffhq256: read + decode + resize + PNG encode), no shards;
  - local: `vdvae prep` to a local folder, one process;
  - s3: `vdvae prep` to a local SeaweedFS S3 server, one process, the
    server sharing the machine's cores with it;
  - s3 apart: prep held to core 0 and the server to core 1, as an object
    store on another host would be, beside a local run held to core 0
    (`s3_over_local_server_apart`);
  - ranks: `mpirun -n 2` to the local folder; its speedup over one process
    (`two_ranks_speedup`) and over `mpirun -n 1` (`two_ranks_over_one_rank`:
    each rank bound to one core, so one rank's helper thread shares its
    core as every rank's does on a full node);
  - machine: the bare loop held to core 0, and two copies of it held to
    cores 0 and 1 with half the images each (`machine_two_cores_over_one`):
    what this machine gives two busy cores, the reference for the ranks' ratio.
Each run's start-up (interpreter, imports, source scan, launcher) is
measured on a one-image source and subtracted. Each repeat runs every
configuration once, in turn, so that the machine's drift reaches all of
them alike; every timing is the median over --repeats (the bare loop's
too), and `ratios_per_repeat` gives each ratio within each repeat
(start-up: the median). Each full run also records the CPU time the
hypervisor stole from this machine (/proc/stat; 0 on bare metal) and, for
S3, the CPU time SeaweedFS used, so a slow repeat can be told from a slow
prep. Before each run, the page cache's written data goes to disk (sync),
so that no run pays for an earlier one's writeback. Prints one JSON line
per dataset.

On a shared VM, one repeat's ratio moves by 10 % or more with the host's
load; the ffhq1024 figures in RESULTS.md use --images 320 --repeats 9.
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


def bare_loop(paths: list[Path], dataset: str) -> None:
    for path in paths:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
        if dataset == "ffhq256":
            encode_png(resize_256(array))


def bare(paths: list[Path], dataset: str) -> float:
    os.sync()
    start = time.perf_counter()
    bare_loop(paths, dataset)
    return len(paths) / (time.perf_counter() - start)


def bare_on_cores(paths: list[Path], dataset: str, cores: list[int]) -> float:
    """images/s of the bare loop in one forked process per core, each held to its core and
    given an equal share of the images: what this machine gives to that many busy cores."""
    os.sync()
    start = time.perf_counter()
    children = []
    for i, core in enumerate(cores):
        pid = os.fork()
        if pid == 0:
            try:
                os.sched_setaffinity(0, {core})
                bare_loop(paths[i::len(cores)], dataset)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        if status:
            raise RuntimeError(f"bare loop on a core failed (wait status {status})")
    return len(paths) / (time.perf_counter() - start)


def run_prep(dataset: str, src: Path, out: str, env: dict, mpi: int = 0, samples_per_shard: int = 4,
             core: int | None = None) -> float:
    cmd = [sys.executable, "-m", "launch.cli", "prep", dataset, "--src", str(src), "--out", out,
           "--samples-per-shard", str(samples_per_shard)]
    if mpi:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "core", "-n", str(mpi), *cmd]
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
    os.sync()  # earlier runs' written shards go to disk now, not during this run
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests while this VM had work (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cores: str) -> None:
    """Hold every thread of a running process to `cores` (threads it starts later inherit it)."""
    subprocess.run(["taskset", "-a", "-p", "-c", cores, str(pid)], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--datasets", default="ffhq1024,ffhq256", help="comma-separated: ffhq1024, ffhq256")
    args = parser.parse_args()
    spp = args.samples_per_shard
    if not set(args.datasets.split(",")) <= {"ffhq1024", "ffhq256"}:
        parser.error(f"--datasets {args.datasets}: choose from ffhq1024, ffhq256")
    if len(os.sched_getaffinity(0)) < 2:
        parser.error("needs at least 2 cores: the 2-rank and server-apart runs hold work to cores 0 and 1")

    # PMIx authenticates with munge where it is installed; without munged running,
    # mpirun retries it for 2.3 s. The native method starts in 0.05 s.
    env = dict(os.environ, PYTHONPATH=str(ROOT), PMIX_MCA_psec="native")
    every_core = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_fixtures(tmp / "src", args.images)
        server = SeaweedFS(tmp / "weed")
        server.client().create_bucket(Bucket="bench")
        s3_env = dict(env, **server.env)
        runs = iter(range(10**6))  # a fresh output for every run
        try:
            # start-up cost (interpreter, imports, source scan, launcher) measured on a single image
            one = tmp / "one"
            (one / "images1024x1024" / "00000").mkdir(parents=True)
            os.link(paths[0], one / "images1024x1024" / "00000" / "00000.png")
            for dataset in args.datasets.split(","):
                # name -> (output, environment, mpirun ranks, core the prep is held to, server held to core 1)
                configs = {"local": (str(tmp / "local"), env, 0, None, False),
                           "s3": ("s3://bench/shared", s3_env, 0, None, False),
                           "local core0": (str(tmp / "local-core0"), env, 0, 0, False),
                           "s3 apart": ("s3://bench/apart", s3_env, 0, 0, True),
                           "1 rank": (str(tmp / "rank"), env, 1, None, False),
                           "2 ranks": (str(tmp / "ranks"), env, 2, None, False)}
                times: dict[str, list[float]] = {}
                steal: dict[str, list[float]] = {}  # per full run: host steal, s
                server_cpu: dict[str, list[float]] = {}  # per full S3 run: SeaweedFS CPU, s
                bare_rates, bare_one_core, bare_two_cores = [], [], []
                for _ in range(args.repeats):
                    bare_rates.append(bare(paths, dataset))
                    bare_one_core.append(bare_on_cores(paths, dataset, [0]))
                    bare_two_cores.append(bare_on_cores(paths, dataset, [0, 1]))
                    for name, (out, environ, mpi, core, apart) in configs.items():
                        if apart:
                            pin(server.proc.pid, "1")
                        try:
                            for src, what in ((one, "startup"), (tmp / "src", "run")):
                                stolen, served = steal_seconds(), cpu_seconds(server.proc.pid)
                                seconds = run_prep(dataset, src, f"{out}-{next(runs)}", environ, mpi, spp, core)
                                times.setdefault(f"{name} {what}", []).append(seconds)
                                if what == "run":
                                    steal.setdefault(name, []).append(steal_seconds() - stolen)
                                    if out.startswith("s3://"):
                                        server_cpu.setdefault(name, []).append(cpu_seconds(server.proc.pid) - served)
                        finally:
                            if apart:
                                pin(server.proc.pid, every_core)
                median = {k: float(np.median(v)) for k, v in times.items()}
                n = len(paths) - 1  # images beyond the start-up runs' one
                rate = {name: n / max(median[f"{name} run"] - median[f"{name} startup"], 1e-9) for name in configs}
                bare_rate = float(np.median(bare_rates))
                # the same ratios within each repeat, whose runs follow one another within a minute
                each = [{name: n / max(times[f"{name} run"][r] - median[f"{name} startup"], 1e-9) for name in configs}
                        for r in range(args.repeats)]
                ratios = {"local_over_bare": [e["local"] / b for e, b in zip(each, bare_rates, strict=True)],
                          "s3_over_local": [e["s3"] / e["local"] for e in each],
                          "s3_over_local_server_apart": [e["s3 apart"] / e["local core0"] for e in each],
                          "two_ranks_speedup": [e["2 ranks"] / e["local"] for e in each],
                          "two_ranks_over_one_rank": [e["2 ranks"] / e["1 rank"] for e in each],
                          "machine_two_cores_over_one": [b / a for a, b in zip(bare_one_core, bare_two_cores, strict=True)]}
                machine = float(np.median(bare_two_cores)) / float(np.median(bare_one_core))
                print(json.dumps({
                    "dataset": dataset, "images": len(paths), "samples_per_shard": spp,
                    "repeats": args.repeats,
                    "bare_images_per_s": round(bare_rate, 2),
                    "local_images_per_s": round(rate["local"], 2),
                    "s3_images_per_s": round(rate["s3"], 2),
                    "two_ranks_images_per_s": round(rate["2 ranks"], 2),
                    "local_over_bare": round(rate["local"] / bare_rate, 3),
                    "s3_over_local": round(rate["s3"] / rate["local"], 3),
                    "s3_over_local_server_apart": round(rate["s3 apart"] / rate["local core0"], 3),
                    "two_ranks_speedup": round(rate["2 ranks"] / rate["local"], 3),
                    "two_ranks_over_one_rank": round(rate["2 ranks"] / rate["1 rank"], 3),
                    "machine_two_cores_over_one": round(machine, 3),
                    "images_per_s": {name: round(r, 2) for name, r in rate.items()},
                    "bare_images_per_s_on_cores": {"core 0": round(float(np.median(bare_one_core)), 2),
                                                   "cores 0 and 1": round(float(np.median(bare_two_cores)), 2)},
                    "ratios_per_repeat": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
                    "runs_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
                    "host_steal_s": {k: [round(t, 2) for t in v] for k, v in steal.items()},
                    "server_cpu_s": {k: [round(t, 2) for t in v] for k, v in server_cpu.items()},
                }), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
