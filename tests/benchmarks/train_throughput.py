"""Training throughput and per-rank state memory on 2 CPU ranks (DeepSpeed, gloo), by ZeRO stage.

    python tests/benchmarks/train_throughput.py [--preset cifar10] [--batch 2] [--steps 6] [--separate-master]

Launches 2 ranks per ZeRO stage (0, 2, 3) on the preset's model with
random uint8 batches (the data path is measured by stream_throughput.py)
and reports, per stage:
  - images/s over --steps steps under the paper's update rule with EMA;
  - per-rank memory of model and optimizer state: every tensor alive (each
    storage counted once) once the backward pass has made the gradients and
    freed the activations, and again after the step; the state is the larger
    (parameters, gradients, optimizer state, master copies, buckets, EMA; at
    stage 0 the gradients live from backward to the end of the step), and
    its ratio stage 3 / stage 0;
  - at stages 2 and 3, the step time with the update rule and EMA against
    plain `engine.step()` with DeepSpeed's clipping and no EMA, alternating
    step by step in the same process (median of --steps pairs).
Prints one JSON line per stage.

    python tests/benchmarks/train_throughput.py --mirror [--preset cifar10] [--batch 2] [--steps 24]
        [--checkpoint-every 6] [--stage 2]

--mirror: the checkpoint mirror on a real SeaweedFS S3 (started here, on
127.0.0.1), 2 ranks, in one pair of processes comparing three modes: no
mirror; the background mirror (pipeline/checkpoint.py: each rank its own
files, in a thread); and the synchronous upload the mirror had before (rank
0 uploads every file of the checkpoint, then `latest`, while the other rank
waits at a barrier), reproduced here. The run is --steps / --checkpoint-every
rounds of each mode, interleaved (each mode first in turn, so that a slow
minute of a shared machine falls on all three): a round checkpoints, then
trains --checkpoint-every steps (in the background mode beside the upload),
then waits for what is left of the upload. Per mode: the mean and median
training-step time, the wall-clock time a checkpoint costs the training
ranks (from entering `save` to training again, the slower rank; median),
the wait for the rest of an upload after a round's steps (median), and the
CPU seconds the S3 server used in the mode's rounds. One JSON line.

Here the S3 server shares the two cores with the training ranks, which on
a cluster it does not: --server-nice N runs it at nice N (every thread),
so that it takes the CPU the ranks leave, as a remote store would cost
them nothing; the default 0 keeps it level with the ranks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def timed_paper_step(engine, rule, ema, images) -> float:
    """Seconds of one training step under the paper's update rule, with the EMA update."""
    start = time.perf_counter()
    engine.backward(engine(images).elbo)
    if not rule.step().skipped:
        ema.update()
    return time.perf_counter() - start

def persistent_tensor_bytes() -> int:
    import torch

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen and storage.nbytes() > 0:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # tensors without storage (meta, sparse): not state
            continue
    return total


def worker(args) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    import deepspeed

    from model import VDVAE
    from pipeline.config import RunConfig
    from pipeline.distributed import without_shared_memory_op
    from pipeline.ema import EMA
    from pipeline.engine import share_fp32_master
    from pipeline.update import UpdateRule

    without_shared_memory_op()
    deepspeed.init_distributed(dist_backend="gloo")
    config = RunConfig.from_preset(args.preset, "unused", "unused", [f"zero_stage={args.stage}",
                                                                    f"batch_per_gpu={args.batch}"])
    torch.manual_seed(0)
    model = VDVAE(config.model_config())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config.deepspeed_config(2, on_gpu=False))
    if not args.separate_master:
        share_fp32_master(engine)  # as the trainer does
    rule = UpdateRule(engine, config.grad_clip, config.skip_threshold)
    ema = EMA(engine, config.ema_rate, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    size = config.model_config().image_size
    gen = torch.Generator().manual_seed(int(os.environ["RANK"]))
    images = torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8, generator=gen)

    def paper_step() -> float:
        return timed_paper_step(engine, rule, ema, images)

    paper_step()  # warm-up
    times = [paper_step() for _ in range(args.steps)]
    out = engine(images)
    engine.backward(out.elbo)
    del out
    after_backward = persistent_tensor_bytes()
    if not rule.step().skipped:
        ema.update()
    after_step = persistent_tensor_bytes()
    result = {"stage": args.stage, "images_per_s_per_rank": args.batch / float(np.median(times)),
              "after_backward_bytes": after_backward, "after_step_bytes": after_step,
              "state_bytes": max(after_backward, after_step)}
    if args.stage > 0:  # the same steps without the rule's skip check and without EMA
        name = "scaled_global_norm" if args.stage in (1, 2) else "_get_norm_groups"
        hooked = getattr(engine.optimizer, name)

        def plain_step() -> float:
            start = time.perf_counter()
            engine.backward(engine(images).elbo)
            engine.step()
            return time.perf_counter() - start

        pairs = []
        for _ in range(args.steps):
            delattr(engine.optimizer, name)  # the class's own method: DeepSpeed as shipped
            plain = plain_step()
            setattr(engine.optimizer, name, hooked)
            pairs.append((paper_step(), plain))
        result["paper_step_s"] = float(np.median([p for p, _ in pairs]))
        result["plain_step_s"] = float(np.median([q for _, q in pairs]))
    if os.environ["RANK"] == "0":
        print(json.dumps(result), flush=True)


