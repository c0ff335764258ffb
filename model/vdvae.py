"""The Very Deep VAE (Child, 2021): architecture only.

Parameter names and shapes are those of openai/vdvae, so the released
checkpoints load without renaming, and the maths is the official model's:
the same ELBO on the same weights and latent noise. What differs is how it
runs (each measured in tests/benchmarks/RESULTS.md):
- one activation layout (channels last) and one activation dtype, so that
  no add or concat falls off its fast path;
- every 1x1 conv in the faster of two forms for the machine: one matmul
  (`addmm`, bias fused) over the pixel rows of that layout, or a 1x1
  convolution (see `conv1x1_form`);
- splits instead of slices of one output (the prior's, the DMoL's), whose
  backward writes one gradient instead of a zero-filled one per slice;
- the posterior's first 1x1 conv split by input channels, so that
  gelu(encoder activations) is computed once per resolution and gelu(x)
  once per block (shared with the prior), with no concatenated copy;
- per-image KL sums with an analytic backward, instead of per-pixel KL maps
  held by autograd;
- unconditional and "keep the first k latent groups" sampling in one pass;
- the sampled log-densities of posterior draws (`log_densities`, `log_weights`)
  besides the analytic KL, for the importance-weighted bound;
- optional activation checkpointing per block, and an output head evaluated
  in bands of rows, so that 1024 px trains in a few GB;
- the decoder's noise drawn before each block's step, so that the blocks can
  be compiled (`VDVAE.compile_blocks`) without changing the random stream.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .likelihood import (Generators, dmol_neg_log_prob, dmol_sample, gaussian_kl_sum, gaussian_log_prob_sum,
                         reparameterise, sample_gaussian, standard_normal, to_uint8)
from .presets import ModelConfig

Temperature = float | list[float] | tuple[float, ...] | None

# Blocks per activation-checkpointing unit (see _checkpoint_groups).
_CHECKPOINT_GROUP = 3

# Pixels per band of the likelihood (see VDVAE._neg_log_prob): 64 rows at 1024 px.
_LIKELIHOOD_BAND_PIXELS = 2**16

CompileOptions = tuple[tuple[str, object], ...]
"""torch.compile keyword arguments as sorted (name, value) pairs: a block's compile setting."""

_COMPILED: dict[tuple[object, str], object] = {}


def _maybe_compiled(fn, options: CompileOptions | None):
    """`fn`, or torch.compile(fn, **options) when gradients are on: one compiled function per
    (fn, options) in a process.

    The compiled function takes the module as an argument, so blocks of one
    kind share its graphs (their parameters are graph inputs), and a copy
    of a module (deepcopy, an EMA) calls it with its own parameters.
    """
    if options is None or not torch.is_grad_enabled():  # evaluation and sampling run eagerly
        return fn
    key = (fn, repr(options))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, **dict(options))
    return _COMPILED[key]


def _conv(in_ch: int, out_ch: int, kernel: int, zero_weights: bool = False,
          cls: type[nn.Conv2d] | None = None) -> nn.Conv2d:
    cls = cls or (_Conv1x1 if kernel == 1 else nn.Conv2d)
    conv = cls(in_ch, out_ch, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.bias)
    if zero_weights:
        nn.init.zeros_(conv.weight)
    return conv


def _cpu_conv1x1_form() -> str:
    """The faster form of the model's 1x1 convs on this CPU, as measured (conv1x1.py, RESULTS.md).

    oneDNN's convolution on AVX-512 CPUs without AMX: on the AMD EPYC with
    avx512_bf16, each 1x1 shape of the model 3-56 % faster as a convolution, the
    whole cifar10 step about 4 % (fp32) and 6 % (bf16). The matmul elsewhere: on
    the AMX Xeon the two measured the same (2026-12-02), and no other kind has
    been measured against the convolution.
    """
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "conv" if torch.backends.cpu.get_cpu_capability() == "AVX512" and not amx else "matmul"


CONV1X1_FORMS = ("matmul", "conv")
_CONV1X1_BY_DEVICE = {"cpu": _cpu_conv1x1_form()}  # read once: compiled blocks read it as a constant
_conv1x1_forced: str | None = None


