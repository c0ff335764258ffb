"""The model's 3x3 convolution (channels last, fp32), forward and each half of its backward, timed
apart: where a CPU's convolution time goes. Also two candidate replacements for oneDNN's weight
gradient: one matmul over im2col patches, and nine matmuls over shifted rows of the padded input
(no patch copy).

    python tests/benchmarks/conv_backward.py
    python tests/benchmarks/conv_backward.py --model-steps 12

Prints one JSON line per shape (batch, channels, side): best of 5 in milliseconds, the forward's
TFLOP/s, and each candidate's largest difference from oneDNN's weight gradient (fp32 rounding).

--model-steps N instead times the whole cifar10 batch-8 fp32 training step (with tcmalloc, as
model_step.py does), N times each way, alternating in one process: the model's 3x3 convolutions
with oneDNN's backward, and with a backward whose weight gradient is `shifted_weight_grad` (where
a conv has at least 8192 pixel rows; oneDNN's input gradient either way). It prints the medians,
the median of the paired ratios (oneDNN's time over the candidate's) and the largest relative
gradient difference (model_step.alternating_steps). A kernel that wins alone can lose inside the model, whose activations are
not in cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model import VDVAE, get_preset  # noqa: E402
from pipeline.runtime import active_allocator, reexec_with_fast_allocator  # noqa: E402
from model_step import alternating_steps  # noqa: E402  (this folder)

SHAPES = ((8, 96, 32), (8, 96, 16))  # cifar10 at batch 8: the blocks' 3x3 convs at 32 and 16 px


def best_ms(fn, repeats: int = 5) -> float:
    fn()  # oneDNN builds its primitive on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: list[bool]):
    """aten's convolution backward (stride 1, padding 1) for the gradients `mask` asks for:
    [input, weight, bias]."""
    bias_sizes = [weight.shape[0]] if mask[2] else None
    return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, [1, 1], [1, 1], [1, 1], False,
                                               [0, 0], 1, mask)


def im2col_weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 3x3 weight gradient as one matmul: grad rows (N*H*W, Cout) against the input's patches
    (N*H*W, 9*Cin), both read from channels-last storage."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (N, H+2, W+2, C)
    patches = padded.unfold(1, 3, 1).unfold(2, 3, 1)  # (N, H, W, C, 3, 3)
    patches = patches.permute(0, 1, 2, 4, 5, 3).reshape(n * h * w, 9 * c)
    rows = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
    return (rows.t() @ patches).view(-1, 3, 3, c).permute(0, 3, 1, 2)


def shifted_weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 3x3 weight gradient as nine matmuls, one per kernel tap, with no patch copy.

    In the padded input's (N*(H+2)*(W+2), Cin) rows, the input pixel that tap (dy, dx) pairs with
    output pixel r sits at row r + dy*(W+2) + dx, so each tap is `grad_rows.T @ input_rows[o:o+L]`
    over contiguous slices, with grad padded into the same frame (its padding rows are zero, so rows
    that wrap past an image's edge add nothing).
    """
    n, c, h, w = x.shape
    rows_in = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).reshape(-1, c)
    rows_grad = F.pad(grad, (0, 2, 0, 2)).permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
    length = rows_in.shape[0] - 2 * (w + 2) - 2  # the last output pixel's row, plus one
    out = torch.empty(3, 3, grad.shape[1], c)
    for dy in range(3):
        for dx in range(3):
            offset = dy * (w + 2) + dx
            torch.mm(rows_grad[:length].t(), rows_in[offset:offset + length], out=out[dy, dx])
    return out.permute(2, 3, 0, 1)


class _ShiftedConv3x3(torch.autograd.Function):
    """A 3x3 convolution (stride 1, padding 1): oneDNN's forward and input gradient, the weight
    gradient from `shifted_weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_input = conv_backward(grad, x, weight, [True, False, False])[0] if ctx.needs_input_grad[0] else None
        return grad_input, shifted_weight_grad(grad, x), grad.sum((0, 2, 3))


def model_side_by_side(steps: int) -> dict:
    stock_forward = nn.Conv2d.forward
    use_candidate = False

    def forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if use_candidate and conv.kernel_size == (3, 3) and x.shape[0] * x.shape[2] * x.shape[3] >= 8192:
            return _ShiftedConv3x3.apply(x, conv.weight, conv.bias)
        return stock_forward(conv, x)

    def choose(candidate: bool) -> None:
        nonlocal use_candidate
        use_candidate = candidate  # read by the patched forward

    torch.manual_seed(0)
    model = VDVAE(get_preset("cifar10").model)
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    nn.Conv2d.forward = forward
    try:
        return alternating_steps(model, images, torch.device("cpu"), "fp32",
                                 {"onednn": lambda: choose(False), "shifted": lambda: choose(True)}, steps)
    finally:
        nn.Conv2d.forward = stock_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-steps", type=int, default=0, metavar="N",
                        help="time the cifar10 b8 step N times each way instead of single convolutions")
    args = parser.parse_args()
    if args.model_steps:
        reexec_with_fast_allocator()  # the pipeline's allocator, as model_step.py runs it
        print(json.dumps({**model_side_by_side(args.model_steps), "allocator": active_allocator()}), flush=True)
        return
    torch.manual_seed(0)
    for n, c, side in SHAPES:
        x = torch.randn(n, c, side, side).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c, c, 3, 3).contiguous(memory_format=torch.channels_last)
        bias = torch.zeros(c)
        grad = torch.randn_like(F.conv2d(x, weight, bias, padding=1)).contiguous(memory_format=torch.channels_last)
        flops = 2 * n * side * side * c * c * 9
        forward = best_ms(lambda: F.conv2d(x, weight, bias, padding=1))
        reference = conv_backward(grad, x, weight, [False, True, False])[1]
        print(json.dumps({
            "shape": [n, c, side],
            "forward_ms": round(forward, 2),
            "forward_tflops": round(flops / forward / 1e9, 4),
            "backward_all_ms": round(best_ms(lambda: conv_backward(grad, x, weight, [True, True, True])), 2),
            "backward_input_ms": round(best_ms(lambda: conv_backward(grad, x, weight, [True, False, False])), 2),
            "backward_weight_bias_ms": round(best_ms(lambda: conv_backward(grad, x, weight, [False, True, True])), 2),
            "im2col_weight_ms": round(best_ms(lambda: im2col_weight_grad(grad, x)), 2),
            "im2col_max_abs_diff": float((im2col_weight_grad(grad, x) - reference).abs().max()),
            "shifted_weight_ms": round(best_ms(lambda: shifted_weight_grad(grad, x)), 2),
            "shifted_max_abs_diff": float((shifted_weight_grad(grad, x) - reference).abs().max()),
        }), flush=True)


if __name__ == "__main__":
    main()