def _old_sync_upload(url: str, folder: Path) -> None:
    """The mirror before the background one: rank 0 put every file of the checkpoint, then `latest`."""
    from data_prep.storage import open_store

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        open_store(f"{url}/{folder.name}").put_file(path.name, path)
    open_store(url).write_bytes("latest", folder.name.encode())


def mirror_worker(args) -> None:

    import numpy as np
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    import deepspeed

    from model import VDVAE
    from pipeline.checkpoint import Checkpointer, Mirror
    from pipeline.config import RunConfig
    from pipeline.distributed import without_shared_memory_op
    from pipeline.ema import EMA
    from pipeline.engine import share_fp32_master
    from pipeline.update import UpdateRule

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    without_shared_memory_op()
    deepspeed.init_distributed(dist_backend="gloo")
    run_dir = Path(args.run_root) / "run"
    config = RunConfig.from_preset(args.preset, "unused", str(run_dir), [
        f"zero_stage={args.stage}", f"batch_per_gpu={args.batch}", "keep_checkpoints=2",
        f"checkpoint_mirror={args.mirror_url}"])
    torch.manual_seed(0)
    model = VDVAE(config.model_config())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config.deepspeed_config(world, on_gpu=False))
    share_fp32_master(engine)
    rule = UpdateRule(engine, config.grad_clip, config.skip_threshold)
    ema = EMA(engine, config.ema_rate, rank, world)

    class Position:  # the data stream's part of the checkpoint (not what is measured here)
        def state_dict(self) -> dict:
            return {"skipped": 0}

    checkpointer = Checkpointer(config, engine, ema, Position(), rank, world)
    size = config.model_config().image_size
    images = torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(rank))

    def server_cpu_s() -> float:  # the S3 server's user + system time, all threads
        fields = Path(f"/proc/{os.environ['BENCH_SERVER_PID']}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    modes = ("off", "background", "sync_before")
    background = Mirror(f"{args.mirror_url}/background", rank, world, config.keep_checkpoints)
    got = {mode: {"steps": [], "saves": [], "waits": [], "finished": [], "server": 0.0} for mode in modes}

    def step() -> float:
        return timed_paper_step(engine, rule, ema, images)

    step()  # warm-up
    tag = 0
    for round_ in range(args.steps // args.checkpoint_every):
        for mode in modes[round_ % 3:] + modes[:round_ % 3]:  # each mode first in turn
            server_start, mine = server_cpu_s(), got[mode]
            checkpointer.mirror = background if mode == "background" else None
            tag += 1
            dist.barrier()
            start = time.perf_counter()
            folder = checkpointer.save(tag, {})
            if mode == "sync_before":
                if rank == 0:
                    _old_sync_upload(f"{args.mirror_url}/{mode}", folder)
                dist.barrier()
            mine["saves"].append(time.perf_counter() - start)
            mine["steps"] += [step() for _ in range(args.checkpoint_every)]  # (background: beside the upload)
            start = time.perf_counter()
            mine["finished"].append(checkpointer.finish_uploads())
            mine["waits"].append(time.perf_counter() - start)
            mine["server"] += server_cpu_s() - server_start
    results = {mode: {"step_mean_s": float(np.mean(r["steps"])), "step_median_s": float(np.median(r["steps"])),
                      "checkpoint_s": float(np.median(r["saves"])), "end_wait_s": float(np.median(r["waits"])),
                      "uploads_finished": all(r["finished"]), "server_cpu_s": r["server"]}
               for mode, r in got.items()}
    slowest = [None] * world
    dist.all_gather_object(slowest, results)
    if rank == 0:
        merged = {mode: {k: max(r[mode][k] for r in slowest) if k.endswith("_s") else all(r[mode][k] for r in slowest)
                         for k in results[mode]} for mode in results}
        print(json.dumps(merged), flush=True)
    engine.destroy()
    dist.destroy_process_group()


def run_mirror_benchmark(args) -> None:
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from services import SeaweedFS

    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as tmp:
        server = SeaweedFS(Path(tmp) / "s3")
        try:
            for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
                os.setpriority(os.PRIO_PROCESS, int(task.name), args.server_nice)
            server.client().create_bucket(Bucket="bench")
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            procs = []
            for rank in range(2):
                env = dict(os.environ, **server.env, DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE="2",
                           LOCAL_RANK=str(rank), LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), BENCH_SERVER_PID=str(server.proc.pid))
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--mirror-worker", "--stage", str(args.stage), "--preset", args.preset,
                     "--batch", str(args.batch), "--steps", str(args.steps), "--checkpoint-every",
                     str(args.checkpoint_every), "--run-root", tmp, "--mirror-url", "s3://bench/mirror"],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            outs = [p.communicate() for p in procs]
            for p, (_, err) in zip(procs, outs, strict=True):
                if p.returncode != 0:
                    raise SystemExit(err[-3000:])
            modes = json.loads(outs[0][0].strip().splitlines()[-1])
            checkpoint_bytes = sum(f.stat().st_size for f in (Path(tmp) / "run" / "checkpoints").rglob("*")
                                   if f.is_file()) / max(1, len(list((Path(tmp) / "run" / "checkpoints").glob("global_step*"))))
        finally:
            server.stop()
    off = modes["off"]
    print(json.dumps({"preset": args.preset, "ranks": 2, "stage": args.stage, "batch_per_rank": args.batch,
                      "steps": args.steps, "checkpoint_every": args.checkpoint_every, "server_nice": args.server_nice,
                      "checkpoint_gb": round(checkpoint_bytes / 2**30, 3),
                      **{mode: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                         for mode, r in modes.items()},
                      "background_step_over_off": round(modes["background"]["step_mean_s"] / off["step_mean_s"], 3),
                      "checkpoint_cost_before_s": round(modes["sync_before"]["checkpoint_s"], 3),
                      "checkpoint_cost_after_s": round(modes["background"]["checkpoint_s"], 3)}), flush=True)


