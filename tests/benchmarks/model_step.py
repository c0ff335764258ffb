"""Time the VDVAE training step (forward + backward) of one preset on this machine.

    python tests/benchmarks/model_step.py --preset cifar10 --batch 8 \
        --checkpointing none --dtype fp32 --steps 5 --peak

Runs `--warmup` steps, then `--steps` timed steps, and prints one JSON line:
the median step seconds and the process's peak RSS in GB (resident set
high-water mark, model creation included). Run one configuration per
process: peak RSS is per process.

--peak measures, in the same process and with the same thread count, the
machine's matmul peak (the best of square matmuls from 512 to 4096, 8192 on
CUDA, fp32 and bf16, and fp16 on CUDA) and the step's FLOPs
(torch.utils.flop_counter over one extra untimed forward + backward), and
reports the achieved TFLOP/s and its fraction of the peak of the step's
dtype. Timings on a shared machine are noisy: compare fractions of a peak
measured in the same process, not seconds.

On a shared machine: `other_load_median` is the share of the CPUs that
other processes used during the timed steps (from /proc/stat), and
--max-other-load F repeats a step during which they used more than F
(at most --max-discarded times; `discarded_steps` counts them).
`fraction_of_peak_cpu_time` is FLOPs per CPU second of this process (all
threads) against the matmul's, which time taken by other processes does
not lower; for an eager step an upper bound, as a thread that waits idle
(serial Python, a one-thread op) costs wall time but no CPU time. Not for
a compiled step, whose threads stay busy while it waits (on 2 CPU cores:
0.31 where the wall-time fraction was 0.62).

--compile compiles the model's blocks (`VDVAE.compile_blocks`); the first
step's time, the compilation, is reported apart (`compile_s`) and the
warmup covers it. --compile-mode passes torch.compile's `mode`
(max-autotune: inductor times its own GEMM kernels against ATen's for each
matmul shape, and compiles for longer).

`conv1x1_form` names the form of the model's 1x1 convs on this device
(model.vdvae.conv1x1_form: matmul or convolution; tests/benchmarks/conv1x1.py
compares them).

--allocator tcmalloc (the default) runs with the allocator that the
pipeline gives its compute processes (pipeline/runtime.py); --allocator
system runs with the system's malloc.

On CUDA: timings are synchronised, `peak_cuda_gb` is the allocator's peak
over the timed steps, TF32 is off unless --tf32, --dtype fp16 is autocast
without a loss scale (a timing, not training), and --max-batch searches
the largest batch that fits (doubling until out of memory, then bisecting).
--profile N prints the top N ops of one step (torch.profiler, by self time)
to stderr; the JSON line stays alone on stdout. It adds the share of that
step's time that its matmuls and convolutions took (`matmul_conv_share`)
and, with --peak, `matmul_conv_fraction_of_peak`: fraction_of_peak over that
share, the fraction the step would reach if everything else (elementwise
work, copies, Python) took no time: the ceiling that the matmul and
convolution kernels themselves set. (A share of one profiled step: the
profiler's overhead falls mostly on the many small ops, so the share comes
out a little low and the ceiling a little high.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import VDVAE, get_preset  # noqa: E402
from model.vdvae import conv1x1_form  # noqa: E402
from pipeline.runtime import active_allocator, reexec_with_fast_allocator  # noqa: E402

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_busy_seconds() -> float:
    """CPU seconds that all processes of the machine have run since boot (/proc/stat; 0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields)
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass
class Interval:
    wall: float
    """Wall seconds."""
    cpu: float
    """CPU seconds of this process, all threads."""
    other_load: float
    """The share of the machine's CPUs that other processes used meanwhile (0: none, 1: all)."""


class Clock:
    """Times an interval: wall, this process's CPU time, and what other processes took meanwhile."""

    def __init__(self, device: torch.device):
        self.device = device
        synchronize(device)
        self.wall, self.cpu, self.busy = time.perf_counter(), time.process_time(), machine_busy_seconds()

    def stop(self) -> Interval:
        synchronize(self.device)
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        others = machine_busy_seconds() - self.busy - cpu
        return Interval(wall, cpu, max(0.0, others / (wall * (os.cpu_count() or 1))))


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5,
                seconds: float = 3.0) -> tuple[float, float]:
    """The best n-cube matmul over n = 512, 1024, ... and `repeats` runs of each: its TFLOP per
    wall second, and per CPU second of this process (see `--peak` in the module doc).

    n goes up to 4096 on CPU and 8192 on CUDA, or stops where one matmul of the next size would
    take more than about `seconds`: a CPU without native bf16 (AVX2 only) runs a bf16 matmul about
    100 times slower than an fp32 one (1024-cube: 2.8 s against 0.022 s on an AMD EPYC), and a
    4096-cube took minutes there. The best over all sizes, not the largest size's: on a shared
    CPU the 2048- and 4096-cubes have each come out below the 1024-cube's rate (0.100 and 0.107
    against 0.124 TFLOP/s in one process), and a peak that comes out low flatters the fraction.
    """
    top = 8192 if device.type == "cuda" else 4096
    best_wall = best_cpu = 0.0
    n = 512
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm up the library (AMX tile configuration, cuBLAS handles)
        runs = []
        for _ in range(repeats):
            clock = Clock(device)
            torch.mm(a, b)
            runs.append(clock.stop())
        fastest = min(run.wall for run in runs)
        if 2 * n**3 / fastest / 1e12 > best_wall:
            # the CPU-time rate of that size over all its runs: one short run's CPU time can miss
            # a thread's share (a 512-cube read 1.0 CPU second per wall second on 2 threads)
            best_wall = 2 * n**3 / fastest / 1e12
            best_cpu = 2 * n**3 * repeats / max(sum(run.cpu for run in runs), 1e-9) / 1e12
        if n >= top or fastest * 8 > seconds:  # the next size: 8 times the work
            return best_wall, best_cpu
        n *= 2


