"""`vdvae presets | import-official | export | sample | eval`: the paper's presets and trained weights."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from model import PRESETS, VDVAE, get_preset
from pipeline.images import make_grid, save_png
from pipeline.stream import ShardStream
from pipeline.weights import load_official_file, save_weights

PRESET_NAMES = tuple(PRESETS)
SOURCE_HELP = ("a run folder (its latest checkpoint), one of our weights files (vdvae export, "
               "import-official), or an official *-model.th with --preset")


def _cmd_presets(args: argparse.Namespace) -> int:
    print(f"{'preset':<11} {'px':>5} {'params':>12} {'official':>12}  batch x GPUs  lr       "
          f"clip/skip  EMA     test bpd")
    for name, p in PRESETS.items():
        with torch.device("meta"):
            n = sum(t.numel() for t in VDVAE(p.model).parameters())
        t = p.training
        official = f"{p.official_num_params:,}" if p.official_num_params else "-"
        print(f"{name:<11} {p.model.image_size:>5} {n:>12,} {official:>12}  {t.batch_per_gpu:>5} x {t.num_gpus:<4}"
              f"  {t.lr:<8g} {t.grad_clip:g}/{t.skip_threshold:<5g} {t.ema_rate:<7g} {p.official_test_bpd}")
    return 0


def _cmd_import_official(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists; pass --overwrite to replace it")
    model = load_official_file(args.checkpoint, args.preset)
    save_weights(model, out, preset=args.preset)
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {args.checkpoint} as preset {args.preset} ({n:,} parameters) -> {out}")
    return 0


def _load_model(args: argparse.Namespace):
    # pipeline.export reads run folders through DeepSpeed's consolidation: imported by the commands
    # that need it, as deepspeed takes seconds to import and `vdvae --help` needs none of it.
    from pipeline.export import load_model

    return load_model(args.source, args.preset, args.weights)


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export  # (deepspeed: see _load_model)

    for path in export(args.run_dir, args.out, args.tag):
        print(path)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    model, preset = _load_model(args)
    model.eval()
    temperatures = [float(t) for t in args.temperatures.split(",")] if args.temperatures else \
        list(get_preset(preset).training.sample_temperatures if preset else (1.0,))
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        rows = [model.sample(args.num, t, generator=generator) for t in temperatures]
    save_png(make_grid(rows), args.out)
    print(f"{len(rows)} rows of {args.num} samples at temperatures {temperatures} -> {args.out}")
    return 0


# Pixels the decoder sees per pass by default in the importance-weighted bound (batch x chunk images).
_IMPORTANCE_PIXELS = 2**16


def _cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate, importance_weighted  # (tensorboard, through metrics: seconds to import)

    model, _ = _load_model(args)
    model.eval()
    url = f"{args.data.rstrip('/')}/{args.split}"
    stream = ShardStream(url, args.batch, train=False, workers=args.workers)
    result = evaluate(model, stream, torch.device("cpu"), args.seed)
    print(f"{args.split}: {result.bpd:.4f} bits/dim ({result.elbo:.4f} nats/dim) on {result.images} images"
          + (f", {result.unreadable} unreadable samples left out" if result.unreadable else ""), flush=True)
    k = args.importance_samples
    if k is not None:
        pixels = args.batch * model.config.image_size ** 2
        chunk = args.importance_chunk or max(1, min(k, _IMPORTANCE_PIXELS // pixels))
        stream = ShardStream(url, args.batch, train=False, workers=args.workers)
        iw = importance_weighted(model, stream, torch.device("cpu"), args.seed, k, chunk)
        print(f"{args.split}: K={k} importance-weighted NLL {iw.bpd:.4f} bits/dim ({iw.nll:.4f} nats/dim) "
              f"± {iw.stderr_bpd:.4f} (standard error over {iw.images} images), "
              f"{iw.seconds_per_image:.4g} s per image")
    return 0


def _at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def eval_arguments(p: argparse.ArgumentParser) -> None:
    """What `vdvae eval` and `vdvae submit eval` both take (all passed on as given: EVAL_OPTIONS)."""
    p.add_argument("source", help=SOURCE_HELP)
    p.add_argument("--data", required=True, help="the prepared dataset (s3://... or a folder)")
    p.add_argument("--split", default="test", help="default: %(default)s (ffhq has valid only)")
    p.add_argument("--preset", choices=PRESET_NAMES, help="the preset of an official checkpoint")
    p.add_argument("--batch", type=int, default=16, help="images per batch (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="reader processes (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="of the latent noise (default %(default)s)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="of a run folder (default %(default)s)")
    p.add_argument("--importance-samples", type=_at_least_one, metavar="K",
                   help="also the K-sample importance-weighted bound on the NLL (tighter than the ELBO "
                        "as K grows; each image's draws seeded by --seed and its key)")
    p.add_argument("--importance-chunk", type=_at_least_one, metavar="C",
                   help="draws per decoder pass for --importance-samples (memory grows with batch x C; "
                        "default: about 64k pixels per pass, at most K)")


EVAL_OPTIONS = ("split", "preset", "batch", "workers", "seed", "weights", "importance_samples", "importance_chunk")


def add_commands(sub) -> None:
    p = sub.add_parser("presets", help="list the paper's presets with parameter counts and settings",
                       description="List the paper's presets: resolution, parameter count (ours and "
                                   "the official model's), batch, lr, grad clip/skip threshold, EMA, "
                                   "and the released test bits/dim.")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser(
        "import-official", help="convert a released openai/vdvae checkpoint to our weights file",
        description="Convert an official *-model.th or *-model-ema.th state dict into our weights "
                    "file (state dict + model config). Fails, listing the differences, if the file "
                    "does not fit the preset. The file is read as tensors only: nothing in it can run.")
    p.add_argument("checkpoint", help="path of the official *-model.th / *-model-ema.th file")
    p.add_argument("--preset", required=True, choices=PRESET_NAMES)
    p.add_argument("--out", required=True, help="path of the weights file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser("export", help="whole fp32 model and EMA weights from a run, loadable without DeepSpeed",
                       description="Consolidate a run's checkpoint (ZeRO shards included) into model.pt and "
                                   "model-ema.pt (our weights format) and <preset>-model.th / "
                                   "<preset>-model-ema.th (the official key layout).")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True, help="folder for the four files")
    p.add_argument("--tag", help="checkpoint tag (default: latest), e.g. global_step5000")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("sample", help="a PNG grid of samples, one row per temperature",
                       description="Unconditional samples from " + SOURCE_HELP + ".")
    p.add_argument("source", help=SOURCE_HELP)
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--preset", choices=PRESET_NAMES, help="the preset of an official checkpoint")
    p.add_argument("--temperatures", help="comma-separated (default: the preset's)")
    p.add_argument("--num", type=int, default=8, help="samples per row (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="of a run folder (default %(default)s)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("eval", help="bits/dim of a model on a prepared split, every image once",
                       description="The test (or valid) bits/dim of " + SOURCE_HELP + ", on a split "
                                   "prepared by `vdvae prep`, with the number of images evaluated.")
    eval_arguments(p)
    p.set_defaults(func=_cmd_eval)


