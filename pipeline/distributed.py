"""Start torch.distributed from whatever launched this process: Slurm, MPI, or deepspeed/torchrun.

The one module that turns a launcher's environment into a process group.
Ranks come from `environment.detect_ranks`; the rendezvous address from
MASTER_ADDR/MASTER_PORT when set, else the first host of the Slurm job
(`SLURM_JOB_NODELIST`, via `scontrol show hostnames`), else this host.
NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess

import torch

from .environment import Ranks, detect_ranks

DEFAULT_PORT = 29500


def _first_slurm_host() -> str | None:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
        hosts = out.stdout.split()
        if out.returncode != 0 or not hosts:
            return None
        # The address Slurm reaches the node by (NodeAddr; the node name where none is set).
        out = subprocess.run(["scontrol", "show", "node", "-o", hosts[0]], capture_output=True, text=True,
                             timeout=30)
        addr = re.search(r"\bNodeAddr=(\S+)", out.stdout) if out.returncode == 0 else None
        return addr.group(1) if addr else hosts[0]
    except (OSError, subprocess.TimeoutExpired):
        return None


def local_rank(ranks: Ranks) -> int:
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return 0 if ranks.world == 1 else ranks.rank


def init_distributed() -> Ranks:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the launcher and start DeepSpeed's process group."""
    import deepspeed

    ranks = detect_ranks()
    if ranks.launcher == "slurm-array":
        raise RuntimeError("training runs as the tasks of one Slurm step (srun), not as array tasks")
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(ranks.rank), str(ranks.world)
    os.environ["LOCAL_RANK"] = str(local_rank(ranks))
    if not os.environ.get("MASTER_ADDR"):
        os.environ["MASTER_ADDR"] = _first_slurm_host() or "127.0.0.1"
    if not os.environ.get("MASTER_PORT"):
        job = os.environ.get("SLURM_JOB_ID", "")
        os.environ["MASTER_PORT"] = str(DEFAULT_PORT + int(job) % 1000 if job.isdigit() else DEFAULT_PORT)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        without_shared_memory_op()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
    return ranks


def without_shared_memory_op() -> None:
    """Keep DeepSpeed's CPU shared-memory all-reduce op from being built and started.

    DeepSpeed's CPU backend JIT-compiles ``deepspeed_shm_comm`` on its first start (about 80 s on
    2 cores) and maps a 69 MB ``/dev/shm`` buffer per rank and port that no exit removes. A compile
    killed midway leaves the extension's lock file behind, and every later start then waits on it
    forever. Training never uses the op: it serves only ``inference_all_reduce``; gradients and
    parameters go through the process group (gloo).
    """
    # ``import deepspeed.comm.torch as m`` would bind the torch package that deepspeed.comm re-exports.
    backend_module = importlib.import_module("deepspeed.comm.torch")
    backend_module.build_shm_op = lambda: None


def share_fp32_master(engine) -> int:
    """Make ZeRO-3's fp32 master weights the fp32 parameter partition itself, as DeepSpeed intends.

    When the parameters are already fp32 on the optimizer's device, DeepSpeed's
    stage 3 means to use each partition as its own master copy. It decides so
    by comparing a ``torch.device`` with the device's name, which recent
    PyTorch never finds equal, and clones the partition instead: one more
    partition-sized fp32 buffer per rank, a sixth of stage 3's state with Adam
    and the EMA. The optimizer keeps its tensor objects (its state is keyed by
    them); only their storage becomes the partition's. DeepSpeed's copy from
    master to partition after each step is then a copy onto itself, as in its
    own aliased case. bf16/fp16 runs keep their fp32 master: nothing to share.
    Returns the bytes freed on this rank.
    """
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() != 3 or getattr(optimizer, "offload_optimizer", False) \
            or getattr(optimizer, "swap_optimizer", False):
        return 0
    freed = 0
    for part, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat,
                            strict=True):
        if part is None or master.numel() == 0 or part.dtype != master.dtype or part.device != master.device \
                or part.numel() != master.numel() or part.data_ptr() == master.data_ptr():
            continue
        if not torch.equal(part, master):  # a master that already differs is not a copy to drop
            raise RuntimeError("ZeRO-3 fp32 master differs from its parameter partition; call "
                               "share_fp32_master right after deepspeed.initialize")
        freed += master.untyped_storage().nbytes()
        master.data = part.data
    return freed
