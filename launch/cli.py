"""The `vdvae` command: one parser, a subcommand group per module of `launch/commands/`."""

from __future__ import annotations

import argparse
import sys

from pipeline.runtime import reexec_with_fast_allocator

if sys.argv[1:2] == ["train"] and "--dry-run" not in sys.argv:
    # A training process restarts itself with tcmalloc (pipeline/runtime.py); doing it here, before
    # the imports below bring in torch, saves importing torch twice (2 s a process).
    reexec_with_fast_allocator()

from data_prep.source import SourceError  # noqa: E402
from data_prep.storage import StorageError  # noqa: E402

from .commands import analyze, data, demo, models, status, submit, train  # noqa: E402
from .slurm import SubmitError  # noqa: E402

COMMAND_GROUPS = (models, analyze, data, train, submit, status, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdvae",
        description="Train Very Deep VAEs (Child, 2021) on Slurm clusters from webdataset shards on S3.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, StorageError, SubmitError, SourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
