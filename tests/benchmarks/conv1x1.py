"""The model's 1x1 convs in their two forms, side by side in one process: which is faster here.

    python tests/benchmarks/conv1x1.py [--device cuda]
    python tests/benchmarks/conv1x1.py --model-steps 8 --dtype bf16

The model computes a 1x1 conv either as one matmul over the pixel rows of its
channels-last activations or as a 1x1 convolution (oneDNN's on a CPU, cuDNN's on
a GPU), by machine
(`model.vdvae.conv1x1_form`). Without --model-steps, this times forward +
backward of each cifar10 batch-8 1x1 shape at 32 px both ways (median of
--repeats, after warm-up), in fp32 and bf16, and prints one JSON line per
shape: each form's milliseconds and TFLOP/s, and matmul / conv (above 1: the
convolution is faster). The posterior's first conv (768 -> 96) is timed as
the model runs it: split by input halves. On CUDA the timings are
synchronised and TF32 is off for both forms (cuDNN's convolutions would
otherwise use it and the matmuls not), so fp32 compares like with like.

--model-steps N times the whole cifar10 batch-8 training step (with tcmalloc, as
model_step.py does) N times in each form, alternating in one process, and
prints the medians, the median of the paired ratios (matmul / conv) and the
largest relative difference between the two forms' gradients
(model_step.alternating_steps).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model import VDVAE, get_preset  # noqa: E402
from model.vdvae import CONV1X1_FORMS, _Conv1x1, _SplitInputConv, conv1x1_form, set_conv1x1_form  # noqa: E402
from pipeline.runtime import active_allocator, reexec_with_fast_allocator  # noqa: E402
from model_step import alternating_steps, synchronize  # noqa: E402  (this folder)

# (in, out) at 32 px: a block's first and last conv, the prior's last (2*zdim + width),
# z_proj, the output head (10 * mixtures); (768, 96) is the posterior's split first conv
SHAPES = ((384, 96), (96, 384), (96, 416), (16, 384), (384, 100), (768, 96))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def median_ms(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):  # oneDNN builds its primitive on the first call, cuDNN picks its kernel
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def single_convs(dtype: torch.dtype, device: torch.device, repeats: int) -> None:
    torch.manual_seed(0)
    machine_form = conv1x1_form(device.type)
    try:
        for c_in, c_out in SHAPES:
            print(json.dumps(single_conv(c_in, c_out, dtype, device, repeats, machine_form)), flush=True)
    finally:
        set_conv1x1_form(None)


def single_conv(c_in: int, c_out: int, dtype: torch.dtype, device: torch.device, repeats: int,
                machine_form: str) -> dict:
    """One shape, both forms: the JSON line."""
    split = c_in == 768
    conv = (_SplitInputConv if split else _Conv1x1)(c_in, c_out, 1).to(device, dtype)
    inputs = [torch.randn(8, c_in // 2 if split else c_in, 32, 32, dtype=dtype, device=device)
              .contiguous(memory_format=torch.channels_last).requires_grad_() for _ in range(2 if split else 1)]
    grad = torch.randn(8, c_out, 32, 32, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    flops = 3 * 2 * 8 * 32 * 32 * c_in * c_out  # forward, input gradient, weight gradient
    line: dict = {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "in": c_in, "out": c_out,
                  "split_input": split, "machine_form": machine_form}
    for form in CONV1X1_FORMS:
        set_conv1x1_form(form)
        ms = median_ms(lambda: conv(*inputs).backward(grad), device, repeats)
        line[f"{form}_ms"] = round(ms, 2)
        line[f"{form}_tflops"] = round(flops / ms / 1e9, 4)
    line["matmul_over_conv"] = round(line["matmul_ms"] / line["conv_ms"], 3)
    return line


def model_side_by_side(steps: int, dtype: str) -> dict:
    torch.manual_seed(0)
    model = VDVAE(get_preset("cifar10").model)
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    try:
        result = alternating_steps(model, images, torch.device("cpu"), dtype,
                                   {form: functools.partial(set_conv1x1_form, form) for form in CONV1X1_FORMS},
                                   steps)
    finally:
        set_conv1x1_form(None)
    return {"dtype": dtype, **result, "this_machine_uses": conv1x1_form("cpu")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-steps", type=int, default=0, metavar="N",
                        help="time the cifar10 b8 step N times in each form instead of single convs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="fp32 or bf16 autocast (default: both for single convs, fp32 for --model-steps)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="single convs only (default cpu)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per form and shape (default 15)")
    args = parser.parse_args()
    if args.model_steps < 0 or args.repeats < 1:
        parser.error("--model-steps must be at least 0 and --repeats at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.model_steps and args.device != "cpu":
        parser.error("--model-steps times the step on the CPU; on a GPU use model_step.py")
    if args.model_steps:
        reexec_with_fast_allocator()  # the pipeline's allocator, as model_step.py runs it
        result = model_side_by_side(args.model_steps, args.dtype or "fp32")
        print(json.dumps({**result, "allocator": active_allocator()}), flush=True)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for name in [args.dtype] if args.dtype else list(DTYPES):
        single_convs(DTYPES[name], device, args.repeats)


if __name__ == "__main__":
    main()