def conv1x1_form(device_type: str) -> str:
    """How the model computes its 1x1 convs on this device type: 'matmul' or 'conv'.

    Both give the official conv's result within float rounding, with the same
    parameters; which is faster depends on the machine (`_cpu_conv1x1_form`).
    On CUDA, the matmul until the GPU check has measured both.
    """
    return _conv1x1_forced or _CONV1X1_BY_DEVICE.get(device_type, "matmul")


def set_conv1x1_form(form: str | None) -> None:
    """Use `form` ('matmul' or 'conv') on every device, or None for each machine's own choice:
    for benchmarks and tests that compare the two in one process."""
    if form is not None and form not in CONV1X1_FORMS:
        raise ValueError(f"conv1x1 form must be one of {CONV1X1_FORMS} or None, not {form!r}")
    global _conv1x1_forced
    _conv1x1_forced = form


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> its (N*H*W, C) pixel rows: a view of channels-last storage."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N*H*W, C') pixel rows -> (N, C', H, W) in channels-last storage, no copy."""
    n, _, h, w = like.shape
    return rows.view(n, h, w, rows.shape[1]).permute(0, 3, 1, 2)


class _Conv1x1(nn.Conv2d):
    """A 1x1 conv on channels-last activations, in the machine's form (`conv1x1_form`).

    As a matmul: in NHWC storage a 1x1 conv is `rows @ W.T + b` on the (N*H*W, C)
    view, one `addmm` with the bias fused, and the weight gradient is a plain
    (out, in) matrix, never relaid. As a convolution: the library's (oneDNN on a
    CPU), channels last in and out. Same parameters as the official nn.Conv2d
    either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if conv1x1_form(x.device.type) == "conv":
            return F.conv2d(_channels_last(x), self.weight, self.bias)
        return _from_rows(F.linear(_rows(x), self.weight.flatten(1), self.bias), x)


class _SplitInputConv(_Conv1x1):
    """A 1x1 conv over the channel concatenation [a, b], computed without building it.

    Same parameters as the official conv on `cat([a, b])`. As matmuls: the b
    half of the weight and the bias in one matmul, the a half accumulated into
    it by `addmm` (no separate add). As convolutions: one per half, summed (an
    add over the narrow output, not a copy of the wide input).
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # split, not slices: the backward of split is one concatenation, that of a
        # slice a zero-filled full-size gradient per slice, then their sum
        weight_a, weight_b = self.weight.split([a.shape[1], b.shape[1]], dim=1)
        if conv1x1_form(a.device.type) == "conv":
            return F.conv2d(_channels_last(b), weight_b, self.bias) + F.conv2d(_channels_last(a), weight_a)
        out = torch.addmm(F.linear(_rows(b), weight_b.flatten(1), self.bias), _rows(a), weight_a.flatten(1).t())
        return _from_rows(out, a)


