r"""Time the official openai/vdvae model's training step (forward + backward) on one device.

    python tests/gpu/official_step.py --official-src PATH/TO/openai-vdvae --preset cifar10 --batch 16 \
        --dtype fp32 --device cuda --steps 10 --warmup 3

PATH/TO/openai-vdvae holds the official `vae.py` and `vae_helpers.py` (a checkout of
https://github.com/openai/vdvae; nothing of it is part of this project). The official VAE is built
from the preset's hyperparameters and fed random uint8 images preprocessed as the official data.py
does (both as tests/benchmarks/official_compare.py does), then `--warmup` untimed and `--steps` timed
steps run. It prints one JSON line in the form of tests/benchmarks/model_step.py's: the median and
fastest step seconds, the peak memory, and what ran, so that the two give a side-by-side ratio (the
GPU check, tests/gpu/check.py, computes it).

--dtype bf16 or fp16 runs the forward under torch.autocast, which the official code does not do
itself (it trains in fp32): for the ratio against our bf16 step. On CUDA, timings are synchronised,
`peak_cuda_gb` is the allocator's peak over the timed steps, and TF32 is off unless --tf32, as in
model_step.py. A non-finite loss is reported (`finite_loss`), not an error: the official model was
not made for bf16, and the time of its step is what is measured here.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

from official_compare import official_hps, official_preprocess  # noqa: E402
from pipeline.runtime import active_allocator, reexec_with_fast_allocator  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
               dtype: str) -> torch.Tensor:
    autocast = (contextlib.nullcontext() if dtype == "fp32" else torch.autocast(device.type, dtype=DTYPES[dtype]))
    with autocast:
        loss = model(inputs, targets)["elbo"]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-src", required=True, type=Path,
                        help="a folder with openai/vdvae's vae.py and vae_helpers.py")
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="fp32, or the forward under bf16/fp16 autocast (fp16 on CUDA only)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matmuls and convolutions")
    parser.add_argument("--allocator", choices=["tcmalloc", "system"], default="tcmalloc",
                        help="as model_step.py: the allocator of the pipeline's compute processes, or malloc")
    args = parser.parse_args()
    if not (args.official_src / "vae.py").is_file() or not (args.official_src / "vae_helpers.py").is_file():
        parser.error(f"--official-src {args.official_src}: vae.py and vae_helpers.py of openai/vdvae expected there")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.dtype == "fp16" and args.device == "cpu":
        parser.error("--dtype fp16 runs on CUDA only (on CPU, use bf16)")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.allocator == "tcmalloc":
        reexec_with_fast_allocator()
    sys.path.insert(0, str(args.official_src.resolve()))
    import vae as official  # noqa: E402  (from --official-src, known only now)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    hps = official_hps(args.preset)
    model = official.VAE(hps).to(device)
    images = torch.randint(0, 256, (args.batch, hps.image_size, hps.image_size, 3), dtype=torch.uint8)
    inputs, targets = (t.to(device) for t in official_preprocess(images, args.preset))

    times, finite = [], True
    for step in range(args.warmup + args.steps):
        synchronize(device)
        if step == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        loss = train_step(model, inputs, targets, device, args.dtype)
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        finite = finite and bool(torch.isfinite(loss))

    result = {
        "model": "official openai/vdvae",
        "preset": args.preset,
        "batch": args.batch,
        "dtype": args.dtype,
        "device": args.device,
        "device_name": device_name(device),
        "steps": args.steps,
        "median_step_s": round(statistics.median(times), 4),
        "min_step_s": round(min(times), 4),
        "finite_loss": finite,
        "params": sum(p.numel() for p in model.parameters()),
        "tf32": args.tf32 if device.type == "cuda" else None,
    }
    if device.type == "cuda":
        result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    result.update({
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "allocator": active_allocator(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
