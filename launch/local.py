"""The local multi-process launcher: `vdvae train` as N ranks on this machine, as srun would start them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_locally(settings: list[str], world: int, log_dir: Path) -> int:
    """`vdvae train` as `world` local DeepSpeed ranks (as srun would start them); rank 0's output shown,
    every rank's kept in log_dir/rank<r>.log. Returns the first nonzero exit status, else 0."""
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        logs.append(open(log_dir / f"rank{rank}.log", "w"))
        procs.append(subprocess.Popen([sys.executable, "-m", "launch.cli", "train", *settings], env=env,
                                      stdout=subprocess.PIPE if rank == 0 else logs[-1],
                                      stderr=logs[-1], text=True))
    try:
        for line in procs[0].stdout:
            logs[0].write(line)
            if line.startswith(("step ", "resumed", "stopped")) or "error" in line.lower():
                print(f"  {line}", end="", flush=True)
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        for f in logs:
            f.close()
    return next((c for c in codes if c != 0), 0)
