"""The model's 3x3 convolution (channels last, fp32), forward and each half of its backward, timed
apart: where a CPU's convolution time goes. Also the weight gradient as one matmul over im2col
patches, as a candidate replacement for oneDNN's.

    python tests/benchmarks/conv_backward.py

Prints one JSON line per shape (batch, channels, side): best of 5 in milliseconds, the forward's
TFLOP/s, and the largest difference between the two weight gradients (fp32 rounding).
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

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


def main() -> None:
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
        }), flush=True)


if __name__ == "__main__":
    main()