def autocast_for(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[dtype])


def train_step(model: VDVAE, images: torch.Tensor, device: torch.device, dtype: str) -> torch.Tensor:
    with autocast_for(device, dtype):
        loss = model(images).elbo
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def alternating_steps(model: VDVAE, images: torch.Tensor, device: torch.device, dtype: str,
                      variants: dict[str, Callable[[], object]], steps: int) -> dict:
    """Two variants of one model's training step, alternating in one process: `variants[name]()`
    switches the model to that variant. After one warm-up step each (whose gradients are compared),
    `steps` steps each; returns each variant's median step seconds, the median of the paired ratios
    (the first variant's time over the second's) and the largest relative gradient difference."""
    first, second = variants

    def step(name: str) -> tuple[float, list[torch.Tensor]]:
        variants[name]()
        torch.manual_seed(1)  # the same latent noise each way
        clock = Clock(device)
        with autocast_for(device, dtype):
            loss = model(images).elbo
        loss.backward()
        wall = clock.stop().wall
        grads = [p.grad for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return wall, grads

    grads = {name: step(name)[1] for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(steps):
        for name in variants:
            times[name].append(step(name)[0])
    return {
        f"{first}_step_s": round(statistics.median(times[first]), 3),
        f"{second}_step_s": round(statistics.median(times[second]), 3),
        f"paired_{first}_over_{second}": round(statistics.median(a / b for a, b in zip(times[first], times[second])), 4),
        "max_rel_grad_diff": max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
                                 for a, b in zip(grads[first], grads[second])),
        "threads": torch.get_num_threads(),
    }


def timed_step(model: VDVAE, images: torch.Tensor, device: torch.device, dtype: str) -> Interval:
    clock = Clock(device)
    loss = train_step(model, images, device, dtype)
    spent = clock.stop()
    if not torch.isfinite(loss):
        raise SystemExit(f"non-finite loss {loss.item()}")
    return spent


def random_images(batch: int, size: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)


def count_flops(model: VDVAE, images: torch.Tensor, device: torch.device, dtype: str) -> int:
    """FLOPs of one forward + backward (matmuls and convolutions, as torch counts them)."""
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, images, device, dtype)
    return counter.get_total_flops()


# The ops that do a step's FLOPs (as the flop counter counts them), eager or called by inductor.
_MATMUL_CONV_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::mkldnn_convolution", "aten::convolution_backward",
    "aten::cudnn_convolution", "aten::cudnn_convolution_transpose",
})


