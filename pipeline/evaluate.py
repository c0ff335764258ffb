"""Evaluation and sampling: bits/dim over a split (every image once across ranks), sample grids.

All draw their latent noise from their own random streams, so evaluating
or sampling in the middle of training never changes the training after it.
The importance-weighted bound seeds each image's draws by (seed, the
image's key, the draw), so its result does not depend on the ranks, the
batch or the chunk size.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from model import get_preset

from .images import make_grid
from .latents import group_name
from .metrics import reduce_by_name
from .stream import ShardStream


@dataclass(frozen=True)
class EvalResult:
    elbo: float
    """Mean per-image ELBO, nats per dimension."""
    images: int
    unreadable: int
    per_group_rate: tuple[float, ...] | None = None
    """With `evaluate(..., per_group=True)`: each latent group's mean KL over the images, nats per
    dimension, top-down (the decoder blocks' order); they sum to the mean rate."""

    @property
    def bpd(self) -> float:
        return self.elbo / math.log(2)


def _devices(device: torch.device) -> list[int]:
    return [torch.cuda.current_device()] if device.type == "cuda" else []


@contextmanager
def _decoder_kls(model, on: bool):
    """A list that each forward of the model's decoder appends its per-image KLs (groups, N) to, while on."""
    kls: list[torch.Tensor] = []
    hook = getattr(model, "module", model).decoder.register_forward_hook(
        lambda module, args, out: kls.append(out[1].detach())) if on else None
    try:
        yield kls
    finally:
        if hook is not None:
            hook.remove()


@torch.no_grad()
def evaluate(model, stream: ShardStream, device: torch.device, seed: int, per_group: bool = False) -> EvalResult:
    """The ELBO of `model` (a VDVAE or an engine wrapping one) over this rank's share of `stream`,
    summed over every rank (a collective when a process group runs).

    per_group: also each latent group's mean KL over the valid images (`EvalResult.per_group_rate`),
    taken from the per-image KLs that the decoder returns in the same forward pass (a hook on it):
    no second pass, so the ELBO and its random stream are the same as without it.
    """
    # summed on the device, read back once at the end
    elbo_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_images = torch.zeros((), dtype=torch.float64, device=device)
    unreadable, group_sum = 0, None
    with torch.random.fork_rng(devices=_devices(device)), _decoder_kls(model, per_group) as decoder_kls:
        torch.manual_seed(seed)
        for batch in stream:
            batch = batch.to(device)
            per_image = model(batch.images).per_image_elbo.double()
            valid = batch.valid.to(per_image.device)
            elbo_sum += (per_image * valid).sum()
            num_images += valid.sum()
            unreadable += batch.skipped
            if per_group:  # this batch's (groups, N) KL sums -> per dimension, valid rows summed, on the device
                kls = decoder_kls.pop().double() / batch.images[0].numel()
                kls = torch.where(valid.to(kls.device)[None], kls, torch.zeros_like(kls)).sum(1)
                group_sum = kls if group_sum is None else group_sum + kls
    totals = {"elbo_sum": float(elbo_sum), "images": float(num_images)}
    if per_group:
        num_groups = getattr(model, "module", model).config.num_latent_groups
        sums = group_sum.tolist() if group_sum is not None else [0.0] * num_groups
        totals |= {group_name(i): v for i, v in enumerate(sums)}
    totals = reduce_by_name(totals, device=device) | reduce_by_name({"unreadable": unreadable})
    images = max(totals["images"], 1)
    rates = tuple(totals[group_name(i)] / images for i in range(num_groups)) if per_group else None
    return EvalResult(totals["elbo_sum"] / images, int(totals["images"]), int(totals["unreadable"]), rates)


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


@dataclass(frozen=True)
class ImportanceResult:
    """The K-sample importance-weighted bound on a split: -log(1/K sum_k p(x, z_k) / q(z_k | x))."""

    k: int
    nll: float
    """Mean per-image bound, nats per dimension (an upper bound on the NLL, tighter as K grows)."""
    stderr: float
    """Standard error of `nll` over the images: std of the per-image values / sqrt(images)."""
    images: int
    unreadable: int
    seconds: float
    """Wall-clock seconds of the evaluation loops, summed over ranks (device-seconds)."""

    @property
    def bpd(self) -> float:
        return self.nll / math.log(2)

    @property
    def stderr_bpd(self) -> float:
        return self.stderr / math.log(2)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(self.images, 1)


def _draw_seed(seed: int, key: str, draw: int) -> int:
    """The seed of one image's draw: a hash of (seed, the sample's key, the draw's number)."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _draw_generators(seed: int, keys: list[str], first: int, count: int, device: torch.device) -> list[torch.Generator]:
    """Generators of draws first .. first + count - 1 of each key, image-major (the model's row order)."""
    gens = []
    for key in keys:
        for draw in range(first, first + count):
            gen = torch.Generator(device=device)
            gen.manual_seed(_draw_seed(seed, key, draw))
            gens.append(gen)
    return gens


def log_mean_exp_bound(model, images: torch.Tensor, keys: list[str], seed: int, k: int, chunk: int) -> torch.Tensor:
    """Per image (N,), float64 nats: log(1/K sum_k exp(w_k)), the K log weights drawn `chunk` at a time
    and folded into a running logsumexp (the decoder sees N * chunk rows at once)."""
    total = None
    for first in range(0, k, chunk):
        count = min(chunk, k - first)
        gens = _draw_generators(seed, keys, first, count, images.device)
        w = model.log_densities(images, count, gens).log_weight.double()
        part = torch.logsumexp(w, dim=1)
        total = part if total is None else torch.logaddexp(total, part)
    return total - math.log(k)


@torch.no_grad()
def importance_weighted(model, stream: ShardStream, device: torch.device, seed: int, k: int,
                        chunk: int | None = None) -> ImportanceResult:
    """The K-sample importance-weighted bound of `model` (a VDVAE or an engine wrapping one) on the
    split of `stream`, every valid image once across ranks (a collective when a process group runs).

    Each image's K posterior draws are seeded by (seed, its key, the draw), so the per-image values,
    and so the totals, are the same on any number of ranks, with any batch or `chunk` (draws per
    decoder pass, default all K; memory grows with batch * chunk). K=1 is one draw of the ELBO.
    """
    if k < 1:
        raise ValueError(f"importance samples K={k}: must be at least 1")
    chunk = k if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"importance chunk={chunk}: must be at least 1")
    vdvae = getattr(model, "module", model)
    totals = {"nll_sum": 0.0, "nll_sq_sum": 0.0, "images": 0.0, "unreadable": 0.0, "seconds": 0.0}
    start = time.perf_counter()
    for batch in stream:
        batch = batch.to(device)
        images = batch.images
        num_dims = images[0].numel()
        nll = -log_mean_exp_bound(vdvae, images, batch.keys, seed, k, chunk) / num_dims
        valid = batch.valid.to(nll.device)
        nll = torch.where(valid, nll, torch.zeros_like(nll))  # (a masked row is never summed, even as 0 * nan)
        totals["nll_sum"] += float(nll.sum())
        totals["nll_sq_sum"] += float((nll * nll).sum())
        totals["images"] += float(valid.sum())
        totals["unreadable"] += batch.skipped
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    totals["seconds"] = time.perf_counter() - start
    totals = reduce_by_name(totals, device=device if device.type == "cuda" else "cpu")
    n = totals["images"]
    mean = totals["nll_sum"] / max(n, 1)
    var = (totals["nll_sq_sum"] - n * mean * mean) / (n - 1) if n > 1 else math.nan
    return ImportanceResult(k, mean, math.sqrt(max(var, 0.0) / n) if n > 1 else math.nan, int(n),
                            int(totals["unreadable"]), totals["seconds"])


def samples_per_grid_row(resolution: int) -> int:
    return 8 if resolution <= 64 else 4 if resolution <= 256 else 2
