"""The paper's configurations (openai/vdvae `hps.py`), as typed dataclasses.

`ModelConfig` holds the architecture and the data constants the loss needs;
`PaperTraining` holds the optimisation numbers of the official runs. Both are
plain data: the pipeline composes them into its run config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

def parse_layer_string(spec: str) -> list[tuple[int, int | None]]:
    """Expand an official block string into `(resolution, mixin_or_down_rate)` pairs.

    Tokens: "32x21" (21 blocks at 32 px), "8m4" (a block at 8 px that mixes
    in the 4 px state), "16d2" (a block at 16 px that average-pools by 2),
    "1" (one block at 1 px).
    """
    layers: list[tuple[int, int | None]] = []
    for token in spec.split(","):
        token = token.strip()
        try:
            if "x" in token:
                res, count = token.split("x")
                layers += [(int(res), None)] * int(count)
            elif "m" in token:
                res, mixin = token.split("m")
                layers.append((int(res), int(mixin)))
            elif "d" in token:
                res, down = token.split("d")
                layers.append((int(res), int(down)))
            else:
                layers.append((int(token), None))
        except ValueError:
            raise ValueError(
                f"bad block token {token!r} in {spec!r}: expected RxN, RmS, RdK or R "
                "with integers (for example '32x21,32d2')"
            ) from None
    return layers


def parse_width_string(spec: str) -> dict[int, int]:
    """Parse the official `custom_width_str`, e.g. `"512:32,256:64"` -> {512: 32, 256: 64}."""
    widths: dict[int, int] = {}
    if not spec:
        return widths
    for token in spec.split(","):
        try:
            res, width = token.split(":")
            widths[int(res)] = int(width)
        except ValueError:
            raise ValueError(
                f"bad width token {token!r} in {spec!r}: expected RES:WIDTH (for example '512:32')"
            ) from None
    return widths


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one VDVAE and the data constants of its loss."""

    image_size: int
    """Side of the square input image in pixels."""
    width: int
    """Channels of the residual stream (and of the final gain/bias and output conv)."""
    enc_blocks: str
    """Encoder block string, bottom-up (official `enc_blocks`)."""
    dec_blocks: str
    """Decoder block string, top-down (official `dec_blocks`)."""
    custom_widths: str = ""
    """Per-resolution widths overriding `width` (official `custom_width_str`)."""
    zdim: int = 16
    """Latent channels per decoder block."""
    bottleneck_multiple: float = 0.25
    """Bottleneck width of every block as a fraction of its resolution's width."""
    num_mixtures: int = 10
    """Components of the discretised mixture of logistics."""
    no_bias_above: int = 64
    """Learned bias inputs exist only at decoder resolutions at or below this."""
    bits: int = 8
    """Bits per sub-pixel of the likelihood: 8, or 5 (ffhq256: target floor(x/8)*8, bin 1/31)."""
    input_shift: float = -127.5
    """Input normalisation `(x / input_divisor + input_shift) * input_scale`."""
    input_scale: float = 1 / 127.5
    input_divisor: float = 1.0
    """255 where the official code fed images in [0, 1] (ffhq1024), else 1."""

    def __post_init__(self) -> None:
        if self.bits not in (5, 8):
            raise ValueError(f"bits={self.bits}: only 8-bit and 5-bit likelihoods exist (8 or 5)")
        for name in ("image_size", "width", "zdim", "num_mixtures"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if not 0 < self.bottleneck_multiple <= 1:
            raise ValueError(f"bottleneck_multiple={self.bottleneck_multiple} must be in (0, 1]")
        self._check_block_strings()

    # -- derived ---------------------------------------------------------------

    def width_at(self, res: int) -> int:
        return parse_width_string(self.custom_widths).get(res, self.width)

    @property
    def encoder_layers(self) -> list[tuple[int, int | None]]:
        return parse_layer_string(self.enc_blocks)

    @property
    def decoder_layers(self) -> list[tuple[int, int | None]]:
        return parse_layer_string(self.dec_blocks)

    @property
    def decoder_resolutions(self) -> list[int]:
        return sorted({res for res, _ in self.decoder_layers})

    @property
    def num_latent_groups(self) -> int:
        """One latent group (zdim channels) per decoder block."""
        return len(self.decoder_layers)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def _check_block_strings(self) -> None:
        enc = self.encoder_layers
        res = self.image_size
        encoder_resolutions = {res}
        for block_res, down in enc:
            if block_res != res:
                raise ValueError(
                    f"enc_blocks {self.enc_blocks!r}: a block at {block_res} px follows "
                    f"activations at {res} px; resolutions must start at image_size="
                    f"{self.image_size} and change only through 'RdK' blocks"
                )
            if down is not None:
                if down <= 0 or res % down:
                    raise ValueError(f"enc_blocks: {block_res}d{down} does not divide {res} px")
                res //= down
            encoder_resolutions.add(res)
        dec = self.decoder_layers
        seen: set[int] = set()
        for block_res, mixin in dec:
            if block_res not in encoder_resolutions:
                raise ValueError(
                    f"dec_blocks {self.dec_blocks!r}: no encoder activations at {block_res} px "
                    f"(encoder has {sorted(encoder_resolutions)})"
                )
            if mixin is not None and (mixin not in seen or block_res % mixin):
                raise ValueError(
                    f"dec_blocks: {block_res}m{mixin} mixes in {mixin} px, which no earlier "
                    "block produced or which does not divide the resolution"
                )
            if block_res not in seen and mixin is None and block_res > self.no_bias_above:
                raise ValueError(
                    f"dec_blocks: the first block at {block_res} px has neither a learned "
                    f"bias input (no_bias_above={self.no_bias_above}) nor a mixin"
                )
            seen.add(block_res)
        if dec[-1][0] != self.image_size:
            raise ValueError(
                f"dec_blocks must end at image_size={self.image_size} px, ends at {dec[-1][0]} px"
            )


@dataclass(frozen=True)
class PaperTraining:
    """The optimisation settings of the official runs (README and `hps.py`)."""

    batch_per_gpu: int
    num_gpus: int
    lr: float
    grad_clip: float
    skip_threshold: float
    ema_rate: float
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.9)
    warmup_iters: int = 100
    sample_temperatures: tuple[float, ...] = (1.0, 0.9, 0.8)
    """Temperatures of the official sample grids (`num_temperatures_visualize`)."""
    num_variables_visualize: int = 6
    """How many 'keep the first k latent groups' rows the official grids show."""


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    training: PaperTraining
    official_num_params: int | None = None
    """Parameter count of the official model built from the same hps."""
    official_test_bpd: float | None = None
    """The released checkpoint's test bits/dim (README of openai/vdvae; ffhq256 on 5-bit images)."""


