"""Evaluation and sampling: bits/dim over a split (every image once across ranks), sample grids.

Both draw their latent noise from their own random stream, so evaluating
or sampling in the middle of training never changes the training after it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from model import get_preset

from .images import make_grid
from .metrics import reduce_by_name
from .stream import ShardStream


@dataclass(frozen=True)
class EvalResult:
    elbo: float
    """Mean per-image ELBO, nats per dimension."""
    images: int
    unreadable: int

    @property
    def bpd(self) -> float:
        return self.elbo / math.log(2)


def _devices(device: torch.device) -> list[int]:
    return [torch.cuda.current_device()] if device.type == "cuda" else []


@torch.no_grad()
def evaluate(model, stream: ShardStream, device: torch.device, seed: int) -> EvalResult:
    """The ELBO of `model` (a VDVAE or an engine wrapping one) over this rank's share of `stream`,
    summed over every rank (a collective when a process group runs)."""
    totals = {"elbo_sum": 0.0, "images": 0.0, "unreadable": 0.0}
    with torch.random.fork_rng(devices=_devices(device)):
        torch.manual_seed(seed)
        for batch in stream:
            batch = batch.to(device)
            per_image = model(batch.images).per_image_elbo.double()
            valid = batch.valid
            totals["elbo_sum"] += float((per_image * valid).sum())
            totals["images"] += float(valid.sum())
            totals["unreadable"] += batch.skipped
    totals = reduce_by_name(totals, device=device if device.type == "cuda" else "cpu")
    return EvalResult(totals["elbo_sum"] / max(totals["images"], 1), int(totals["images"]),
                      int(totals["unreadable"]))


@torch.no_grad()
def sample_grids(model, preset: str, originals: torch.Tensor, device: torch.device,
                 seed: int, ema=None) -> dict[str, np.ndarray]:
    """Sample grids at the preset's temperatures and, for the `originals`, samples that keep their
    first k latent groups (the official visualisation); uint8 (H, W, 3) grids by name. Every rank
    takes part (ZeRO-3 gathers parameters)."""
    paper = get_preset(preset).training
    groups = model.config.num_latent_groups
    keep = sorted({int(k) for k in np.floor(np.linspace(0, 1, paper.num_variables_visualize + 2) * groups)[1:-1]})
    n = len(originals)
    with torch.random.fork_rng(devices=_devices(device)), (ema.swapped() if ema is not None else nullcontext()):
        torch.manual_seed(seed)
        samples = [model.sample(n, t) for t in paper.sample_temperatures]
        latents = [originals] + [model.sample_from_latents(originals, k) for k in keep]
    return {"samples": make_grid(samples), "reconstructions": make_grid(latents)}


def samples_per_grid_row(resolution: int) -> int:
    return 8 if resolution <= 64 else 4 if resolution <= 256 else 2