def launch(args, stage: int) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT))
        extra = ["--separate-master"] if args.separate_master else []
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--stage", str(stage), "--preset",
                                       args.preset, "--batch", str(args.batch), "--steps", str(args.steps),
                                       *extra],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise SystemExit(err[-3000:])
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=2, help="images per rank per step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--stages", default="0,2,3")
    parser.add_argument("--separate-master", action="store_true",
                        help="keep DeepSpeed's own separate fp32 master copy at stage 3 (as before share_fp32_master)")
    parser.add_argument("--mirror", action="store_true", help="the checkpoint mirror benchmark (see above)")
    parser.add_argument("--checkpoint-every", type=int, default=6, help="--mirror: steps between checkpoints")
    parser.add_argument("--stage", type=int, default=None, help="--mirror: the ZeRO stage (default 2)")
    parser.add_argument("--server-nice", type=int, default=0, help="--mirror: the S3 server's nice value")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mirror-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-root", help=argparse.SUPPRESS)
    parser.add_argument("--mirror-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.mirror_worker:
        return mirror_worker(args)
    if args.mirror:
        args.stage = 2 if args.stage is None else args.stage
        args.steps = 24 if args.steps == 6 else args.steps
        return run_mirror_benchmark(args)
    results = {stage: launch(args, stage) for stage in map(int, args.stages.split(","))}
    for stage, r in results.items():
        line = {"preset": args.preset, "ranks": 2, "batch_per_rank": args.batch, "stage": stage,
                "images_per_s": round(2 * r["images_per_s_per_rank"], 3),
                "state_gb_per_rank": round(r["state_bytes"] / 2**30, 3),
                "after_backward_gb": round(r["after_backward_bytes"] / 2**30, 3),
                "after_step_gb": round(r["after_step_bytes"] / 2**30, 3),
                "state_over_stage0": round(r["state_bytes"] / results[0]["state_bytes"], 3)
                if 0 in results else None}
        if "paper_step_s" in r:
            line.update(paper_step_s=round(r["paper_step_s"], 3), plain_step_s=round(r["plain_step_s"], 3),
                        rule_and_ema_overhead=round(r["paper_step_s"] / r["plain_step_s"] - 1, 4))
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
