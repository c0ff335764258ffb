"""The VDVAE on tiny configs: loss, likelihood maths, checkpointing, bf16, sampling."""

import copy
import math

import numpy as np
import pytest
import torch

from model import VDVAE, dmol_nll, gaussian_kl, get_preset, vdvae
from model.likelihood import dmol_sample


def seeded_model(config, seed=0):
    torch.manual_seed(seed)
    return VDVAE(config)


def loss_and_grads(model, images, seed=1):
    torch.manual_seed(seed)
    out = model(images)
    model.zero_grad(set_to_none=True)
    out.elbo.backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters()}


# -- loss API ------------------------------------------------------------------------------

def test_elbo_terms_add_up(tiny_config, images):
    out = seeded_model(tiny_config)(images)
    assert torch.allclose(out.elbo, out.distortion + out.rate)
    assert torch.allclose(out.bpd, out.elbo / math.log(2))
    assert out.per_image_elbo.shape == (4,)
    assert torch.allclose(out.per_image_elbo.mean(), out.elbo)
    assert out.per_group_rate.shape == (tiny_config.num_latent_groups,)
    assert torch.allclose(out.per_group_rate.sum(), out.rate, rtol=1e-5)
    assert (out.per_group_rate >= 0).all()


def test_elbo_finite_and_decreasing(tiny_config):
    # Smooth gradients: learnable structure, unlike uniform noise (5.55 nats/dim at best).
    ramp = torch.linspace(0, 255, 8)
    images = torch.stack([
        (ramp.view(8, 1, 1) * torch.tensor([1.0, 0.5, 0.2]) + 40 * k).clamp(0, 255).expand(8, 8, 3)
        for k in range(4)]).to(torch.uint8)
    model = seeded_model(tiny_config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.9))
    losses = []
    for step in range(30):
        torch.manual_seed(step)
        loss = model(images).elbo
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


def test_bad_images_are_refused(tiny_config):
    model = seeded_model(tiny_config)
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="8x8 images"):
        model(torch.zeros(1, 16, 16, 3, dtype=torch.uint8))


@pytest.mark.parametrize("name", ["cifar10", "ffhq256", "ffhq1024"])
def test_preprocessing_matches_the_official_formulas(name):
    cfg = get_preset(name).model
    pixels = torch.tensor([0, 7, 8, 128, 255], dtype=torch.uint8)
    images = pixels.view(1, 1, 5, 1).expand(1, cfg.image_size, 5, 3)
    images = torch.nn.functional.pad(images, (0, 0, 0, cfg.image_size - 5)).contiguous()
    inp, target = VDVAE.preprocess(type("M", (), {"config": cfg})(), images)
    x = pixels.double()
    if name == "ffhq1024":
        want_inp = (x / 255 - 0.4387) / 0.2743
        want_target = (x / 255 - 0.5) * 2
    else:
        want_inp = (x + cfg.input_shift) * cfg.input_scale
        grid = torch.floor(x / 8) * 8 if name == "ffhq256" else x
        want_target = (grid - 127.5) / 127.5
    assert torch.allclose(inp[0, 1, 0, :5].double(), want_inp, atol=1e-5)
    assert torch.allclose(target[0, 0, :5, 2].double(), want_target, atol=1e-6)
    if name == "ffhq256":  # 5-bit: 255 -> 248 -> 0.945..., never the open top bin
        assert target[0, 0, 4, 0].item() == pytest.approx((248 - 127.5) / 127.5)


# -- likelihood maths against independent references ---------------------------------------

