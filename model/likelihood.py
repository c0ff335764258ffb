"""The VDVAE's probability maths: discretised mixture of logistics and diagonal Gaussians.

Everything here runs in fp32, whatever the autocast state of the caller: the
network may run in bf16, its likelihood and KL terms do not.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Generators = torch.Generator | Sequence[torch.Generator] | None
"""The latent noise's source: the global stream (None), one generator, or one generator per row."""

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


def _no_autocast(device_type: str):
    if not torch.amp.is_autocast_available(device_type):  # the meta device, for shape checks
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def gaussian_kl(mu_q: torch.Tensor, mu_p: torch.Tensor, logsigma_q: torch.Tensor,
                logsigma_p: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu_q, e^logsigma_q) || N(mu_p, e^logsigma_p)), in fp32 (official formula)."""
    with _no_autocast(mu_q.device.type):
        mu_q, mu_p, logsigma_q, logsigma_p = _fp32(mu_q, mu_p, logsigma_q, logsigma_p)
        return (-0.5 + logsigma_p - logsigma_q
                + 0.5 * (logsigma_q.exp() ** 2 + (mu_q - mu_p) ** 2) / (logsigma_p.exp() ** 2))


class _GaussianKLSum(torch.autograd.Function):
    """Per-image sum of `gaussian_kl` over (C, H, W) with an analytic backward.

    Autograd through the elementwise formula keeps about ten full-size
    intermediates alive until the backward pass (640 MB for one 1024 px
    block); this keeps only the four inputs.
    """

    @staticmethod
    def forward(ctx, mu_q, mu_p, logsigma_q, logsigma_p):
        ctx.save_for_backward(mu_q, mu_p, logsigma_q, logsigma_p)
        return gaussian_kl(mu_q, mu_p, logsigma_q, logsigma_p).sum(dim=(1, 2, 3))

    @staticmethod
    def backward(ctx, grad):
        mu_q, mu_p, logsigma_q, logsigma_p = ctx.saved_tensors
        grad = grad.view(-1, 1, 1, 1)
        inv_var_p = torch.exp(-2.0 * logsigma_p)
        diff = mu_q - mu_p
        d_mu = diff * inv_var_p * grad
        var_ratio = torch.exp(2.0 * (logsigma_q - logsigma_p))
        d_logsigma_q = (var_ratio - 1.0) * grad
        d_logsigma_p = (1.0 - var_ratio - diff * diff * inv_var_p) * grad
        return d_mu, -d_mu, d_logsigma_q, d_logsigma_p


def gaussian_kl_sum(mu_q: torch.Tensor, mu_p: torch.Tensor, logsigma_q: torch.Tensor,
                    logsigma_p: torch.Tensor) -> torch.Tensor:
    """KL summed per image: (N, C, H, W) inputs -> (N,), fp32, memory-lean backward."""
    with _no_autocast(mu_q.device.type):
        return _GaussianKLSum.apply(*_fp32(mu_q, mu_p, logsigma_q, logsigma_p))


class _Reparameterise(torch.autograd.Function):
    """z = mu + e^logsigma * eps, with d z / d logsigma = z - mu.

    Keeps z and mu for the backward: z is kept anyway (the input of the
    next 1x1 conv) and mu by the KL term, so nothing full-size is added.
    """

    @staticmethod
    def forward(ctx, mu, logsigma, eps):
        z = torch.addcmul(mu, torch.exp(logsigma), eps)
        ctx.save_for_backward(z, mu)
        return z

    @staticmethod
    def backward(ctx, grad):
        z, mu = ctx.saved_tensors
        return grad, grad * (z - mu), None


def gaussian_log_prob_sum(z: torch.Tensor, mu: torch.Tensor, logsigma: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, e^logsigma) summed per image: (N, C, H, W) inputs -> (N,), fp32."""
    with _no_autocast(z.device.type):
        z, mu, logsigma = _fp32(z, mu, logsigma)
        scaled = (z - mu) * torch.exp(-logsigma)
        return (-0.5 * scaled * scaled - logsigma - _LOG_SQRT_2PI).sum(dim=(1, 2, 3))


def standard_normal(shape: Sequence[int], device: torch.device, generator: Generators = None) -> torch.Tensor:
    """fp32 noise of `shape` (N, ...), drawn in logical order as the official code draws it;
    with a sequence of generators, row i from generator i alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} rows: one per row")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device) for g in generator])


def reparameterise(mu: torch.Tensor, logsigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The sample `mu + e^logsigma * eps` of given noise, in fp32 (d z / d logsigma = z - mu).

    Deterministic given eps: the draw (`standard_normal`) stays outside, so
    that compiled and eager code consume the random stream alike.
    """
    with _no_autocast(mu.device.type):
        mu, logsigma = _fp32(mu, logsigma)
        # eps laid out like mu (channels last), so the arithmetic stays in one layout
        return _Reparameterise.apply(mu, logsigma, torch.empty_like(mu).copy_(eps))


