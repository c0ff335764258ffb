"""`vdvae train`: resolve and check the run config, then train (or, with --dry-run, show what would run)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model import PRESETS
from pipeline.config import SETTINGS, ConfigError, RunConfig, batch_problem, check_data
from pipeline.distributed import detect_ranks
from pipeline.runtime import reexec_with_fast_allocator


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run config of `vdvae train` / `vdvae submit train`: --preset, --data and --run-dir with
    key=value settings, or a saved config (--config RUN/config.json) with key=value settings over it."""
    given = [flag for flag, value in (("--preset", args.preset), ("--data", args.data),
                                      ("--run-dir", args.run_dir)) if value]
    if args.config:
        if given:
            raise ConfigError(f"--config takes the preset, data and run folder from {args.config}; leave out "
                              f"{', '.join(given)} (settings that differ go after it as key=value)")
        path = Path(args.config)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_bytes()
        except OSError as err:
            raise ConfigError(f"--config {path}: {err.strerror} (a run folder's config.json)") from None
        return RunConfig.from_json(text, str(path)).override(args.overrides)
    missing = [flag for flag in ("--preset", "--data", "--run-dir") if flag not in given]
    if missing:
        raise ConfigError(f"give {', '.join(missing)} (or --config RUN/config.json to relaunch a run)")
    return RunConfig.from_preset(args.preset, args.data, args.run_dir, args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    config = run_config(args)
    if not args.dry_run:
        reexec_with_fast_allocator()  # (before the heavy imports below: the process starts again)
        # deepspeed and tensorboard take seconds to import; only a training process needs them
        from pipeline.train import train

        return train(config)
    counts = check_data(config)
    problem = batch_problem(config, counts, args.world_size)
    if problem:  # (a dry run may size a job for data still to come)
        print(f"warning: {problem}", file=sys.stderr)
    print(f"# run config ({config.preset}; overrides: {' '.join(config.overrides) or 'none'})")
    print(config.to_json())
    print(f"# data: {', '.join(f'{k} {v:,} samples' for k, v in counts.items())}")
    print(f"# DeepSpeed JSON for {args.world_size} rank(s)")
    print(json.dumps(config.deepspeed_config(args.world_size, on_gpu=args.gpu), indent=1, sort_keys=True))
    return 0


def train_arguments(p: argparse.ArgumentParser) -> None:
    """What `vdvae train` and `vdvae submit train` both take."""
    p.add_argument("--preset", choices=tuple(PRESETS))
    p.add_argument("--data", help="the prepared dataset (`vdvae prep --out`): s3://... or a folder")
    p.add_argument("--run-dir", help="the run folder (config, checkpoints, tensorboard/)")
    p.add_argument("--config", metavar="RUN/config.json",
                   help="relaunch a run from its saved config (instead of --preset, --data and --run-dir); "
                        "key=value settings still apply over it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that differ from the preset")


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train", help="train a preset with DeepSpeed ZeRO from prepared shards",
        description="Resolve the run config (the preset's numbers, then key=value overrides), check "
                    "the data, the world size and the run folder, then train (one process per GPU or CPU "
                    "rank, started by srun, mpirun, torchrun or deepspeed), resuming from the run "
                    "folder's latest checkpoint; --dry-run prints the config and the DeepSpeed JSON "
                    f"instead. Settings: {', '.join(SETTINGS)}.")
    train_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed JSON, then stop")
    p.add_argument("--world-size", type=int, default=detect_ranks().world,
                   help="ranks to size the DeepSpeed JSON for (dry run; default: this job's, %(default)s)")
    p.add_argument("--gpu", action="store_true", help="size the DeepSpeed JSON for GPUs (dry run)")
    p.set_defaults(func=_cmd_train)
