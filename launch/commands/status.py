"""`vdvae status RUN`: how a run is doing (pipeline/status.py), as text or JSON, once or redrawn."""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime

from pipeline.status import WINDOW_STEPS, format_status, run_status

CLEAR_SCREEN = "\033[H\033[2J"
WATCH_DEFAULT_S = 10.0


def _cmd_status(args: argparse.Namespace) -> int:
    if args.watch is not None and not args.watch > 0:
        raise ValueError(f"--watch {args.watch:g}: the seconds between refreshes must be positive")
    if args.window < 1:
        raise ValueError(f"--window {args.window}: at least one step")
    try:
        while True:
            status = run_status(args.run_dir, window=args.window)
            if args.json:  # once: one object; watching: one object per line (JSON Lines)
                print(json.dumps(status, indent=None if args.watch else 1), flush=True)
            elif args.watch is None:
                print(format_status(status), flush=True)
            else:
                print(f"{CLEAR_SCREEN}{format_status(status)}\n\n{datetime.now():%H:%M:%S}, every "
                      f"{args.watch:g} s; Ctrl-C to stop", flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:  # (how --watch ends)
        return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "status", help="how a run is doing: step, bits/dim, skips, speed, ETA, checkpoints, its Slurm jobs",
        description="One screen on a run folder: preset and data, step and images seen, the latest train "
                    "and eval bits/dim, the skip and NaN rates and the speed over the last steps, the ETA to "
                    "max_steps, the latest checkpoint (and the mirror's), the active latent groups, and for "
                    "a run submitted with `vdvae submit train` (RUN/jobs.jsonl) what squeue, sacct and "
                    "scontrol say of its jobs. Reads only; what cannot be read is shown as a line.")
    p.add_argument("run_dir", metavar="RUN", help="the run folder (`--run-dir` of vdvae train / submit train)")
    p.add_argument("--json", action="store_true", help="print the same as one JSON object (for scripts)")
    p.add_argument("--watch", nargs="?", type=float, const=WATCH_DEFAULT_S, metavar="SECONDS",
                   help="redraw every SECONDS (default %(const)g) until Ctrl-C; give it after RUN "
                        "(vdvae status RUN --watch 30)")
    p.add_argument("--window", type=int, default=WINDOW_STEPS, metavar="STEPS",
                   help="the last steps that the skip and NaN rates and the ETA are over (default %(default)s)")
    p.set_defaults(func=_cmd_status)