def reference_dmol_nll(params, target, bits):
    """Per-pixel loop over the definition: mixture of discretised logistics, open end bins."""
    params, target = params.double().numpy(), target.double().numpy()
    n, h, w, _ = target.shape
    m = params.shape[-1] // 10
    half = 1 / 31 if bits == 5 else 1 / 255
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    out = np.zeros(n)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                p = params[b, i, j]
                logits = p[:m]
                rest = p[m:].reshape(3, 3 * m)
                log_mix = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
                total = []
                for k in range(m):
                    x = target[b, i, j]
                    mu = rest[:, k].copy()
                    c = np.tanh(rest[:, 2 * m + k])
                    mu[1] += c[0] * x[0]
                    mu[2] += c[1] * x[0] + c[2] * x[1]
                    s = np.exp(np.maximum(rest[:, m + k], -7))
                    lp = log_mix[k]
                    for ch in range(3):
                        upper = 1.0 if x[ch] > 0.999 else sig((x[ch] + half - mu[ch]) / s[ch])
                        lower = 0.0 if x[ch] < -0.999 else sig((x[ch] - half - mu[ch]) / s[ch])
                        lp += np.log(upper - lower)
                    total.append(lp)
                total = np.array(total)
                out[b] -= total.max() + np.log(np.exp(total - total.max()).sum())
    return out / (h * w * 3)


@pytest.mark.parametrize("bits", [8, 5])
def test_dmol_matches_reference(bits):
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(2, 3, 3, 30, generator=gen)
    params[..., 3:] *= 0.5
    levels = torch.randint(0, 256, (2, 3, 3, 3), generator=gen).double()
    levels[0, 0, 0] = 0.0
    levels[0, 0, 1] = 255.0  # both open-ended bins
    if bits == 5:
        levels = torch.floor(levels / 8) * 8
    target = ((levels - 127.5) / 127.5).float()
    got = dmol_nll(params, target, bits).double().numpy()
    assert np.allclose(got, reference_dmol_nll(params, target, bits), rtol=1e-5, atol=1e-6)


def test_gaussian_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mq, mp, lq, lp = torch.randn(4, 5, 6, generator=gen)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mq, lq.exp()),
                                             torch.distributions.Normal(mp, lp.exp()))
    assert torch.allclose(gaussian_kl(mq, mp, lq, lp), want, atol=1e-5)


# -- activation checkpointing ---------------------------------------------------------------

@pytest.mark.parametrize("policy, reentrant", [("all", False), ("all", True), ("8", False), (4, True)])
def test_checkpointing_gives_identical_loss_and_gradients(tiny_config, images, policy, reentrant):
    model = seeded_model(tiny_config)
    base, base_grads = loss_and_grads(model, images)
    count = model.set_activation_checkpointing(policy, use_reentrant=reentrant)
    assert count == {"all": 11, "8": 5, 4: 9}[policy]  # 6 encoder + 5 decoder blocks
    ckpt, ckpt_grads = loss_and_grads(model, images)
    assert torch.equal(base.elbo, ckpt.elbo)
    assert torch.equal(base.per_group_rate, ckpt.per_group_rate)
    for name, grad in base_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], rtol=1e-6, atol=1e-7), name


def describe_groups(groups):
    return [[(b.res, getattr(b, "down_rate", None) or getattr(b, "mixin", None)) for b in g] for g in groups]


def test_checkpoint_groups_never_hide_an_activation(tiny_config):
    model = seeded_model(tiny_config.replace(enc_blocks="8x4,8d2,4x1,4d4,1x1",
                                             dec_blocks="1x1,4m1,4x1,8m4,8x4"))
    assert describe_groups(model.encoder.groups) == [[(8, None)]] * 4 + [[(8, 2)], [(4, None)], [(4, 4)], [(1, None)]]
    model.set_activation_checkpointing("all")
    # up to three blocks at one resolution; a down-sampling block alone (the decoder
    # reads the activation before it); a mix-in block only first in its group
    assert describe_groups(model.encoder.groups) == [
        [(8, None)] * 3, [(8, None)], [(8, 2)], [(4, None)], [(4, 4)], [(1, None)]]
    assert describe_groups(model.decoder.groups) == [
        [(1, None)], [(4, 1), (4, None)], [(8, 4), (8, None), (8, None)], [(8, None), (8, None)]]
    model.set_activation_checkpointing(8)  # only blocks at 8 px: lower ones stay ungrouped
    assert describe_groups(model.decoder.groups)[:3] == [[(1, None)], [(4, 1)], [(4, None)]]


