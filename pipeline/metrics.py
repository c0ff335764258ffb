"""Metrics: one `report(name, value)` interface to TensorBoard, the jsonl log and the console.

Names are slash-separated (`train/elbo`, `eval/bpd`). Rank 0 writes; every
rank may call `report` (the others' calls are dropped). Per-rank values are
reduced across ranks by name (`reduce_by_name`), never by position. After a
resume from step S, the steps after S that a crashed run had already logged
are removed first, from the jsonl log (truncated) and from TensorBoard
(`purge_step`), so every step is logged exactly once.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from data_prep.storage import LocalStore

from .distributed import control_group

LOG_NAME = "log.jsonl"


def reduce_by_name(values: dict[str, float], op: str = "sum", device: torch.device | str = "cpu") -> dict[str, float]:
    """Each value summed (or maxed) over the ranks, looked up by its name (every rank passes the same
    names; they are sorted, so the order of the dict does not matter). The values travel as one tensor
    on `device`: the engine's device for values computed there, "cpu" for host values, which go
    through the gloo control group (NCCL serves CUDA tensors only)."""
    names = sorted(values)
    device = torch.device(device)
    packed = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(packed, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                        group=control_group() if device.type == "cpu" else None)
    return dict(zip(names, packed.tolist(), strict=True))


def memory_gb(device: torch.device) -> dict[str, float]:
    """`memory/...` tags: this process's resident memory, and on CUDA the allocator's peaks since the
    last call (allocated by tensors, reserved from the driver), which are then reset."""
    values = {"memory/host_rss_gb": rss_gb()}
    if device.type == "cuda":
        values["memory/cuda_allocated_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        values["memory/cuda_reserved_peak_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return values


class Metrics:
    """The run's metrics sink: TensorBoard under `run_dir/tensorboard`, `run_dir/log.jsonl`, stdout."""

    def __init__(self, run_dir: str | os.PathLike, rank: int = 0, resume_step: int | None = None):
        self.run_dir, self.rank = Path(run_dir), rank
        self._pending: dict[int, dict] = {}
        self.writer = None
        if rank != 0:
            return
        if resume_step is not None:
            truncate_log(self.run_dir / LOG_NAME, resume_step)
        # purge_step: TensorBoard hides the events of steps >= it written before this writer started
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def report(self, name: str, value: float, step: int) -> None:
        """Record one scalar of `step`; `flush(step)` writes the step's record."""
        if self.rank == 0:
            self._pending.setdefault(step, {})[name] = float(value)

    def flush(self, step: int, line: str | None = None) -> None:
        """Write step's scalars to TensorBoard and as one jsonl record; print `line` (a summary)."""
        values = self._pending.pop(step, {})
        if self.rank != 0:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        if values:
            with open(self.run_dir / LOG_NAME, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        if line:
            print(f"step {step}: {line}", flush=True)

    def text(self, name: str, text: str, step: int) -> None:
        if self.rank == 0:
            self.writer.add_text(name, text, step)

    def alarm(self, message: str, step: int) -> None:
        """Something a person must see: on the console, as a jsonl record and as TensorBoard text."""
        if self.rank != 0:
            return
        print(f"ALARM {message}", file=sys.stderr, flush=True)
        with open(self.run_dir / LOG_NAME, "a") as f:
            f.write(json.dumps({"step": step, "alarm": message}) + "\n")
        self.writer.add_text("alarms", message, step)
        self.writer.flush()

    def image(self, name: str, image, step: int) -> None:
        """A uint8 (H, W, 3) image."""
        if self.rank == 0:
            self.writer.add_image(name, image, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def truncate_log(path: Path, last_step: int) -> int:
    """Drop the jsonl records of steps after `last_step` (and a torn last line); return how many."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the crash
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", math.inf) > last_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        LocalStore(path.parent).write_bytes(path.name, "".join(f"{line}\n" for line in kept).encode())
    return dropped


def rss_gb() -> float:
    """This process's resident memory in GB (Linux), NaN where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.nan
