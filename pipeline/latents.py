"""Latent usage: how much information each latent group of a VDVAE carries, to catch a quiet collapse.

A VDVAE's rate is a sum of one KL term per decoder block ("latent group"),
in top-down order (lowest resolution first). `ElboTerms.per_group_rate`
gives each group's batch-mean KL in nats per image dimension; from a vector
of those (averaged over a logging window and over the ranks, or over a
whole split) this module derives:

- the rate per resolution: the sum over that resolution's groups, nats per
  image dimension (the resolutions' rates add up to `train/rate`);
- the number of active groups: groups whose mean KL exceeds
  `ACTIVE_NATS_PER_IMAGE` (below);
- the cumulative-information curve: the fraction of the total rate carried
  by the first k groups (the paper's figure of where the information sits);
- a heatmap of the groups (`LatentUsage.heatmap`) and the cumulative plot
  (`LatentUsage.cumulative_plot`), drawn with numpy and PIL.

TensorBoard names (`LatentUsage.scalars`, with the prefix the caller gives):
training reports `latents/rate_<res>px`, `latents/active_groups` and the
image `latents/usage` every `log_every` steps (the window's mean); the
evaluation pass reports the same for the valid split, with the EMA weights,
as `eval_latents/rate_<res>px`, `eval_latents/active_groups` and
`eval_latents/usage` (beside `eval/elbo`, the other numbers of that pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

ACTIVE_NATS_PER_IMAGE = 0.01
"""A group is active when its mean KL exceeds 0.01 nats per image, i.e. per_group_rate * H*W*C > 0.01.

The KL of a group, averaged over images, is what the ELBO pays for it and an
upper bound on the information it carries about the image given the groups
above it. 0.01 nats (0.014 bits) per image is less than a seventieth of a
bit: a group under it has a posterior that is its prior to within noise, and
the decoder cannot get anything from it. The threshold is per image, not
per dimension, so a 1 px group and a 256 px group are judged by the same
amount of information; it is the 0.01 of Burda et al.'s (2016) activity
measure, applied to the quantity the VDVAE reports per group (the KL)
rather than to the variance of each unit's posterior mean. Groups that do
carry information sit far above it (a trained VDVAE's active groups carry
from about a nat to thousands of nats per image), so the count is not
sensitive to the exact value.
"""

# The heatmap's colour scale, log10 nats per image: fixed, so images of different steps compare.
_LOG_KL_RANGE = (-3.0, 4.0)
# viridis, sampled at 0, 1/4, 1/2, 3/4, 1
_COLOURS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
SEPARATOR = (0, 0, 0)
"""The colour of the columns between resolutions in the heatmap."""
_BACKGROUND = (255, 255, 255)
_MARGIN, _SEP, _LABEL_H, _BAR_H, _LEGEND_H = 4, 2, 14, 28, 24


def group_name(index: int) -> str:
    """The name of group `index`'s rate where rates are reduced by name (`metrics.reduce_by_name`)."""
    return f"rate_group_{index:03d}"


def group_resolutions(config) -> list[int]:
    """The resolution of each latent group (decoder block) of a `ModelConfig`, top-down."""
    return [res for res, _ in config.decoder_layers]


def _runs(resolutions) -> list[tuple[int, int, int]]:
    """(resolution, first group, end) of each run of consecutive groups at one resolution."""
    runs: list[tuple[int, int, int]] = []
    for i, res in enumerate(resolutions):
        if runs and runs[-1][0] == res:
            runs[-1] = (res, runs[-1][1], i + 1)
        else:
            runs.append((res, i, i + 1))
    return runs


