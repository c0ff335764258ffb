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
        start = time.perf_counter()
        engine.backward(engine(images).elbo)
        if not rule.step().skipped:
            ema.update()
        return time.perf_counter() - start

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
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
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
