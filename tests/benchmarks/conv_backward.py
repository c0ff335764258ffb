"""The model's 3x3 convolution (channels last, fp32), forward and each half of its backward, timed
apart: where a CPU's convolution time goes. Also the weight gradient as one matmul over im2col
patches, as a candidate replacement for oneDNN's.

    python tests/benchmarks/conv_backward.py

Prints one line per shape (batch, channels, side): best of 5, milliseconds, and the largest
difference between the two weight gradients (fp32 rounding).
"""
import time

import torch
import torch.nn.functional as F

torch.manual_seed(0)
def bench(fn, n=5):
    fn(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return min(ts)
for (N,C,H) in [(8,96,32),(8,96,16)]:
    x = torch.randn(N,C,H,H).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(C,C,3,3).contiguous(memory_format=torch.channels_last)
    b = torch.zeros(C)
    y = F.conv2d(x,w,b,padding=1)
    g = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    flops = 2*N*H*H*C*C*9
    fwd = bench(lambda: F.conv2d(x,w,b,padding=1))
    bwd_all = bench(lambda: torch.ops.aten.convolution_backward(g, x, w, [C], [1,1],[1,1],[1,1],False,[0,0],1,[True,True,True]))
    bwd_in = bench(lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1,1],[1,1],[1,1],False,[0,0],1,[True,False,False]))
    bwd_w = bench(lambda: torch.ops.aten.convolution_backward(g, x, w, [C], [1,1],[1,1],[1,1],False,[0,0],1,[False,True,True]))
    def unfold_w():
        # im2col in NHWC: patches (N*H*W, 9*C) with (kh,kw,c) order
        xp = F.pad(x.detach(), (1,1,1,1))  # NCHW logical, channels_last storage
        xp = xp.permute(0,2,3,1)  # N,H+2,W+2,C
        cols = xp.unfold(1,3,1).unfold(2,3,1)  # N,H,W,C,3,3
        cols = cols.permute(0,1,2,4,5,3).reshape(N*H*H, 9*C)
        go = g.permute(0,2,3,1).reshape(-1, C)
        gw = go.t() @ cols  # C, 9C
        return gw.view(C,3,3,C).permute(0,3,1,2), go.sum(0)
    uw = bench(unfold_w)
    ref = torch.ops.aten.convolution_backward(g, x, w, [C], [1,1],[1,1],[1,1],False,[0,0],1,[False,True,True])[1]
    print((N,C,H), f"fwd {fwd*1e3:.1f}ms ({flops/fwd/1e12:.3f}TF) bwd_all {bwd_all*1e3:.1f} bwd_in {bwd_in*1e3:.1f} bwd_w {bwd_w*1e3:.1f} unfold_w {uw*1e3:.1f}  maxdiff {(unfold_w()[0]-ref).abs().max().item():.2e}")