class Block(nn.Module):
    """Bottleneck residual block: GELU -> 1x1 -> 3x3 -> 3x3 -> 1x1 (1x1s instead of 3x3s at 1-2 px)."""

    compile_options: CompileOptions | None = None
    """Set by `VDVAE.compile_blocks`: run `_forward` compiled."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, *, residual: bool,
                 use_3x3: bool, down_rate: int | None = None, zero_last: bool = False,
                 split_input: bool = False):
        super().__init__()
        self.residual = residual
        self.down_rate = down_rate
        k = 3 if use_3x3 else 1
        self.c1 = _conv(in_ch, mid_ch, 1, cls=_SplitInputConv if split_input else None)
        self.c2 = _conv(mid_ch, mid_ch, k)
        self.c3 = _conv(mid_ch, mid_ch, k)
        self.c4 = _conv(mid_ch, out_ch, 1, zero_weights=zero_last)

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after the first 1x1 conv: GELU -> c2 -> GELU -> c3 -> GELU -> c4."""
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        return self.c4(F.gelu(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _maybe_compiled(Block._forward, self.compile_options)(self, x)
        if self.down_rate is not None:  # outside the compiled part: one graph per resolution
            out = F.avg_pool2d(out, kernel_size=self.down_rate, stride=self.down_rate)
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tail(self.c1(F.gelu(x)))
        return x + h if self.residual else h


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """The one activation layout of the model: NHWC storage (a copy only where it is not)."""
    return x.contiguous(memory_format=torch.channels_last)


def _compute_dtype(param: torch.Tensor) -> torch.dtype:
    """The activation dtype: the autocast dtype where autocast is on, else the weights' dtype.

    Keeping every activation in one dtype (and one layout) keeps the
    elementwise ops on their fast paths; under bf16 autocast an fp32
    residual stream would make every add and concat a mixed-dtype one.
    """
    device = param.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return param.dtype


def _run_group(fn, blocks: list[nn.Module], *args):
    """`fn(blocks, *args)`, through torch.utils.checkpoint when the blocks are marked for it."""
    if blocks[0].checkpointed and torch.is_grad_enabled():
        return checkpoint(functools.partial(fn, blocks), *args, use_reentrant=blocks[0].checkpoint_reentrant)
    return fn(blocks, *args)


def _checkpoint_groups(blocks: list[nn.Module], size: int) -> list[list[nn.Module]]:
    """Consecutive checkpointed blocks at one resolution, `size` at most per group.

    A group is checkpointed as a unit: only its input is stored, each block
    is still recomputed once. A block that changes resolution (encoder
    'RdK'), or mixes in a lower one (decoder 'RmS'), stands alone, so that
    every activation the decoder reads is a group's output.
    """
    groups: list[list[nn.Module]] = []
    for block in blocks:
        last = groups[-1] if groups else None
        if (last and len(last) < size and block.checkpointed and last[-1].checkpointed
                and block.res == last[-1].res and getattr(block, "mixin", None) is None
                and getattr(block, "down_rate", None) is None
                and getattr(last[-1], "down_rate", None) is None):
            last.append(block)
        else:
            groups.append([block])
    return groups


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.in_conv = _conv(3, cfg.width, 3)
        layers = cfg.encoder_layers
        blocks = []
        for res, down in layers:
            w = cfg.width_at(res)
            block = Block(w, int(w * cfg.bottleneck_multiple), w, residual=True,
                          use_3x3=res > 2, down_rate=down)
            block.res = res
            blocks.append(block)
        with torch.no_grad():
            for block in blocks:
                block.c4.weight.mul_(math.sqrt(1 / len(layers)))
        self.enc_blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (N, 3, H, W) normalised input -> the last activation at each resolution,
        highest first. (A list, not a dict keyed by resolution: ZeRO-3's module
        hooks take only tensors, lists, tuples and string-keyed dicts.)"""
        x = self.in_conv(x)
        acts = {x.shape[2]: x}
        for group in self.groups:
            x = _run_group(self._run_blocks, group, x)
            acts[x.shape[2]] = x
        return list(acts.values())

    def _run_blocks(self, blocks: list[Block], x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x)
            width = self.cfg.width_at(x.shape[2])
            if x.shape[1] < width:  # widening between resolutions: zero channels
                x = F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1]))
        return x


class DecBlock(nn.Module):
    """One top-down block: posterior q(z|x, acts), prior p(z|x), latent injection, residual block."""

    compile_options: CompileOptions | None = None
    """Set by `VDVAE.compile_blocks`: run `_posterior_step` compiled."""

    def __init__(self, cfg: ModelConfig, res: int, mixin: int | None, num_blocks: int):
        super().__init__()
        self.res = res
        self.mixin = mixin
        self.zdim = cfg.zdim
        width = cfg.width_at(res)
        self.width = width
        mid = int(width * cfg.bottleneck_multiple)
        use_3x3 = res > 2
        self.enc = Block(width * 2, mid, cfg.zdim * 2, residual=False, use_3x3=use_3x3,
                         split_input=True)
        self.prior = Block(width, mid, cfg.zdim * 2 + width, residual=False, use_3x3=use_3x3,
                           zero_last=True)
        self.z_proj = _conv(cfg.zdim, width, 1)
        self.resnet = Block(width, mid, width, residual=True, use_3x3=use_3x3)
        with torch.no_grad():
            self.z_proj.weight.mul_(math.sqrt(1 / num_blocks))
            self.resnet.c4.weight.mul_(math.sqrt(1 / num_blocks))

    def _input(self, x: torch.Tensor | None, lowres: torch.Tensor | None, batch: int) -> torch.Tensor:
        if lowres is not None:
            up = F.interpolate(lowres[:, :self.width], scale_factor=self.res // self.mixin)
            x = up if x is None else x + up
        return _channels_last(x.expand(batch, -1, -1, -1)) if x.shape[0] != batch else x

    def _split_prior(self, feats: torch.Tensor, x: torch.Tensor):
        """Prior output -> (mean, log-std, x + the residual part).

        mean and log-std as fp32 tensors of their own (the KL's dtype, one
        copy in any dtype): the KL keeps them for the backward, and views would
        keep all of feats (2*zdim + width channels). A split, not slices: its
        backward writes the gradient of feats once (slices: a zero-filled copy
        of feats each, then their sum).
        """
        k = self.zdim
        mean, log_std, residual = feats.split([k, k, feats.shape[1] - 2 * k], dim=1)
        return mean.to(torch.float32, copy=True), log_std.to(torch.float32, copy=True), x + residual

    def _inject(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.resnet(x + self.z_proj(z.to(x.dtype)))

    def forward(self, x: torch.Tensor | None, lowres: torch.Tensor | None, acts: torch.Tensor,
                acts_activated: bool = False):
        """Posterior pass. Returns the new state, the KL summed per image (N,), and z.

        The posterior's first layer, officially `c1(gelu(cat[x, acts]))`, is
        computed as `c1_x(gelu(x)) + c1_a(gelu(acts))` (the same sum, split by
        input channels), and gelu(x) is the prior's first input too: no
        concatenated copy, one GELU per input. With `acts_activated` the
        caller passes gelu(acts), computed once for all blocks at this
        resolution (a checkpointed group of blocks computes its own, so that
        it is not stored).
        """
        # Eager, outside the compiled step (one graph per resolution): the block's input,
        # and its noise, drawn first. Nothing random happens between here and the official
        # draw after the posterior, so the stream is the same, and a compiled step draws none.
        x = self._input(x, lowres, acts.shape[0])
        eps = standard_normal((acts.shape[0], self.zdim, self.res, self.res), acts.device)
        return _maybe_compiled(DecBlock._posterior_step, self.compile_options)(self, x, acts, acts_activated, eps)

    def _posterior_step(self, x, acts, acts_activated, eps):
        x, qm, qv, pm, pv = self._posterior_and_prior(x, acts, acts_activated)
        z = reparameterise(qm, qv, eps)
        kl = gaussian_kl_sum(qm, pm, qv, pv)
        return self._inject(x, z), kl, z

    def _posterior_and_prior(self, x, acts, acts_activated):
        """x: the block's input (see `_input`) -> (x + the prior's residual part,
        posterior mean, log-std, prior mean, log-std)."""
        gelu_acts = acts if acts_activated else F.gelu(acts)
        gx = F.gelu(x)
        qm, qv = self.enc.tail(self.enc.c1(gx, gelu_acts)).chunk(2, dim=1)
        pm, pv, x = self._split_prior(self.prior.tail(self.prior.c1(gx)), x)
        return x, qm, qv, pm, pv

    def log_densities(self, x: torch.Tensor | None, lowres: torch.Tensor | None, acts: torch.Tensor,
                      acts_activated: bool = False, generator: Generators = None):
        """Posterior pass with sampled densities instead of the analytic KL.

        Returns the new state and, per image (N,) in fp32, log q(z|x) and
        log p(z) of the z drawn from the posterior (the same draw as
        `forward` makes from the same random state).
        """
        x = self._input(x, lowres, acts.shape[0])
        x, qm, qv, pm, pv = self._posterior_and_prior(x, acts, acts_activated)
        z = sample_gaussian(qm, qv, generator)
        return self._inject(x, z), gaussian_log_prob_sum(z, qm, qv), gaussian_log_prob_sum(z, pm, pv)

    def sample(self, x: torch.Tensor | None, lowres: torch.Tensor | None, batch: int,
               temperature: float | None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prior pass: z from p(z|x), its std scaled by `temperature`."""
        x = self._input(x, lowres, batch)
        pm, pv, x = self._split_prior(self.prior(x), x)
        if temperature == 0:  # the prior mean
            return self._inject(x, pm.float())
        if temperature is not None:
            pv = pv + math.log(temperature)
        return self._inject(x, sample_gaussian(pm, pv, generator))


class DmolNet(nn.Module):
    """The output head: final gain and bias (official `decoder.gain`/`decoder.bias`),
    then a 1x1 conv to the DMoL parameters."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.out_conv = _conv(cfg.width, cfg.num_mixtures * 10, 1)
        self.gain = nn.Parameter(torch.ones(1, cfg.width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, cfg.width, 1, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_conv(h * self.gain + self.bias).permute(0, 2, 3, 1)  # (N, H, W, 10*M)


class _BiasInputs(nn.ParameterList):
    """The learned decoder inputs at resolutions up to `no_bias_above` (official `bias_xs`).

    Callable (unlike a plain ParameterList) so that its parameters are used
    inside its own forward, as ZeRO-3 requires.
    """

    __call__ = nn.Module.__call__

    def forward(self, dtype: torch.dtype) -> list[torch.Tensor]:
        return [_channels_last(b.to(dtype)) for b in self]


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        layers = cfg.decoder_layers
        self.dec_blocks = nn.ModuleList(DecBlock(cfg, res, mixin, len(layers)) for res, mixin in layers)
        self.bias_resolutions = [r for r in cfg.decoder_resolutions if r <= cfg.no_bias_above]
        self.bias_xs = _BiasInputs(
            nn.Parameter(torch.zeros(1, cfg.width_at(r), r, r)) for r in self.bias_resolutions)
        self.out_net = DmolNet(cfg)

    def activation_dtype(self) -> torch.dtype:
        return _compute_dtype(self.out_net.gain)

    def initial_state(self, dtype: torch.dtype) -> dict[int, torch.Tensor]:
        return {b.shape[2]: b for b in self.bias_xs(dtype)}

    def forward(self, activations: list[torch.Tensor]):
        """Posterior pass: the state at image resolution (before the output head)
        and the per-block KL sums, (num_blocks, N)."""
        acts = {a.shape[2]: a for a in activations}
        xs = self.initial_state(acts[self.cfg.image_size].dtype)
        shared_gelu: dict[int, torch.Tensor] = {}
        kls = []
        for group in self.groups:
            first = group[0]
            lowres = xs[first.mixin] if first.mixin is not None else None
            if first.checkpointed and torch.is_grad_enabled():
                acts_args = (acts[first.res], False)
            else:
                if first.res not in shared_gelu:
                    shared_gelu[first.res] = F.gelu(acts[first.res])
                acts_args = (shared_gelu[first.res], True)
            xs[first.res], *group_kls = _run_group(self._run_blocks, group, xs.get(first.res), lowres, *acts_args)
            kls += group_kls
        return xs[self.cfg.image_size], torch.stack(kls)

    @staticmethod
    def _run_blocks(blocks: list[DecBlock], x, lowres, acts, acts_activated):
        # gelu(acts) once per group: a checkpointed group recomputes it, not stores it
        gelu_acts = acts if acts_activated else F.gelu(acts)
        kls = []
        for i, block in enumerate(blocks):
            x, kl, _ = block(x, lowres if i == 0 else None, gelu_acts, True)
            kls.append(kl)
        return (x, *kls)

    def log_densities(self, activations: list[torch.Tensor], generator: Generators = None):
        """Posterior pass with sampled densities: the state at image resolution and, per image
        (N,) in fp32, log q(z|x) and log p(z) summed over the latent groups. No activation
        checkpointing (for evaluation)."""
        acts = {a.shape[2]: a for a in activations}
        xs = self.initial_state(acts[self.cfg.image_size].dtype)
        shared_gelu: dict[int, torch.Tensor] = {}
        log_q = log_p = 0
        for block in self.dec_blocks:
            lowres = xs[block.mixin] if block.mixin is not None else None
            if block.res not in shared_gelu:
                shared_gelu[block.res] = F.gelu(acts[block.res])
            xs[block.res], q, p = block.log_densities(xs.get(block.res), lowres, shared_gelu[block.res], True,
                                                      generator)
            log_q, log_p = log_q + q, log_p + p
        return xs[self.cfg.image_size], log_q, log_p

    def sample(self, n: int, temperatures: list[float | None], activations: list[torch.Tensor] | None = None,
               num_posterior: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """DMoL parameters of n images: the first `num_posterior` latent groups from q(z|acts), the rest from the prior."""
        acts = {a.shape[2]: a for a in activations or []}
        xs = self.initial_state(self.activation_dtype())
        for i, block in enumerate(self.dec_blocks):
            lowres = xs[block.mixin] if block.mixin is not None else None
            if i < num_posterior:
                xs[block.res], _, _ = block(xs.get(block.res), lowres, acts[block.res])
            else:
                xs[block.res] = block.sample(xs.get(block.res), lowres, n, temperatures[i],
                                             generator=generator)
        return self.out_net(xs[self.cfg.image_size])


@dataclass
class ElboTerms:
    """Loss terms in nats per dimension. Scalars are batch means; `per_image_*` are (N,)."""

    elbo: torch.Tensor
    distortion: torch.Tensor
    rate: torch.Tensor
    per_image_elbo: torch.Tensor
    per_group_rate: torch.Tensor
    """(num_latent_groups,) batch-mean KL of each decoder block, nats per dimension."""

    @property
    def bpd(self) -> torch.Tensor:
        """The ELBO in bits per dimension."""
        return self.elbo / math.log(2.0)


@dataclass
class LogDensities:
    """The log-densities of posterior draws, nats per image (not per dimension), fp32, (N, draws)."""

    log_px_z: torch.Tensor
    """log p(x | z): the DMoL log-likelihood summed over dimensions, on the ELBO's bit depth."""
    log_pz: torch.Tensor
    """log p(z): the prior's Gaussian log-density of the drawn z, summed over latent groups."""
    log_qz: torch.Tensor
    """log q(z | x): the posterior's Gaussian log-density of the same z."""

    @property
    def log_weight(self) -> torch.Tensor:
        """The importance weight log p(x, z) - log q(z | x); its mean over draws is the ELBO."""
        return self.log_px_z + self.log_pz - self.log_qz


class VDVAE(nn.Module):
    """A VDVAE built from a `ModelConfig`.

    `forward(images)` takes uint8 images (N, H, W, 3) and returns `ElboTerms`;
    `sample` and `sample_from_latents` return uint8 images (N, H, W, 3).
    """

    _head_compile_options: CompileOptions | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.set_activation_checkpointing("none")

    # -- data --------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, H, W, 3) -> (network input (N, 3, H, W), loss target (N, H, W, 3)).

        The official `preprocess_func`: input `(x + shift) * scale`; target
        `(x - 127.5) / 127.5`, after `floor(x/8)*8` for 5-bit presets; x
        divided by 255 first for presets fed [0, 1] images (ffhq1024).
        """
        cfg = self.config
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != cfg.image_size or images.shape[2] != cfg.image_size:
            raise ValueError(f"this model takes {cfg.image_size}x{cfg.image_size} images, got "
                             f"{images.shape[1]}x{images.shape[2]}")
        x = images.float()
        target = x
        if cfg.input_divisor != 1.0:
            x = x / cfg.input_divisor
            target = (x - 0.5) * 2.0
        else:
            if cfg.bits == 5:
                target = torch.floor(target * (1.0 / 8.0)) * 8.0
            target = (target - 127.5) * (1.0 / 127.5)
        inp = (x + cfg.input_shift) * cfg.input_scale
        # NHWC storage seen as NCHW: the channels_last layout, with no copy.
        return inp.permute(0, 3, 1, 2), target

    # -- loss --------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> ElboTerms:
        return self.elbo(images)

    def elbo(self, images: torch.Tensor) -> ElboTerms:
        """Negative ELBO of uint8 images (N, H, W, 3), nats per dimension."""
        inp, target = self.preprocess(images)
        h, kls = self.decoder(self.encoder(inp.to(self.decoder.activation_dtype())))
        num_dims = target[0].numel()
        distortion = self._neg_log_prob(h, target) / num_dims
        rate = kls.sum(0) / num_dims  # (N,)
        per_image = distortion + rate
        return ElboTerms(
            elbo=per_image.mean(),
            distortion=distortion.mean(),
            rate=rate.mean(),
            per_image_elbo=per_image.detach(),
            per_group_rate=kls.detach().mean(1) / num_dims,
        )

    def log_densities(self, images: torch.Tensor, draws: int = 1, generator: Generators = None) -> LogDensities:
        """`draws` posterior draws per image of uint8 images (N, H, W, 3): their log-densities.

        The encoder runs once; the decoder runs on N * draws rows, row
        i * draws + j being draw j of image i. generator: None (the global
        random stream: with draws=1 the same z as `elbo` draws from the
        same state), one torch.Generator, or a sequence of N * draws
        generators, one per row, each drawing that row's noise alone (so a
        row's draw does not depend on the other rows).
        """
        if draws < 1:
            raise ValueError(f"draws={draws}: must be at least 1")
        inp, target = self.preprocess(images)
        acts = self.encoder(inp.to(self.decoder.activation_dtype()))
        if draws > 1:
            acts = [_channels_last(a.repeat_interleave(draws, dim=0)) for a in acts]
            target = target.repeat_interleave(draws, dim=0)
        h, log_qz, log_pz = self.decoder.log_densities(acts, generator)
        log_px_z = -self._neg_log_prob(h, target)
        n = images.shape[0]
        return LogDensities(log_px_z.float().view(n, draws), log_pz.float().view(n, draws),
                            log_qz.float().view(n, draws))

    def log_weights(self, images: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """log p(x, z) - log q(z | x) of one posterior draw per image, (N,) nats, fp32.

        Its expectation is the ELBO (per image, in nats); the importance-weighted
        bound is the log-mean-exp of K of them.
        """
        return self.log_densities(images, 1, generator).log_weight[:, 0]

    def _head_neg_log_prob(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _maybe_compiled(VDVAE._head_neg_log_prob_eager, self._head_compile_options)(self, h, target)

    def _head_neg_log_prob_eager(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dmol_neg_log_prob(self.decoder.out_net(h), target, self.config.bits)

    def _neg_log_prob(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log p(target | h) per image, summed over bands of image rows.

        The output head (gain, bias, 1x1 conv, DMoL) is per pixel, so bands of
        rows are independent: with checkpointing each band is recomputed on
        its own in the backward pass and neither the DMoL parameters nor the
        likelihood's intermediates of the whole image are ever stored. The
        bands are the same with and without checkpointing, so the sums are.
        """
        rows = max(1, _LIKELIHOOD_BAND_PIXELS // h.shape[3])
        checkpointed = self._likelihood_checkpointed and torch.is_grad_enabled()
        total = 0
        for start in range(0, h.shape[2], rows):
            band = (h[:, :, start:start + rows], target[:, start:start + rows])
            if checkpointed:
                total = total + checkpoint(self._head_neg_log_prob, *band,
                                           use_reentrant=self._checkpoint_reentrant)
            else:
                total = total + self._head_neg_log_prob(*band)
        return total

    # -- sampling ----------------------------------------------------------------------

    def _temperatures(self, temperature: Temperature) -> list[float | None]:
        n = self.config.num_latent_groups
        if temperature is None or isinstance(temperature, (int, float)):
            temps = [temperature] * n
        else:
            temps = list(temperature)
        if len(temps) != n:
            raise ValueError(f"got {len(temps)} temperatures; this model has {n} latent groups "
                             "(one temperature, or one per decoder block)")
        if any(t is not None and t < 0 for t in temps):
            raise ValueError(f"temperatures must be >= 0 (0: the prior mean), got {temperature}")
        return temps

    @torch.no_grad()
    def sample(self, n: int, temperature: Temperature = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n unconditional samples, uint8 (n, H, W, 3); temperature scales every prior std."""
        params = self.decoder.sample(n, self._temperatures(temperature), generator=generator)
        return to_uint8(dmol_sample(params, generator))

    @torch.no_grad()
    def sample_from_latents(self, images: torch.Tensor, num_groups: int, temperature: Temperature = 0.1,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """Keep the first `num_groups` latent groups of `images` (posterior), sample the rest.

        The paper's figures: with num_groups small the samples share only the
        coarse structure of the image; with num_groups large they reconstruct it.
        The official grids use temperature 0.1 for the sampled groups.
        """
        if not 0 <= num_groups <= self.config.num_latent_groups:
            raise ValueError(f"num_groups={num_groups}: must be in [0, {self.config.num_latent_groups}]")
        inp, _ = self.preprocess(images)
        acts = self.encoder(inp.to(self.decoder.activation_dtype())) if num_groups else None
        params = self.decoder.sample(images.shape[0], self._temperatures(temperature), acts,
                                     num_posterior=num_groups, generator=generator)
        return to_uint8(dmol_sample(params, generator))

    # -- compilation ---------------------------------------------------------------------

    def compile_blocks(self, **options) -> None:
        """Compile the blocks' arithmetic with `torch.compile(**options)`, in place.

        Compiled, in the training step (gradients on): each encoder block's
        residual branch, each decoder block's posterior step (posterior,
        prior, KL, reparameterisation, latent injection, residual block) and
        the output head with its likelihood. With gradients off (evaluation,
        sampling, the first pass of reentrant checkpointing) the same code
        runs eagerly: no graphs for other batch sizes and grad modes (an
        evaluation's last, shorter batch would be one more per kind) for
        work that is a small part of a run.

        Eager always: a decoder block's input (the upsampled lower resolution) and
        its noise, drawn before the step, so that a compiled model consumes the
        random stream as an eager one does (same seed, same z: loss and
        gradients agree with eager ones to float rounding), and the encoder's
        pooling; so blocks of one resolution share their compiled graphs (their
        parameters are graph inputs). Each graph compiles on first use: the
        first step is slow (cifar10 batch 8 on 2 CPU cores: 129 s, 24 s with
        a warm inductor cache). Static shapes unless `dynamic` is passed.
        Parameters, their names and `state_dict()` are untouched; a deepcopy
        (an EMA copy) is compiled too. Works with activation checkpointing,
        reentrant or not.
        Raises dynamo's per-function recompile limit to the number of graphs
        this model can need, if it is lower.

        ZeRO-3 gains little: DeepSpeed's per-module parameter hooks are
        `torch.compiler.disable`d, so every submodule call inside a compiled
        step is a graph break; the run config refuses compile=true there.
        Compile with ZeRO stage 0-2, or use DeepSpeed's own compiler
        integration at stage 3.
        """
        setting = tuple(sorted({"dynamic": False, **options}.items()))
        kinds = [{(b.res, b.c2.kernel_size) for b in self.encoder.enc_blocks},
                 {b.res for b in self.decoder.dec_blocks}]
        needed = 2 * max(len(k) for k in kinds) + 2  # a graph per kind (training only), with room
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)
        for block in [*self.encoder.enc_blocks, *self.decoder.dec_blocks]:
            block.compile_options = setting
        self._head_compile_options = setting

    # -- memory ------------------------------------------------------------------------

    def set_activation_checkpointing(self, policy: str | int = "none", use_reentrant: bool = False) -> int:
        """Recompute blocks in the backward pass instead of storing their activations.

        policy: "none"; "all" (every encoder and decoder block and the
        likelihood); or a resolution R (int or digit string): every block
        at R px or more, and the likelihood when R <= image_size.
        Consecutive blocks at one resolution are checkpointed in pairs
        (see `_checkpoint_groups`): half the stored block outputs, the same
        recomputation.
        Returns the number of checkpointed blocks. Results are identical to
        no checkpointing: the RNG state is restored for the recomputation.
        """
        min_res = parse_checkpoint_policy(policy)
        count = 0
        modules = [*self.encoder.enc_blocks, *self.decoder.dec_blocks]
        for module in modules:
            module.checkpointed = min_res is not None and module.res >= min_res
            module.checkpoint_reentrant = use_reentrant
            count += module.checkpointed
        self.encoder.groups = _checkpoint_groups(list(self.encoder.enc_blocks), _CHECKPOINT_GROUP)
        self.decoder.groups = _checkpoint_groups(list(self.decoder.dec_blocks), _CHECKPOINT_GROUP)
        self._likelihood_checkpointed = min_res is not None and self.config.image_size >= min_res
        self._checkpoint_reentrant = use_reentrant
        return count


def parse_checkpoint_policy(policy: str | int) -> int | None:
    """'none' -> None; 'all' -> 0; a resolution (int or digits) -> that resolution."""
    if isinstance(policy, int) and not isinstance(policy, bool) and policy > 0:
        return policy
    if isinstance(policy, str):
        if policy == "none":
            return None
        if policy == "all":
            return 0
        if policy.isdigit() and int(policy) > 0:
            return int(policy)
    raise ValueError(f"activation checkpointing policy {policy!r}: use 'none', 'all', or a "
                     "resolution in pixels (checkpoint every block at or above it)")