_CIFAR10 = ModelConfig(
    image_size=32,
    width=384,
    enc_blocks="32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
    dec_blocks="1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21",
    input_shift=-120.63838,
    input_scale=1 / 64.16736,
)
_IMAGENET32 = ModelConfig(
    image_size=32,
    width=512,
    enc_blocks="32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6",
    dec_blocks="1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40",
    input_shift=-116.2373,
    input_scale=1 / 69.37404,
)
_IMAGENET64 = ModelConfig(
    image_size=64,
    width=512,
    enc_blocks="64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5",
    dec_blocks="1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12",
    input_shift=-115.92961967,
    input_scale=1 / 69.37404,
)
_FFHQ256 = ModelConfig(
    image_size=256,
    width=512,
    enc_blocks="256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4",
    dec_blocks="1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128",
    bits=5,
    input_shift=-112.8666757481,
    input_scale=1 / 69.84780273,
)
_FFHQ1024 = ModelConfig(
    image_size=1024,
    width=16,
    custom_widths="512:32,256:64,128:512,64:512,32:512,16:512,8:512,4:512,1:512",
    enc_blocks=(
        "1024x1,1024d2,512x3,512d2,256x5,256d2,128x7,128d2,64x10,64d2,32x14,32d2,"
        "16x7,16d2,8x5,8d2,4x5,4d4,1x4"
    ),
    dec_blocks=(
        "1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x20,64m32,64x14,128m64,128x7,256m128,"
        "256x2,512m256,1024m512"
    ),
    num_mixtures=2,
    input_divisor=255.0,
    input_shift=-0.4387,
    input_scale=1 / 0.2743,
)

PRESETS: dict[str, Preset] = {
    "cifar10": Preset(
        "cifar10",
        _CIFAR10,
        PaperTraining(16, 2, 2e-4, 200.0, 400.0, 0.9999),
        official_num_params=39_145_700,
        official_test_bpd=2.87,
    ),
    "imagenet32": Preset(
        "imagenet32",
        _IMAGENET32,
        PaperTraining(8, 32, 1.5e-4, 200.0, 300.0, 0.999),
        official_test_bpd=3.80,
    ),
    "imagenet64": Preset(
        "imagenet64",
        _IMAGENET64,
        PaperTraining(4, 32, 1.5e-4, 220.0, 380.0, 0.999),
        official_num_params=125_005_860,
        official_test_bpd=3.52,
    ),
    "ffhq256": Preset(
        "ffhq256",
        _FFHQ256,
        PaperTraining(
            1, 32, 1.5e-4, 130.0, 180.0, 0.999,
            sample_temperatures=(1.0,), num_variables_visualize=3,
        ),
        official_num_params=114_874_852,
        official_test_bpd=0.61,
    ),
    "ffhq1024": Preset(
        "ffhq1024",
        _FFHQ1024,
        PaperTraining(
            1, 32, 7e-5, 360.0, 500.0, 0.999,
            sample_temperatures=(1.0, 0.9, 0.8, 0.7), num_variables_visualize=0,
        ),
        official_num_params=109_366_904,
        official_test_bpd=2.42,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
