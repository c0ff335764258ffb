"""Who am I in the job: rank and world size from whatever launched this process.

The one place that reads launcher environments. Order: MPI (mpirun/srun
with PMI: OMPI_*, PMI_*), a Slurm array task (SLURM_ARRAY_TASK_*), Slurm
tasks of one step (SLURM_PROCID/SLURM_NTASKS), torchrun/deepspeed
(RANK/WORLD_SIZE), else a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    launcher: str
    """'mpi', 'slurm-array', 'slurm', 'env' or 'single'."""

    @property
    def is_mpi(self) -> bool:
        return self.launcher == "mpi"


def detect_ranks(env: dict[str, str] | None = None) -> Ranks:
    env = os.environ if env is None else env
    get = lambda name: int(env[name]) if env.get(name, "") != "" else None  # noqa: E731
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