def sample_gaussian(mu: torch.Tensor, logsigma: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """A reparameterised sample `mu + e^logsigma * eps`, in fp32.

    generator: None (the global stream), one generator, or one per row of mu.
    """
    return reparameterise(mu, logsigma, standard_normal(mu.shape, mu.device, generator))


def _split_dmol(params: torch.Tensor, num_channels: int = 3):
    """(N, H, W, 10*M) -> logits (N,H,W,M), means, log_scales, coeffs (N,H,W,3,M).

    The layout is the official one (PixelCNN++): M mixture logits, then per
    sub-pixel M means, M log-scales and M coefficients.
    """
    n, h, w, c = params.shape
    num_mix = c // (3 * num_channels + 1)
    # splits, not slices: a split's backward is one concatenation (a slice's: a zero-filled copy each)
    logits, rest = params.split([num_mix, c - num_mix], dim=-1)
    means, log_scales, coeffs = rest.reshape(n, h, w, num_channels, 3 * num_mix).split(num_mix, dim=-1)
    return logits, means, log_scales.clamp(min=-7.0), torch.tanh(coeffs)


def dmol_nll(params: torch.Tensor, target: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Negative log-likelihood of `target` per image, in nats per dimension.

    params: (N, H, W, 10*M) network output, channels last.
    target: (N, H, W, 3) in [-1, 1] on the preset's grid (8-bit, or 5-bit
        `floor(x/8)*8` mapped by `(x - 127.5) / 127.5`).
    Returns (N,): -log p(x) / (H*W*3). Bins are 2/255 wide (8-bit) or 2/31
    (5-bit), the first and last bins open-ended, as in the official code.
    """
    return dmol_neg_log_prob(params, target, bits) / target[0].numel()


def dmol_neg_log_prob(params: torch.Tensor, target: torch.Tensor, bits: int) -> torch.Tensor:
    """-log p(target) summed over pixels and sub-pixels, per image (N,), fp32."""
    with _no_autocast(params.device.type):
        params, target = _fp32(params, target)
        logits, means, log_scales, coeffs = _split_dmol(params, target.shape[-1])
        x = target.unsqueeze(-1)  # (N, H, W, 3, 1)
        # Each sub-pixel's mean depends linearly on the preceding sub-pixels
        # (unbind, not indexing: one stacked gradient instead of a zero-filled one per index).
        m0, m1, m2 = means.unbind(3)
        c0, c1, c2 = coeffs.unbind(3)
        x0, x1, _ = x.unbind(3)
        means = torch.stack([m0, m1 + c0 * x0, m2 + c1 * x0 + c2 * x1], dim=3)
        half_bin = 1.0 / 31.0 if bits == 5 else 1.0 / 255.0
        half_levels = 15.5 if bits == 5 else 127.5
        centered = x - means
        inv_stdv = torch.exp(-log_scales)
        plus_in = inv_stdv * (centered + half_bin)
        min_in = inv_stdv * (centered - half_bin)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # first bin: log sigmoid(plus_in)
        log_one_minus_cdf_min = -F.softplus(min_in)  # last bin: log(1 - sigmoid(min_in))
        mid_in = inv_stdv * centered
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
        # The clamp keeps the gradient of the unselected log finite (torch.where
        # multiplies it by zero, and 0 * inf is NaN).
        log_probs = torch.where(
            x < -0.999, log_cdf_plus,
            torch.where(
                x > 0.999, log_one_minus_cdf_min,
                torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                            log_pdf_mid - math.log(half_levels))))
        log_probs = log_probs.sum(dim=3) + torch.log_softmax(logits, dim=-1)
        return -torch.logsumexp(log_probs, dim=-1).sum(dim=(1, 2))


def dmol_sample(params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw images in [-1, 1], (N, H, W, 3) fp32, from DMoL parameters (N, H, W, 10*M).

    As the official code: pick a component by Gumbel-max, draw a logistic
    sample, clip each sub-pixel to [-1, 1]; no rounding to the pixel grid.
    """
    with _no_autocast(params.device.type):
        (params,) = _fp32(params)
        logits, means, log_scales, coeffs = _split_dmol(params)
        num_mix = logits.shape[-1]

        def uniform(shape):
            u = torch.rand(shape, generator=generator, device=params.device)
            return u * (1.0 - 2e-5) + 1e-5

        gumbel = -torch.log(-torch.log(uniform(logits.shape)))
        choice = F.one_hot(torch.argmax(logits + gumbel, dim=-1), num_mix).to(params.dtype)
        choice = choice.unsqueeze(3)  # (N, H, W, 1, M)
        mean = (means * choice).sum(-1)
        log_scale = (log_scales * choice).sum(-1).clamp(min=-7.0)
        coeff = (coeffs * choice).sum(-1)
        u = uniform(mean.shape)
        x = mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
        x0 = x[..., 0].clamp(-1.0, 1.0)
        x1 = (x[..., 1] + coeff[..., 0] * x0).clamp(-1.0, 1.0)
        x2 = (x[..., 2] + coeff[..., 1] * x0 + coeff[..., 2] * x1).clamp(-1.0, 1.0)
        return torch.stack([x0, x1, x2], dim=-1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 pixels the official way: `(x + 1) * 127.5`, clip, truncate."""
    return ((images + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8)
