"""`vdvae demo`: the whole system on one machine (launch/demo.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    # launch.demo needs the optional `demo` extras (scikit-image, scikit-learn: their photographs)
    # and DeepSpeed; imported when the demo runs, so that `vdvae` works and starts fast without them.
    try:
        from launch.demo import run_demo
    except ImportError as err:
        raise SystemExit(f"the demo needs the photographs of scikit-image and scikit-learn ({err}): "
                         "run `make demo`, or pip install 'vdvae-pipeline[demo]'") from None
    return run_demo(Path(args.out), steps=args.steps, images=args.images)


def add_commands(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole system on one machine: photographs -> shards -> 2-process DeepSpeed training",
        description="Cut a small dataset from the photographs that ship inside scikit-image and "
                    "scikit-learn, laid out like the FFHQ release; shard it with `vdvae prep`; train a small "
                    "32 px VDVAE on 2 local DeepSpeed processes streaming the shards; leave TensorBoard "
                    "logs, a sample grid PNG and checkpoints in --out. A rerun reuses the dataset and "
                    "resumes the run.")
    p.add_argument("--out", default="runs/demo", help="folder for everything (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="training steps (default: %(default)s)")
    p.add_argument("--images", type=int, default=4000, help="images in the dataset (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)
