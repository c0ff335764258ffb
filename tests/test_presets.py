"""The presets hold the paper's numbers exactly (openai/vdvae hps.py, data.py, README)."""

import pytest
import torch

from model import PRESETS, VDVAE, ModelConfig, get_preset

# Independent restatement of ../shared/DESIGN.md, so a typo in presets.py fails here.
PAPER = {
    # name: (batch/GPU, GPUs, lr, grad_clip, skip, ema, mixtures, width)
    "cifar10": (16, 2, 2e-4, 200, 400, 0.9999, 10, 384),
    "imagenet32": (8, 32, 1.5e-4, 200, 300, 0.999, 10, 512),
    "imagenet64": (4, 32, 1.5e-4, 220, 380, 0.999, 10, 512),
    "ffhq256": (1, 32, 1.5e-4, 130, 180, 0.999, 10, 512),
    "ffhq1024": (1, 32, 7e-5, 360, 500, 0.999, 2, 16),
}
BLOCKS = {
    "cifar10": ("1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21",
                "32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3"),
    "imagenet32": ("1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40",
                   "32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6"),
    "imagenet64": ("1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12",
                   "64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5"),
    "ffhq256": ("1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128",
                "256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4"),
    "ffhq1024": ("1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x20,64m32,64x14,128m64,128x7,256m128,"
                 "256x2,512m256,1024m512",
                 "1024x1,1024d2,512x3,512d2,256x5,256d2,128x7,128d2,64x10,64d2,32x14,32d2,"
                 "16x7,16d2,8x5,8d2,4x5,4d4,1x4"),
}
NORMALISATION = {  # shift, 1/scale
    "imagenet32": (-116.2373, 69.37404),
    "imagenet64": (-115.92961967, 69.37404),
    "ffhq256": (-112.8666757481, 69.84780273),
    "cifar10": (-120.63838, 64.16736),
    "ffhq1024": (-0.4387, 0.2743),
}
OFFICIAL_PARAMS = {
    "cifar10": 39_145_700,
    "ffhq256": 114_874_852,
    "imagenet64": 125_005_860,
    "ffhq1024": 109_366_904,
}


def build_meta(config: ModelConfig) -> VDVAE:
    with torch.device("meta"):
        return VDVAE(config)


def test_all_five_presets_exist():
    assert set(PRESETS) == set(PAPER)


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_training_numbers(name):
    p = get_preset(name)
    batch, gpus, lr, clip, skip, ema, mixtures, width = PAPER[name]
    t = p.training
    assert (t.batch_per_gpu, t.num_gpus, t.lr, t.grad_clip, t.skip_threshold, t.ema_rate) == (
        batch, gpus, lr, clip, skip, ema)
    assert (t.weight_decay, t.adam_betas, t.warmup_iters) == (0.01, (0.9, 0.9), 100)
    assert (p.model.num_mixtures, p.model.width) == (mixtures, width)
    assert (p.model.zdim, p.model.bottleneck_multiple, p.model.no_bias_above) == (16, 0.25, 64)


@pytest.mark.parametrize("name", list(PAPER))
def test_block_strings_and_normalisation(name):
    cfg = get_preset(name).model
    assert (cfg.dec_blocks, cfg.enc_blocks) == BLOCKS[name]
    shift, inv_scale = NORMALISATION[name]
    assert cfg.input_shift == shift
    assert cfg.input_scale == pytest.approx(1 / inv_scale, rel=1e-15)
    assert cfg.bits == (5 if name == "ffhq256" else 8)
    assert cfg.input_divisor == (255.0 if name == "ffhq1024" else 1.0)


def test_ffhq1024_per_resolution_widths():
    cfg = get_preset("ffhq1024").model
    assert [cfg.width_at(r) for r in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 1)] == [
        16, 32, 64, 512, 512, 512, 512, 512, 512, 512]


@pytest.mark.parametrize("name", list(PAPER))
def test_parameter_counts_equal_the_official_model(name):
    n = sum(p.numel() for p in build_meta(get_preset(name).model).parameters())
    if name in OFFICIAL_PARAMS:
        assert n == OFFICIAL_PARAMS[name] == get_preset(name).official_num_params
    else:  # imagenet32: the README states "119M"
        assert round(n / 1e6) == 119


def test_no_bias_inputs_above_64px():
    model = build_meta(get_preset("ffhq256").model)
    assert model.decoder.bias_resolutions == [1, 4, 8, 16, 32, 64]
    assert [tuple(b.shape) for b in model.decoder.bias_xs][-1] == (1, 512, 64, 64)


@pytest.mark.parametrize("name", list(PAPER))
def test_shapes_through_every_resolution(name):
    """Shape propagation of the real preset on the meta device (no memory, no FLOPs)."""
    cfg = get_preset(name).model
    model = build_meta(cfg)
    images = torch.zeros(2, cfg.image_size, cfg.image_size, 3, dtype=torch.uint8, device="meta")
    inp, target = model.preprocess(images)
    assert inp.shape == (2, 3, cfg.image_size, cfg.image_size)
    acts = {a.shape[2]: a for a in model.encoder(inp)}
    assert sorted(acts) == sorted({r for r, _ in cfg.decoder_layers} | {cfg.image_size})
    for res, act in acts.items():
        assert act.shape == (2, cfg.width_at(res), res, res), res
    h, kls = model.decoder(list(acts.values()))
    assert h.shape == (2, cfg.width, cfg.image_size, cfg.image_size)
    params = model.decoder.out_net(h)
    assert params.shape == (2, cfg.image_size, cfg.image_size, 10 * cfg.num_mixtures)
    assert kls.shape == (cfg.num_latent_groups, 2)


@pytest.mark.parametrize("bad, message", [
    (dict(enc_blocks="8x1,8d3"), "does not divide"),
    (dict(enc_blocks="4x1"), "must start at image_size"),
    (dict(dec_blocks="1x1,4m2,8m4"), "mixes in 2 px"),
    (dict(dec_blocks="1x1,4m1"), "must end at image_size"),
    (dict(dec_blocks="1x1,4y1"), "bad block token"),
    (dict(bits=6), "8 or 5"),
    (dict(custom_widths="8=3"), "bad width token"),
])
def test_bad_configs_name_the_problem(tiny_config, bad, message):
    with pytest.raises(ValueError, match=message):
        cfg = tiny_config.replace(**bad)
        cfg.width_at(8)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="cifar10, imagenet32"):
        get_preset("cifar100")
