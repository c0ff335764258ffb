"""Time the VDVAE training step (forward + backward) of one preset on this machine.

    python tests/benchmarks/model_step.py --preset cifar10 --batch 8 \
        --checkpointing none --dtype fp32 --steps 5

Runs `--warmup` steps, then `--steps` timed steps, and prints one JSON line:
the median step seconds and the process's peak RSS in GB (resident set
high-water mark, model creation included). Run one configuration per
process: peak RSS is per process.

--allocator tcmalloc (the default) runs with the allocator that the
pipeline gives its compute processes (pipeline/runtime.py); --allocator
system runs with the system's malloc.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import VDVAE, get_preset  # noqa: E402
from pipeline.runtime import active_allocator, reexec_with_fast_allocator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--checkpointing", default="none", help="none, all, or a resolution in px")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allocator", choices=["tcmalloc", "system"], default="tcmalloc")
    args = parser.parse_args()
    if args.allocator == "tcmalloc":
        reexec_with_fast_allocator()

    torch.manual_seed(args.seed)
    cfg = get_preset(args.preset).model
    model = VDVAE(cfg)
    model.set_activation_checkpointing(args.checkpointing)
    images = torch.randint(0, 256, (args.batch, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with autocast:
            loss = model(images).elbo
        loss.backward()
        model.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
        if not torch.isfinite(loss):
            raise SystemExit(f"non-finite loss {loss.item()} at step {step}")

    print(json.dumps({
        "preset": args.preset,
        "batch": args.batch,
        "checkpointing": args.checkpointing,
        "dtype": args.dtype,
        "steps": args.steps,
        "median_step_s": round(statistics.median(times), 3),
        "min_step_s": round(min(times), 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "allocator": active_allocator(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
