"""Parallel prep: which process builds which shards, and how MPI ranks meet before the manifest.

A prep runs as one process, as MPI ranks (mpirun, or srun with PMIx), or
as the tasks of a Slurm array. This module does not read the launcher's
environment (`pipeline.distributed.detect_ranks` does, and the CLI hands
the result in); it only turns a `Ranks` into a share of the work.
"""

from __future__ import annotations

import time
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


SINGLE = Ranks(0, 1, "single")


def assign_shards(split_sizes: dict[str, int], samples_per_shard: int, world: int) -> dict[str, list[int]]:
    """The rank that builds each shard of every split: each shard in turn, splits in order, goes to the
    rank with the fewest samples so far (the lowest such rank), so ranks finish together even where a
    split's last shard is short or a small split has fewer shards than there are ranks. Every rank
    (and every Slurm array task) computes the same answer from the plans alone."""
    load = [0] * world
    owners: dict[str, list[int]] = {}
    for split, num_samples in split_sizes.items():
        owners[split] = []
        for start in range(0, num_samples, samples_per_shard):
            rank = min(range(world), key=lambda r: (load[r], r))
            load[rank] += min(samples_per_shard, num_samples - start)
            owners[split].append(rank)
    return owners


def wait_for_all_ranks() -> None:
    """MPI barrier that sleeps while it waits: a rank done early leaves its core to the ranks still
    decoding (MPI's own Barrier polls, a core's worth of work per waiting rank)."""
    # Imported here, by MPI ranks only: importing mpi4py.MPI initialises MPI, which a single
    # process or an array task must not do (a singleton MPI_Init starts Open MPI's runtime).
    from mpi4py import MPI

    request = MPI.COMM_WORLD.Ibarrier()
    while not request.Test():
        time.sleep(0.01)