def test_likelihood_bands_sum_to_the_whole_image(tiny_config, images, monkeypatch):
    """Large images evaluate the output head in bands of rows; the sum is the same likelihood."""
    model = seeded_model(tiny_config)
    whole, whole_grads = loss_and_grads(model, images)
    monkeypatch.setattr("model.vdvae._LIKELIHOOD_BAND_PIXELS", 24)  # 3 rows per band: 3 + 3 + 2
    banded, banded_grads = loss_and_grads(model, images)
    assert torch.allclose(whole.per_image_elbo, banded.per_image_elbo, rtol=1e-6)
    for name, grad in whole_grads.items():
        assert torch.allclose(grad, banded_grads[name], rtol=1e-5, atol=1e-7), name
    model.set_activation_checkpointing("all")
    ckpt, _ = loss_and_grads(model, images)
    assert torch.equal(banded.per_image_elbo, ckpt.per_image_elbo)


def test_checkpoint_policy_is_validated(tiny_config):
    model = seeded_model(tiny_config)
    for bad in ("some", "-4", 0, True, "64px"):
        with pytest.raises(ValueError, match="'none', 'all', or a resolution"):
            model.set_activation_checkpointing(bad)


# -- mixed precision -------------------------------------------------------------------------

@pytest.mark.parametrize("fill", [None, 0, 255])
def test_bf16_autocast_is_finite(tiny_config, images, fill):
    if fill is not None:
        images = torch.full_like(images, fill)
    model = seeded_model(tiny_config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert out.elbo.dtype == torch.float32  # likelihood and KL in fp32
    out.elbo.backward()
    assert torch.isfinite(out.elbo)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_close_to_fp32(tiny_config, images):
    model = seeded_model(tiny_config)
    torch.manual_seed(1)
    fp32 = model(images).elbo
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(images).elbo
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.05)


def test_bf16_losses_within_1e2_of_fp32(tiny_config, images):
    """The same batch and latent noise: bf16 autocast's terms within 1e-2 relative of fp32's."""
    model = seeded_model(tiny_config)
    torch.manual_seed(1)
    fp32 = model(images)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(images)
    assert bf16.elbo.item() == pytest.approx(fp32.elbo.item(), rel=1e-2)
    assert bf16.distortion.item() == pytest.approx(fp32.distortion.item(), rel=1e-2)
    assert torch.allclose(bf16.per_image_elbo, fp32.per_image_elbo, rtol=1e-2)


@pytest.mark.parametrize("scale", [1e2, 1e4])
@pytest.mark.parametrize("bits", [8, 5])
def test_dmol_saturated_outputs_stay_finite(scale, bits):
    gen = torch.Generator().manual_seed(0)
    params = (torch.randn(2, 4, 4, 20, generator=gen) * scale).requires_grad_()
    levels = torch.tensor([0.0, 255.0, 128.0, 3.0]).view(1, 1, 4, 1).expand(2, 4, 4, 3)
    loss = dmol_nll(params, (levels - 127.5) / 127.5, bits).mean()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(params.grad).all()
    with torch.no_grad():
        assert torch.isfinite(dmol_sample(params.detach())).all()


# -- sampling --------------------------------------------------------------------------------

def test_samples_shape_dtype_and_determinism(tiny_config):
    model = seeded_model(tiny_config)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial prior and output
            p.add_(0.1 * torch.randn_like(p))
    a = model.sample(3, 1.0, generator=torch.Generator().manual_seed(7))
    b = model.sample(3, 1.0, generator=torch.Generator().manual_seed(7))
    c = model.sample(3, 1.0, generator=torch.Generator().manual_seed(8))
    assert a.shape == (3, 8, 8, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    per_layer = model.sample(2, [0.5] * tiny_config.num_latent_groups,
                             generator=torch.Generator().manual_seed(7))
    assert per_layer.shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="one per decoder block"):
        model.sample(2, [0.5, 0.6])
    with pytest.raises(ValueError, match=">= 0"):
        model.sample(2, -1.0)
    # temperature 0 takes the prior means: only the pixel sampling is random
    zero_a = model.decoder.sample(2, [0.0] * tiny_config.num_latent_groups)
    zero_b = model.decoder.sample(2, [0.0] * tiny_config.num_latent_groups)
    assert torch.equal(zero_a, zero_b)