def colour_of(log_kl: np.ndarray) -> np.ndarray:
    """log10 nats per image -> uint8 RGB on the fixed scale (viridis), (..., 3)."""
    lo, hi = _LOG_KL_RANGE
    t = np.clip((np.nan_to_num(np.asarray(log_kl, dtype=np.float64), nan=lo) - lo) / (hi - lo), 0, 1)
    x = t * (len(_COLOURS) - 1)
    i = np.minimum(x.astype(int), len(_COLOURS) - 2)
    f = (x - i)[..., None]
    return np.round(_COLOURS[i] * (1 - f) + _COLOURS[i + 1] * f).astype(np.uint8)


def heatmap_columns(resolutions) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
    """The heatmap's layout: (cell width, [x0, x1) of each group, [x0, x1) of each separator)."""
    n = len(resolutions)
    cell = max(6, min(24, 360 // max(n, 1)))
    groups, separators = [], []
    x = _MARGIN
    for k, (_, first, end) in enumerate(_runs(resolutions)):
        if k:
            separators.append((x, x + _SEP))
            x += _SEP
        for _ in range(first, end):
            groups.append((x, x + cell))
            x += cell
    return cell, groups, separators


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def usage_heatmap(kl_per_image, resolutions, threshold: float = ACTIVE_NATS_PER_IMAGE) -> np.ndarray:
    """uint8 (H, W, 3): one cell per latent group, top-down from left to right, coloured by its KL
    (nats per image, log scale, fixed range 1e-3 .. 1e4); black columns between resolutions, each
    resolution's label above its groups; below, the colour scale with the activity threshold marked."""
    kl = np.asarray(kl_per_image, dtype=np.float64)
    _, groups, separators = heatmap_columns(resolutions)
    width = max((groups[-1][1] if groups else 0) + _MARGIN, 260)
    height = _LABEL_H + _BAR_H + _LEGEND_H + 2
    image = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    top, bottom = _LABEL_H, _LABEL_H + _BAR_H
    with np.errstate(divide="ignore", invalid="ignore"):
        log_kl = np.log10(np.maximum(kl, 0))
    colours = colour_of(log_kl)
    for (x0, x1), colour in zip(groups, colours, strict=True):
        image[top:bottom, x0:x1] = colour
        if x1 - x0 > 2:  # a hairline between neighbouring cells
            image[top:bottom, x1 - 1] = np.round(colour * 0.8).astype(np.uint8)
    for x0, x1 in separators:
        image[2:bottom, x0:x1] = SEPARATOR
    # the colour scale: left to right 1e-3 .. 1e4 nats per image
    lo, hi = _LOG_KL_RANGE
    bar_y0, bar_y1 = bottom + 4, bottom + 10
    bar_x0, bar_x1 = _MARGIN, width - _MARGIN
    xs = np.linspace(lo, hi, bar_x1 - bar_x0)
    image[bar_y0:bar_y1, bar_x0:bar_x1] = colour_of(xs)[None]
    t = float(np.clip((np.log10(threshold) - lo) / (hi - lo), 0, 1))
    tick = bar_x0 + round(t * (bar_x1 - bar_x0 - 1))
    image[bar_y0 - 2:bar_y1 + 2, tick] = (255, 0, 0)
    pil = Image.fromarray(image)
    draw, font = ImageDraw.Draw(pil), _font()
    for res, first, end in _runs(resolutions):
        x0, x1 = groups[first][0], groups[end - 1][1]
        label = f"{res}px"
        if _text_width(draw, label, font) <= x1 - x0 + _SEP:
            draw.text((x0 + 1, 1), label, fill=(0, 0, 0), font=font)
        elif _text_width(draw, str(res), font) <= x1 - x0 + _SEP:
            draw.text((x0 + 1, 1), str(res), fill=(0, 0, 0), font=font)
    draw.text((bar_x0, bar_y1 + 1), "1e-3", fill=(0, 0, 0), font=font)
    end_label = "1e4 nats/image; red: threshold"
    draw.text((bar_x1 - _text_width(draw, end_label, font), bar_y1 + 1), end_label, fill=(0, 0, 0), font=font)
    return np.asarray(pil)


def cumulative_fraction(rates) -> np.ndarray:
    """(G,): the fraction of the total rate carried by the first k+1 groups (zeros for a zero rate)."""
    rates = np.asarray(rates, dtype=np.float64)
    total = rates.sum()
    if not total > 0:
        return np.zeros_like(rates)
    return np.cumsum(rates) / total


def cumulative_plot(fractions, resolutions, size: tuple[int, int] = (720, 420)) -> np.ndarray:
    """The paper-style plot, uint8 (H, W, 3): cumulative fraction of the total rate against the latent
    group index (top-down), with a dashed line and a label where each resolution begins."""
    fractions = np.asarray(fractions, dtype=np.float64)
    width, height = size
    left, right, top, bottom = 56, 16, 44, 48
    pil = Image.new("RGB", size, _BACKGROUND)
    draw, font = ImageDraw.Draw(pil), _font()
    n = len(fractions)
    x0, x1, y0, y1 = left, width - right, top, height - bottom

    def px(i: float) -> float:  # group index (1-based count of groups kept) -> x
        return x0 + (i / max(n, 1)) * (x1 - x0)

    def py(f: float) -> float:
        return y1 - f * (y1 - y0)

    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([(x0, py(f)), (x1, py(f))], fill=(225, 225, 225))
        label = f"{f:.2f}"
        draw.text((x0 - 6 - _text_width(draw, label, font), py(f) - 6), label, fill=(0, 0, 0), font=font)
    previous_label_end = -1e9
    for res, first, _ in _runs(resolutions):
        x = px(first)
        for y in range(int(y0), int(y1), 8):  # dashed
            draw.line([(x, y), (x, min(y + 4, y1))], fill=(150, 150, 150))
        label = f"{res}px"
        if x + 2 > previous_label_end:
            draw.text((x + 2, y0 - 14), label, fill=(90, 90, 90), font=font)
            previous_label_end = x + 2 + _text_width(draw, label, font) + 4
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    points = [(px(0), py(0))] + [(px(i + 1), py(float(f))) for i, f in enumerate(fractions)]
    draw.line(points, fill=(31, 119, 180), width=2)
    for x, y in points[1:]:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
    for k in sorted({0, n} | {round(n * q) for q in (0.25, 0.5, 0.75)}):
        label = str(k)
        draw.line([(px(k), y1), (px(k), y1 + 4)], fill=(0, 0, 0))
        draw.text((px(k) - _text_width(draw, label, font) / 2, y1 + 6), label, fill=(0, 0, 0), font=font)
    xlabel = "latent groups kept, top-down (k)"
    draw.text(((x0 + x1 - _text_width(draw, xlabel, font)) / 2, y1 + 24), xlabel, fill=(0, 0, 0), font=font)
    draw.text((x0, 8), "cumulative fraction of the total KL (rate) in the first k groups", fill=(0, 0, 0),
              font=font)
    return np.asarray(pil)


@dataclass(frozen=True)
class LatentUsage:
    """Per-group rates of one model (nats per image dimension, top-down) and what they say."""

    rates: np.ndarray
    """(G,) mean KL of each group, nats per image dimension."""
    resolutions: tuple[int, ...]
    """(G,) resolution of each group, px."""
    dims_per_image: int
    """H * W * C of the model's images: nats per dimension times this is nats per image."""
    threshold: float = ACTIVE_NATS_PER_IMAGE

    @classmethod
    def of(cls, rates, config, threshold: float = ACTIVE_NATS_PER_IMAGE) -> LatentUsage:
        """From per-group rates and the model's `ModelConfig`."""
        rates = np.asarray(rates.detach().cpu() if isinstance(rates, torch.Tensor) else rates, dtype=np.float64)
        resolutions = tuple(group_resolutions(config))
        if rates.shape != (len(resolutions),):
            raise ValueError(f"got {rates.shape} per-group rates; the model has {len(resolutions)} latent groups")
        return cls(rates, resolutions, config.image_size ** 2 * 3, threshold)

    @property
    def kl_per_image(self) -> np.ndarray:
        """(G,) nats per image."""
        return self.rates * self.dims_per_image

    @property
    def active(self) -> np.ndarray:
        """(G,) bool: the group's mean KL exceeds the threshold (nats per image)."""
        return self.kl_per_image > self.threshold

    @property
    def active_groups(self) -> int:
        return int(self.active.sum())

    def rate_by_resolution(self) -> dict[int, float]:
        """Resolution -> the sum of its groups' rates, nats per image dimension (lowest resolution first)."""
        return {res: float(self.rates[np.asarray(self.resolutions) == res].sum())
                for res in sorted(set(self.resolutions))}

    @property
    def cumulative_fraction(self) -> np.ndarray:
        return cumulative_fraction(self.rates)

    def scalars(self, prefix: str = "latents") -> dict[str, float]:
        """`<prefix>/rate_<res>px` (nats per image dimension) for each resolution, `<prefix>/active_groups`."""
        values = {f"{prefix}/rate_{res}px": rate for res, rate in self.rate_by_resolution().items()}
        values[f"{prefix}/active_groups"] = float(self.active_groups)
        return values

    def heatmap(self) -> np.ndarray:
        return usage_heatmap(self.kl_per_image, self.resolutions, self.threshold)

    def cumulative_plot(self) -> np.ndarray:
        return cumulative_plot(self.cumulative_fraction, self.resolutions)

    def to_json(self) -> dict:
        """Per group and per resolution, in nats per image and per dimension; the active groups; the curve."""
        by_res = self.rate_by_resolution()
        active, fractions, kl = self.active, self.cumulative_fraction, self.kl_per_image
        res_array = np.asarray(self.resolutions)
        return {
            "num_groups": len(self.rates),
            "dims_per_image": self.dims_per_image,
            "active_threshold_nats_per_image": self.threshold,
            "active_groups": self.active_groups,
            "total_rate_nats_per_dim": float(self.rates.sum()),
            "total_kl_nats_per_image": float(kl.sum()),
            "groups": [{"index": i, "resolution": int(res), "kl_nats_per_image": float(kl[i]),
                        "kl_nats_per_dim": float(self.rates[i]), "active": bool(active[i]),
                        "cumulative_fraction": float(fractions[i])}
                       for i, res in enumerate(self.resolutions)],
            "resolutions": {f"{res}px": {"resolution": res, "groups": int((res_array == res).sum()),
                                         "active_groups": int(active[res_array == res].sum()),
                                         "rate_nats_per_dim": rate, "kl_nats_per_image": rate * self.dims_per_image}
                            for res, rate in by_res.items()},
            "cumulative_fraction": [float(f) for f in fractions],
        }


class RateWindow:
    """Per-group rates summed on the device over a logging window, read back once, at log time.

    `add` costs no host-device synchronisation. A non-finite group rate (a NaN
    step) is left out of that group's mean. `take` is a collective: every
    rank calls it at the same step. It all-reduces, on the device, one
    tensor of each group's sum and count, indexed by group (the model's
    decoder blocks, in the same order on every rank; no metrics module, so
    that the CLI imports this module without tensorboard), and returns the
    mean over every rank's steps: the mean over ranks, as every rank has the
    same number of steps. Then a new window starts.
    """

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def add(self, rates: torch.Tensor) -> None:
        rates = rates.detach().to(torch.float64)
        finite = torch.isfinite(rates)
        rates = torch.where(finite, rates, torch.zeros_like(rates))
        if self.sum is None:
            self.sum, self.count = rates, finite.to(torch.float64)
        else:
            self.sum, self.count = self.sum + rates, self.count + finite

    def take(self) -> np.ndarray | None:
        if self.sum is None:
            return None
        packed = torch.stack([self.sum, self.count])
        self.sum = self.count = None
        if dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        sums, counts = packed.cpu().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(counts > 0, sums / counts, np.nan)
