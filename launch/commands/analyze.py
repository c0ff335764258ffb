"""`vdvae analyze`: where a model's information sits, latent group by latent group (collapse check)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from data_prep.storage import LocalStore
from pipeline.images import save_png
from pipeline.latents import ACTIVE_NATS_PER_IMAGE, LatentUsage
from pipeline.stream import ShardStream

from .models import PRESET_NAMES, SOURCE_HELP

PLOT_NAME, JSON_NAME = "cumulative_information.png", "latents.json"


def _cmd_analyze(args: argparse.Namespace) -> int:
    # pipeline.export reads run folders through DeepSpeed's consolidation, and pipeline.evaluate
    # pulls in tensorboard (through metrics): seconds to import, which `vdvae --help` needs none of.
    from pipeline.evaluate import evaluate
    from pipeline.export import load_model

    if args.batches is not None and args.batches < 1:
        raise ValueError(f"--batches {args.batches}: must be at least 1")
    model, preset = load_model(args.source, args.preset, args.weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    url = f"{args.data.rstrip('/')}/{args.split}"
    stream = ShardStream(url, args.batch, train=False, workers=args.workers)
    batches = stream if args.batches is None else itertools.islice(stream, args.batches)
    result = evaluate(model, batches, device, args.seed, per_group=True)
    if result.images == 0:
        raise ValueError(f"{url}: no images evaluated")
    usage = LatentUsage.of(result.per_group_rate, model.config, args.threshold)
    report = {
        "source": str(args.source),
        "preset": preset,
        "data": args.data,
        "split": args.split,
        "images": result.images,
        "unreadable": result.unreadable,
        "batches": args.batches,
        "seed": args.seed,
        "elbo_nats_per_dim": result.elbo,
        "bpd": result.bpd,
        **usage.to_json(),
    }
    out = Path(args.out)
    save_png(usage.cumulative_plot(), out / PLOT_NAME)
    LocalStore(out).write_bytes(JSON_NAME, (json.dumps(report, indent=1) + "\n").encode())
    fractions = usage.cumulative_fraction
    half = next((i + 1 for i, f in enumerate(fractions) if f >= 0.5), None)
    by_res = ", ".join(f"{res}px {rate:.4g}" for res, rate in usage.rate_by_resolution().items())
    print(f"{args.split}: {result.bpd:.4f} bits/dim on {result.images} images; "
          f"{usage.active_groups} of {len(fractions)} latent groups active (KL > {usage.threshold:g} nats/image)")
    print(f"rate by resolution (nats/dim): {by_res}"
          + (f"; half the rate in the first {half} groups" if half else ""))
    print(f"-> {out / PLOT_NAME}, {out / JSON_NAME}")
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number")
    return value


def add_commands(sub) -> None:
    p = sub.add_parser(
        "analyze", help="latent usage of a model on a split: KL per latent group, active groups, plot",
        description="Evaluate " + SOURCE_HELP + " on a prepared split (or its first --batches batches) and "
                    f"write OUT/{PLOT_NAME} (the cumulative fraction of the total rate carried by the "
                    f"first k latent groups, top-down, resolutions marked) and OUT/{JSON_NAME} (each "
                    "group's KL in nats per image and per dimension, its resolution, whether it is "
                    "active, the per-resolution sums, the cumulative fractions).")
    p.add_argument("source", help=SOURCE_HELP)
    p.add_argument("--data", required=True, help="the prepared dataset (s3://... or a folder)")
    p.add_argument("--split", default="valid", help="default: %(default)s")
    p.add_argument("--batches", type=int, help="only the first N batches (default: the whole split)")
    p.add_argument("--out", required=True, help="folder for the two files")
    p.add_argument("--preset", choices=PRESET_NAMES, help="the preset of an official checkpoint")
    p.add_argument("--batch", type=int, default=16, help="images per batch (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="reader processes (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="of the latent noise (default %(default)s)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="of a run folder (default %(default)s)")
    p.add_argument("--threshold", type=_positive, default=ACTIVE_NATS_PER_IMAGE,
                   help="a group is active when its mean KL exceeds this many nats per image "
                        "(default %(default)s)")
    p.set_defaults(func=_cmd_analyze)
