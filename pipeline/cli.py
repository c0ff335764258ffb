"""The `vdvae` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_presets(args: argparse.Namespace) -> int:
    import torch

    from model import PRESETS, VDVAE

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
    from model import get_preset, load_official

    from .weights import save_weights

    get_preset(args.preset)  # unknown preset: fail before reading a large file
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists; pass --overwrite to replace it")
    model = load_official(args.checkpoint, args.preset)
    save_weights(model, out, preset=args.preset)
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {args.checkpoint} as preset {args.preset} ({n:,} parameters) -> {out}")
    return 0


def _cmd_prep(args: argparse.Namespace) -> int:
    from data_prep.prep import prep

    from .environment import detect_ranks

    ranks = detect_ranks()
    prep(args.dataset, args.src, args.out, samples_per_shard=args.samples_per_shard,
         workers=args.workers, overwrite=args.overwrite, strict=args.strict,
         resolution=args.resolution, num_valid=args.num_valid, ranks=ranks,
         finalize_only=args.finalize, progress=ranks.rank == 0 or ranks.launcher == "slurm-array")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .runtime import reexec_with_fast_allocator

    reexec_with_fast_allocator()

    return run_demo(Path(args.out), steps=args.steps)


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from .config import RunConfig, check_data

    config = RunConfig.from_preset(args.preset, args.data, args.run_dir, args.overrides)
    counts = check_data(config)
    if not args.dry_run:
        from .runtime import reexec_with_fast_allocator
        from .train import train

        reexec_with_fast_allocator()
        return train(config)
    print(f"# run config ({config.preset}; overrides: {' '.join(config.overrides) or 'none'})")
    print(config.to_json())
    print(f"# data: {', '.join(f'{k} {v:,} samples' for k, v in counts.items())}")
    print(f"# DeepSpeed JSON for {args.world_size} rank(s)")
    print(json.dumps(config.deepspeed_config(args.world_size, on_gpu=args.gpu), indent=1, sort_keys=True))
    return 0


def _load_model(source: str, preset: str | None, weights: str = "ema"):
    """A VDVAE from a run folder (its latest checkpoint; EMA weights unless weights="model"), one of
    our weights files, or an official *-model.th (needs --preset). Returns (model, preset)."""
    from model import load_official

    from .weights import load_weights

    path = Path(source)
    if path.is_dir():
        from model import VDVAE

        from .export import consolidate

        config, tag, model_sd, ema_sd = consolidate(path)
        model = VDVAE(config.model_config())
        model.load_state_dict(ema_sd if weights == "ema" else model_sd)
        print(f"{source}: {tag}, {weights} weights", file=sys.stderr)
        return model, config.preset
    if not path.is_file():
        raise FileNotFoundError(f"{source}: not a run folder, weights file or official checkpoint")
    try:
        return load_weights(path)
    except ValueError:
        if preset is None:
            raise ValueError(f"{source} is not one of our weights files; for an official checkpoint "
                             "give its --preset") from None
        return load_official(path, preset), preset


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    for path in export(args.run_dir, args.out, args.tag):
        print(path)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from model import get_preset

    from .images import make_grid, save_png

    model, preset = _load_model(args.source, args.preset, args.weights)
    model.eval()
    temperatures = [float(t) for t in args.temperatures.split(",")] if args.temperatures else \
        list(get_preset(preset).training.sample_temperatures if preset else (1.0,))
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        rows = [model.sample(args.num, t, generator=generator) for t in temperatures]
    save_png(make_grid(rows), args.out)
    print(f"{len(rows)} rows of {args.num} samples at temperatures {temperatures} -> {args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import math

    import torch

    from .stream import ShardStream

    model, _ = _load_model(args.source, args.preset, args.weights)
    model.eval()
    stream = ShardStream(f"{args.data.rstrip('/')}/{args.split}", args.batch, train=False, workers=args.workers)
    total, count, unreadable = 0.0, 0, 0
    torch.manual_seed(args.seed)
    with torch.no_grad():
        for batch in stream:
            per_image = model(batch.images).per_image_elbo.double()
            total += float((per_image * batch.valid).sum())
            count += int(batch.valid.sum())
            unreadable += batch.skipped
    elbo = total / count
    print(f"{args.split}: {elbo / math.log(2):.4f} bits/dim ({elbo:.4f} nats/dim) on {count} images"
          + (f", {unreadable} unreadable samples left out" if unreadable else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdvae",
        description="Train Very Deep VAEs (Child, 2021) on Slurm clusters from webdataset shards on S3.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("presets", help="list the paper's presets with parameter counts and settings",
                       description="List the paper's presets: resolution, parameter count (ours and "
                                   "the official model's), batch, lr, grad clip/skip threshold, EMA, "
                                   "and the released test bits/dim.")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser(
        "import-official", help="convert a released openai/vdvae checkpoint to our weights file",
        description="Convert an official *-model.th or *-model-ema.th state dict into our weights "
                    "file (state dict + model config). Fails, listing the differences, if the file "
                    "does not fit the preset.")
    p.add_argument("checkpoint", help="path of the official *-model.th / *-model-ema.th file")
    p.add_argument("--preset", required=True, help="cifar10, imagenet32, imagenet64, ffhq256 or ffhq1024")
    p.add_argument("--out", required=True, help="path of the weights file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser(
        "prep", help="shard a dataset into webdataset tars plus a manifest, locally or on S3",
        description="Read a dataset as it is distributed, split it as the official code does, and "
                    "write <out>/<split>/<split>-NNNNNN.tar shards and <out>/<split>/manifest.json. "
                    "Rerunning after an interruption completes only what is missing. Parallel: "
                    "under mpirun (or srun with PMI) the ranks share the shards and rank 0 writes the "
                    "manifests; as a Slurm array each task writes its share and a last run with "
                    "--finalize writes the manifests.")
    p.add_argument("dataset", choices=["cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq1024", "folder"],
                   help="the dataset; `folder`: any folder of images, center-cropped and resized")
    p.add_argument("--src", required=True,
                   help="the dataset folder: cifar-10-batches-py/ (cifar10); train_32x32/ + valid_32x32/ "
                        "or train_data_batch_1..10 + val_data (imagenet32, and 64 alike); "
                        "images1024x1024/ or a flat folder of 00000.png ... 69999.png (ffhq256, ffhq1024); "
                        "any folder of images (folder)")
    p.add_argument("--out", required=True, help="s3://bucket/prefix or a local folder")
    p.add_argument("--samples-per-shard", type=int,
                   help="default by dataset, for shards of roughly 50-300 MB: cifar10 and imagenet32 "
                        "10000, imagenet64 4000, ffhq256 1000, ffhq1024 200, folder 1000")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default: 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output made with other options")
    p.add_argument("--resolution", type=int, help="folder: side of the square images written")
    p.add_argument("--num-valid", type=int, help="folder: images held out for validation (default 0)")
    p.add_argument("--finalize", action="store_true",
                   help="only write the manifests, once every shard is complete (after a Slurm array)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad image instead of listing it in the manifest's rejections")
    p.set_defaults(func=_cmd_prep)

    from .config import SETTINGS

    p = sub.add_parser(
        "train", help="train a preset with DeepSpeed ZeRO from prepared shards",
        description="Resolve the run config (the preset's numbers, then key=value overrides), check "
                    "the data against the preset, then train (one process per GPU or CPU rank, started "
                    "by srun, mpirun, torchrun or deepspeed), resuming from the run folder's latest "
                    "checkpoint; --dry-run prints the config and the DeepSpeed JSON instead. "
                    f"Settings: {', '.join(SETTINGS)}.")
    p.add_argument("--preset", required=True, help="cifar10, imagenet32, imagenet64, ffhq256 or ffhq1024")
    p.add_argument("--data", required=True, help="the prepared dataset (`vdvae prep --out`): s3://... or a folder")
    p.add_argument("--run-dir", required=True, help="the run folder (config, checkpoints, tensorboard/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that differ from the preset")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed JSON, then stop")
    p.add_argument("--world-size", type=int, default=1, help="ranks to size the DeepSpeed JSON for (dry run)")
    p.add_argument("--gpu", action="store_true", help="size the DeepSpeed JSON for GPUs (dry run)")
    p.set_defaults(func=_cmd_train)

    source_help = ("a run folder (its latest checkpoint), one of our weights files (vdvae export, "
                   "import-official), or an official *-model.th with --preset")
    p = sub.add_parser("export", help="whole fp32 model and EMA weights from a run, loadable without DeepSpeed",
                       description="Consolidate a run's checkpoint (ZeRO shards included) into model.pt and "
                                   "model-ema.pt (our weights format) and <preset>-model.th / "
                                   "<preset>-model-ema.th (the official key layout).")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True, help="folder for the four files")
    p.add_argument("--tag", help="checkpoint tag (default: latest), e.g. global_step5000")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("sample", help="a PNG grid of samples, one row per temperature",
                       description="Unconditional samples from " + source_help + ".")
    p.add_argument("source", help=source_help)
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--preset", help="the preset of an official checkpoint")
    p.add_argument("--temperatures", help="comma-separated (default: the preset's, e.g. 1.0,0.9,0.8)")
    p.add_argument("--num", type=int, default=8, help="samples per row (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="of a run folder (default ema)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("eval", help="bits/dim of a model on a prepared split, every image once",
                       description="The test (or valid) bits/dim of " + source_help + ", on a split "
                                   "prepared by `vdvae prep`, with the number of images evaluated.")
    p.add_argument("source", help=source_help)
    p.add_argument("--data", required=True, help="the prepared dataset (s3://... or a folder)")
    p.add_argument("--split", default="test", help="default test (ffhq has valid only)")
    p.add_argument("--preset", help="the preset of an official checkpoint")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="of a run folder (default ema)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "demo", help="a short look at the model on real photographs (no cluster needed)",
        description="Train a small VDVAE for a few dozen steps on 32 px patches of the photographs "
                    "that ship with scikit-learn, print the ELBO as it falls, and write a sample "
                    "grid. The full demo (shard, stream, DeepSpeed, TensorBoard) grows from this.")
    p.add_argument("--out", default="runs/demo", help="folder for the outputs (default: runs/demo)")
    p.add_argument("--steps", type=int, default=150, help="training steps (default: 150)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from data_prep.storage import StorageError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
