"""`vdvae demo`: the model learning real photographs, on a laptop-sized CPU budget."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from model import VDVAE, ModelConfig, get_preset

from .images import make_grid, save_png
from .weights import save_weights

# A 32 px VDVAE with cifar10's normalisation and every kind of block the
# paper's presets use, small enough to train for a minute on two cores.
DEMO_MODEL = ModelConfig(
    image_size=32,
    width=64,
    enc_blocks="32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x1",
    dec_blocks="1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2",
    num_mixtures=5,
    input_shift=get_preset("cifar10").model.input_shift,
    input_scale=get_preset("cifar10").model.input_scale,
)


def photo_patches(num: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random size x size crops of the two photographs shipped with scikit-learn, uint8 NHWC."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as err:  # pragma: no cover - installed by scripts/setup.sh
        raise SystemExit("the demo needs scikit-learn's sample photographs: pip install scikit-learn") from err
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((num, size, size, 3), dtype=np.uint8)
    for i in range(num):
        photo = photos[i % len(photos)]
        y = rng.integers(0, photo.shape[0] - size)
        x = rng.integers(0, photo.shape[1] - size)
        out[i] = photo[y:y + size, x:x + size]
    return torch.from_numpy(out)


def run_demo(out_dir: Path, steps: int = 60, batch: int = 16, seed: int = 0) -> int:
    torch.manual_seed(seed)
    data = photo_patches(1024, DEMO_MODEL.image_size, seed)
    model = VDVAE(DEMO_MODEL)
    n = sum(p.numel() for p in model.parameters())
    print(f"demo: {n:,}-parameter VDVAE on {len(data)} 32 px patches of real photographs, "
          f"{steps} steps of batch {batch}, bf16 autocast on {torch.get_num_threads()} threads")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.9), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data), (batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = model(data[idx])
        opt.zero_grad(set_to_none=True)
        terms.elbo.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 200.0)
        opt.step()
        sched.step()
        if step == 1 or step % 10 == 0 or step == steps:
            print(f"step {step:4d}  elbo {terms.elbo.item():.3f} nats/dim  "
                  f"({terms.bpd.item():.3f} bits/dim)  distortion {terms.distortion.item():.3f}  "
                  f"rate {terms.rate.item():.3f}  {time.perf_counter() - start:.1f}s")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    originals = data[:8]
    rows = [originals]
    rows += [model.sample_from_latents(originals, k, generator=gen) for k in (2, 6)]
    rows += [model.sample(8, t, generator=gen) for t in (1.0, 0.8)]
    grid = save_png(make_grid(rows), out_dir / "samples.png")
    weights = save_weights(model, out_dir / "weights.pt")
    print(f"demo: wrote {grid} (rows: originals; keeping 2 and 6 latent groups; samples at t=1.0, 0.8)")
    print(f"demo: wrote {weights} ({math.ceil(weights.stat().st_size / 2**20)} MiB)")
    print("next: `vdvae presets` lists the paper's configurations; "
          "`vdvae import-official` converts the released checkpoints")
    return 0
