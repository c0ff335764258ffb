"""Our VDVAE beside the official openai/vdvae model, in one process.

    python tests/benchmarks/official_compare.py --official-src PATH/TO/openai-vdvae \
        --preset cifar10 --batch 8 --steps 3

PATH/TO/openai-vdvae is a checkout of https://github.com/openai/vdvae (its
`vae.py` and `vae_helpers.py` are imported; nothing of it is part of this
project). The script builds the official model from the preset's hps,
copies its weights into ours through `load_official`, and prints one JSON
line with:
  - parameter counts and whether the state-dict keys and shapes agree;
  - ELBO, distortion and rate of both on the same images with the same seed
    (the latent noise is drawn in the same order, so they agree to float
    rounding), and the largest relative gradient difference;
  - our ELBO under bf16 autocast on the same images and noise, and its
    relative difference from our fp32 ELBO (whole batch and per image);
  - median train-step seconds of both, alternating, and their ratio: the
    official model in fp32 (it has no other mode), ours in --ours-dtype
    (fp32, or bf16 autocast).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import get_preset, load_official, official_state_dict  # noqa: E402
from model.official import to_official_names  # noqa: E402
from pipeline.runtime import active_allocator, reexec_with_fast_allocator  # noqa: E402


class _H(dict):
    __getattr__ = dict.get

    def __setattr__(self, key, value):
        self[key] = value


def official_hps(preset: str) -> _H:
    cfg = get_preset(preset).model
    return _H(
        width=cfg.width, custom_width_str=cfg.custom_widths, enc_blocks=cfg.enc_blocks,
        dec_blocks=cfg.dec_blocks, zdim=cfg.zdim, bottleneck_multiple=cfg.bottleneck_multiple,
        num_mixtures=cfg.num_mixtures, no_bias_above=cfg.no_bias_above, image_size=cfg.image_size,
        image_channels=3, dataset={"ffhq256": "ffhq_256", "ffhq1024": "ffhq_1024"}.get(preset, preset),
    )


def official_preprocess(images: torch.Tensor, preset: str):
    """openai/vdvae data.py preprocess_func, on a uint8 NHWC batch."""
    cfg = get_preset(preset).model
    x = images.float()
    if cfg.input_divisor != 1.0:  # ffhq1024 came through ToTensor: [0, 1]
        x = x / 255.0
        out = (x.clone() - 0.5) * 2.0
    else:
        out = x.clone()
        if cfg.bits == 5:
            out = torch.floor(out * (1.0 / 8.0)) * 8.0
        out = (out - 127.5) * (1.0 / 127.5)
    inp = (x + cfg.input_shift) * cfg.input_scale
    return inp, out


def step_time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-src", required=True, type=Path)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps each (0: no timing)")
    parser.add_argument("--ours-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--allocator", choices=["tcmalloc", "system"], default="tcmalloc")
    args = parser.parse_args()
    if args.allocator == "tcmalloc":
        reexec_with_fast_allocator()
    if not (args.official_src / "vae.py").is_file():
        raise SystemExit(f"{args.official_src}/vae.py not found: pass a checkout of openai/vdvae")
    sys.path.insert(0, str(args.official_src))
    import vae as official  # noqa: E402

    torch.manual_seed(0)
    theirs = official.VAE(official_hps(args.preset))
    ours = load_official(theirs.state_dict(), args.preset)
    cfg = ours.config
    images = torch.randint(0, 256, (args.batch, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
    inp, target = official_preprocess(images, args.preset)

    torch.manual_seed(1)
    stats_theirs = theirs(inp, target)
    stats_theirs["elbo"].backward()
    torch.manual_seed(1)
    stats_ours = ours(images)
    stats_ours.elbo.backward()
    grads_theirs = dict(theirs.named_parameters())
    max_rel_grad = max(
        ((p.grad - grads_theirs[k].grad).norm() / grads_theirs[k].grad.norm().clamp(min=1e-12)).item()
        for k, p in to_official_names(dict(ours.named_parameters())).items() if grads_theirs[k].grad.norm() > 0)

    # ours under bf16 autocast, the same images and latent noise, against the fp32 terms
    torch.manual_seed(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stats_bf16 = ours(images)

    def train_step(model, *batch, bf16=False):
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = model(*batch)
        (out["elbo"] if isinstance(out, dict) else out.elbo).backward()
        model.zero_grad(set_to_none=True)

    times_theirs, times_ours = [], []
    for _ in range(args.steps):
        times_theirs.append(step_time(lambda: train_step(theirs, inp, target)))
        times_ours.append(step_time(lambda: train_step(ours, images, bf16=args.ours_dtype == "bf16")))

    result = {
        "preset": args.preset, "batch": args.batch, "allocator": active_allocator(),
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "params_official": sum(p.numel() for p in theirs.parameters()),
        "same_keys_and_shapes": {k: v.shape for k, v in official_state_dict(ours).items()}
        == {k: v.shape for k, v in theirs.state_dict().items()},
        "elbo_ours": stats_ours.elbo.item(), "elbo_official": stats_theirs["elbo"].item(),
        "distortion_ours": stats_ours.distortion.item(),
        "distortion_official": stats_theirs["distortion"].item(),
        "rate_ours": stats_ours.rate.item(), "rate_official": stats_theirs["rate"].item(),
        "max_relative_grad_diff": max_rel_grad,
        "elbo_ours_bf16": stats_bf16.elbo.item(),
        "bf16_relative_elbo_diff": abs(stats_bf16.elbo.item() / stats_ours.elbo.item() - 1),
        "bf16_max_relative_per_image_elbo_diff":
            ((stats_bf16.per_image_elbo.float() / stats_ours.per_image_elbo - 1).abs().max().item()),
    }
    if args.steps:
        result.update({
            "ours_dtype": args.ours_dtype,
            "step_s_ours": round(statistics.median(times_ours), 3),
            "step_s_official": round(statistics.median(times_theirs), 3),
            "ratio_ours_over_official": round(statistics.median(times_ours) / statistics.median(times_theirs), 3),
        })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