def test_sample_from_latents(tiny_config, images):
    model = seeded_model(tiny_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    groups = tiny_config.num_latent_groups
    for k in (0, 2, groups):
        out = model.sample_from_latents(images, k, generator=torch.Generator().manual_seed(3))
        assert out.shape == images.shape and out.dtype == torch.uint8
    torch.manual_seed(5)
    a = model.sample_from_latents(images, 2, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    b = model.sample_from_latents(images, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="num_groups"):
        model.sample_from_latents(images, groups + 1)


# -- 1x1 conv forms -------------------------------------------------------------------------

@pytest.fixture
def conv1x1_form():
    """Set the 1x1 conv form for one test; the machine's own choice again after it."""
    yield vdvae.set_conv1x1_form
    vdvae.set_conv1x1_form(None)


def test_both_1x1_forms_give_the_official_result(tiny_config, images, conv1x1_form):
    """Whichever form a machine uses (matmul over pixel rows, or oneDNN's convolution), the loss
    and gradients are the same within fp32 rounding, and activations stay channels last."""
    model = seeded_model(tiny_config)
    with torch.no_grad():  # non-zero biases and last layers, as a trained model has them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    results, layouts = {}, {}
    for form in vdvae.CONV1X1_FORMS:
        conv1x1_form(form)
        assert vdvae.conv1x1_form("cpu") == form
        seen = []
        hooks = [m.register_forward_hook(lambda m, args, out: seen.append(out.is_contiguous(
            memory_format=torch.channels_last))) for m in model.modules() if isinstance(m, vdvae._Conv1x1)]
        results[form] = loss_and_grads(model, images)
        for hook in hooks:
            hook.remove()
        layouts[form] = seen
    (matmul, matmul_grads), (conv, conv_grads) = results["matmul"], results["conv"]
    assert layouts["conv"] and all(layouts["conv"]) and all(layouts["matmul"])
    assert torch.allclose(matmul.per_image_elbo, conv.per_image_elbo, rtol=1e-6)
    for name, grad in matmul_grads.items():
        assert torch.allclose(conv_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_unknown_1x1_form_is_refused(conv1x1_form):
    with pytest.raises(ValueError, match="'matmul', 'conv'"):
        conv1x1_form("winograd")


# -- compilation -----------------------------------------------------------------------------

@pytest.mark.parametrize("form", vdvae.CONV1X1_FORMS)
def test_compiled_blocks_match_eager(tiny_config, images, conv1x1_form, form):
    """Compiled blocks (dynamo and AOTAutograd, eager kernels: the graphs that inductor would
    compile) give the same loss and gradients as eager, with and without checkpointing, with
    the 1x1 convs in either form.

    One compilation serves both: non-reentrant checkpointing replays the
    same graphs. No graph breaks; parameter names and copies unaffected.
    Inductor's kernels: test_gpu_ready's compile=true run, checkpointed.
    """
    conv1x1_form(form)
    model = seeded_model(tiny_config)
    eager, eager_grads = loss_and_grads(model, images)
    keys = list(model.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile_blocks(backend="aot_eager")
    assert list(model.state_dict()) == keys
    compiled, compiled_grads = loss_and_grads(model, images)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    model.set_activation_checkpointing("all")
    checkpointed, checkpointed_grads = loss_and_grads(model, images)
    for out, grads in ((compiled, compiled_grads), (checkpointed, checkpointed_grads)):
        assert torch.allclose(out.per_image_elbo, eager.per_image_elbo, rtol=1e-5)
        assert torch.allclose(out.per_group_rate, eager.per_group_rate, rtol=1e-4, atol=1e-7)
        for name, grad in eager_grads.items():
            assert torch.allclose(grads[name], grad, rtol=1e-3, atol=1e-6), name
    assert copy.deepcopy(model).decoder.dec_blocks[0].compile_options is not None