def profile_step(model: VDVAE, images: torch.Tensor, device: torch.device, dtype: str, rows: int) -> float:
    """Print the top `rows` ops of one step (by self time) to stderr; return the share of that
    step's wall time that its matmuls and convolutions took (self time: their own kernels)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        clock = Clock(device)
        train_step(model, images, device, dtype)
        wall = clock.stop().wall
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages()
    print(table.table(sort_by=key, row_limit=rows), file=sys.stderr)
    return sum(getattr(op, key) for op in table if op.key in _MATMUL_CONV_OPS) / 1e6 / wall


def fits(model: VDVAE, batch: int, image_size: int, device: torch.device, dtype: str) -> bool:
    """Whether one training step of `batch` images runs without running out of device memory."""
    try:
        train_step(model, random_images(batch, image_size, device), device, dtype)
        synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def max_batch(model: VDVAE, image_size: int, device: torch.device, dtype: str, start: int) -> int:
    """The largest batch that fits: doubling from `start` until one does not, then bisecting."""
    if not fits(model, start, image_size, device, dtype):
        low, high = 0, start
    else:
        low = start
        while fits(model, 2 * low, image_size, device, dtype):
            low *= 2
        high = 2 * low
    while high - low > 1:  # low fits, high does not
        mid = (low + high) // 2
        low, high = (mid, high) if fits(model, mid, image_size, device, dtype) else (low, mid)
    return low


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--checkpointing", default="none", help="none, all, or a resolution in px")
    parser.add_argument("--reentrant", action="store_true", help="reentrant activation checkpointing")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="fp32",
                        help="fp32, or bf16/fp16 autocast (fp16 on CUDA only)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allocator", choices=["tcmalloc", "system"], default="tcmalloc")
    parser.add_argument("--peak", action="store_true", help="matmul peaks, FLOPs per step, fraction of peak")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks (VDVAE.compile_blocks)")
    parser.add_argument("--compile-mode", choices=["default", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="with --compile: torch.compile's mode (default: torch's default)")
    parser.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matmuls and convolutions")
    parser.add_argument("--max-batch", action="store_true", help="CUDA: search the largest batch that fits")
    parser.add_argument("--max-other-load", type=float, default=None, metavar="F",
                        help="repeat a timed step during which other processes used more than this share "
                             "of the CPUs (0-1), at most --max-discarded times")
    parser.add_argument("--max-discarded", type=int, default=20)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the top N ops of one step to stderr")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.dtype == "fp16" and args.device == "cpu":
        parser.error("--dtype fp16 runs on CUDA only (on CPU, use bf16)")
    if args.max_batch and args.device != "cuda":
        parser.error("--max-batch needs --device cuda (on CPU, memory is the process's RSS)")
    if args.compile_mode and not args.compile:
        parser.error("--compile-mode needs --compile")
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1: the first step compiles")
    return args


def main() -> None:
    args = parse_args()
    if args.allocator == "tcmalloc":
        reexec_with_fast_allocator()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32

    torch.manual_seed(args.seed)
    cfg = get_preset(args.preset).model
    model = VDVAE(cfg).to(device)
    model.set_activation_checkpointing(args.checkpointing, use_reentrant=args.reentrant)
    images = random_images(args.batch, cfg.image_size, device)
    result: dict = {}
    peak_dtypes = [name for name in _DTYPES if name != "fp16" or device.type == "cuda"]
    if args.peak:  # counted eagerly, before any compilation: the same operations either way
        result["flops_per_step"] = count_flops(model, images, device, args.dtype)
        peaks = {name: matmul_peak(device, _DTYPES[name]) for name in peak_dtypes}
    if args.compile:
        model.compile_blocks(**({"mode": args.compile_mode} if args.compile_mode else {}))

    for step in range(args.warmup):
        spent = timed_step(model, images, device, args.dtype)
        if step == 0 and args.compile:
            result["compile_s"] = round(spent.wall, 3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, discarded = [], 0
    while len(steps) < args.steps:
        spent = timed_step(model, images, device, args.dtype)
        if args.max_other_load is not None and spent.other_load > args.max_other_load \
                and discarded < args.max_discarded:
            discarded += 1
            continue
        steps.append(spent)
    median = statistics.median(s.wall for s in steps)
    result.update({"median_step_s": round(median, 3), "min_step_s": round(min(s.wall for s in steps), 3),
                   "other_load_median": round(statistics.median(s.other_load for s in steps), 3),
                   "discarded_steps": discarded})

    if device.type == "cuda":
        result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if args.peak:
        # measured before and after the steps, the best kept: a busy moment lowers a peak
        peaks = {name: tuple(map(max, peaks[name], matmul_peak(device, _DTYPES[name]))) for name in peak_dtypes}
        flops = result["flops_per_step"]
        achieved = flops / median / 1e12
        cpu_median = statistics.median(s.cpu for s in steps)
        result.update({
            "achieved_tflops": round(achieved, 4),
            **{f"peak_tflops_{name}": round(wall, 4) for name, (wall, _) in peaks.items()},
            "fraction_of_peak": round(achieved / peaks[args.dtype][0], 4),
            "fraction_of_peak_cpu_time": round(flops / cpu_median / 1e12 / peaks[args.dtype][1], 4),
        })
    if args.profile:
        share = profile_step(model, images, device, args.dtype, args.profile)
        result["matmul_conv_share"] = round(share, 4)
        if args.peak:  # the fraction the step would reach if all its other work took no time
            result["matmul_conv_fraction_of_peak"] = round(result["fraction_of_peak"] / share, 4)
    if args.max_batch:
        result["max_batch"] = max_batch(model, cfg.image_size, device, args.dtype, args.batch)

    print(json.dumps({
        "preset": args.preset,
        "batch": args.batch,
        "checkpointing": args.checkpointing,
        "dtype": args.dtype,
        "device": args.device,
        "device_name": device_name(device),
        "compile": args.compile,
        "conv1x1_form": conv1x1_form(device.type),
        **({"compile_mode": args.compile_mode} if args.compile_mode else {}),
        "steps": args.steps,
        **result,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "allocator": active_allocator(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
