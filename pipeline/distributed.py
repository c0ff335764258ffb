"""Who am I in the job, and the process group: the one module that reads launcher environments.

Ranks, in this order: MPI (mpirun/srun with PMI: OMPI_*, PMI_*, PMIX_*), a
Slurm array task (SLURM_ARRAY_TASK_*), Slurm tasks of one step
(SLURM_PROCID/SLURM_NTASKS), torchrun/deepspeed (RANK/WORLD_SIZE), else a
single process. The rendezvous address: MASTER_ADDR/MASTER_PORT when set,
else the first node of the Slurm job at the address Slurm reaches it by
(`scontrol`), else this host. The training sbatch script asks this module
for it (`python -m pipeline.distributed rendezvous`). NCCL on GPUs (with
a gloo group beside it for host-side flags), gloo on CPU.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import os
import re
import socket
import subprocess
import sys

from data_prep.parallel import Ranks

# torch and deepspeed are imported where a process group starts, not here: `vdvae prep` ranks and the
# sbatch script's rendezvous ask this module for ranks and addresses, and need neither (3 s a process).

DEFAULT_PORT = 29500
REQUEUE_EXIT_CODE = 85
"""Exit status of a training process that checkpointed on SIGUSR1/SIGTERM: the batch script requeues on it."""


def detect_ranks(env: dict[str, str] | None = None) -> Ranks:
    """This process's rank and world size from the launcher's variables in `env` (default: os.environ)."""
    env = os.environ if env is None else env

    def get(name: str) -> int | None:
        return int(env[name]) if env.get(name, "") != "" else None

    for rank_var, size_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                               ("PMIX_RANK", "PMIX_SIZE")):
        if get(rank_var) is not None and get(size_var) is not None:
            return Ranks(get(rank_var), get(size_var), "mpi")
    if get("PMIX_RANK") is not None and get("SLURM_NTASKS") is not None:  # srun --mpi=pmix sets no PMIX_SIZE
        return Ranks(get("PMIX_RANK"), get("SLURM_NTASKS"), "mpi")
    if get("SLURM_ARRAY_TASK_ID") is not None and get("SLURM_ARRAY_TASK_COUNT") is not None:
        first = get("SLURM_ARRAY_TASK_MIN") or 0
        return Ranks(get("SLURM_ARRAY_TASK_ID") - first, get("SLURM_ARRAY_TASK_COUNT"), "slurm-array")
    if get("SLURM_PROCID") is not None and get("SLURM_NTASKS") is not None:
        return Ranks(get("SLURM_PROCID"), get("SLURM_NTASKS"), "slurm")
    if get("RANK") is not None and get("WORLD_SIZE") is not None:
        return Ranks(get("RANK"), get("WORLD_SIZE"), "env")
    return Ranks(0, 1, "single")


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


_CONTROL_GROUP = None
"""The gloo group for host-side flags on GPUs (see control_group); None: the default group serves them."""


def init_distributed(timeout_s: float = 1800) -> Ranks:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the launcher and start DeepSpeed's process group:
    NCCL on GPUs (CUDA tensors only) plus a gloo group for host-side flags, gloo on CPU. A collective
    that waits more than `timeout_s` ends the process rather than holding the allocation."""
    # (here, not at the top: see the note under the imports)
    import deepspeed
    import torch
    import torch.distributed as dist

    global _CONTROL_GROUP

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
    # Before the group exists: torch.distributed.nn's functions take `group=group.WORLD` as a default
    # argument, evaluated at import, and torch imports the module midway through a run; imported after
    # the start, every one of them holds the WORLD group for the life of the interpreter (see
    # end_distributed).
    import torch.distributed.nn  # noqa: F401  (the reason is above)

    if on_gpu:
        # a collective past its timeout aborts the communicators and ends the process (the launcher
        # then ends the job), instead of every rank waiting forever in a hung NCCL call
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False,
                               timeout=timeout)
    _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=timeout) if on_gpu else None
    return ranks


def control_group():
    """The process group for host-side values (a signal flag, counts): gloo, so that reading them back
    never waits for the GPU's queue. On CPU, the default group (gloo already)."""
    return _CONTROL_GROUP


def end_distributed(together: bool = True) -> None:
    """Destroy the process groups now, while the interpreter is whole; the caller has let go of
    DeepSpeed's engine first. `together`: every rank comes here in step (the end of a run, or the
    checkpoint of a signal); False on an error's way out, where another rank may never come.

    `destroy_process_group()` alone only makes torch forget the groups. Each is a C++ object with
    threads (gloo's workers and I/O loop) and sockets (to the other ranks and to rank 0's store) that
    lives while anything references it, and DeepSpeed does: the engine, its optimizer, each parameter
    (`_dp_group`), `deepspeed.utils.groups`. Left so, the groups were torn down during interpreter
    finalization, in the order its collection frees objects, one with the GIL let go and the other
    not at all until exit(), while the other rank's teardown, rank 0's store included, ran at the
    same moment; a finished rank aborted there ("terminate called without an active exception").
    """
    # (here, not at the top: see the note under the imports)
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    global _CONTROL_GROUP
    _CONTROL_GROUP = None
    if not dist.is_initialized():
        return
    if together:
        dist.barrier()  # no rank tears its group down while another is still in a collective with it
    ds_dist.destroy_process_group()  # torch's group, then DeepSpeed's references to it
    gc.collect()  # the engine's reference cycles: the groups' threads are joined here, not at exit


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


def rendezvous() -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) for a job whose batch shell runs on its first node: the address Slurm
    reaches that node by, and a port this host's kernel has free now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return _first_slurm_host() or "127.0.0.1", port


if __name__ == "__main__":  # `python -m pipeline.distributed rendezvous`, for the training sbatch script
    if sys.argv[1:] != ["rendezvous"]:
        sys.exit("usage: python -m pipeline.distributed rendezvous")
    address, port = rendezvous()
    print(f"MASTER_ADDR={address}\nMASTER_PORT={port}")
