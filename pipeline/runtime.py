"""Process-level settings: the memory-lean allocator for checkpointed runs on CPU.

glibc's malloc raises its mmap threshold (up to 32 MB) each time a large
block is freed, so after the first few steps the large activation tensors
of a high-resolution VDVAE land in the heap, where freed blocks stay
resident: at 1024 px with activation checkpointing the process holds about
1.1 GB more than it uses. A fixed 512 KiB threshold returns each large
block to the system when it is freed, and transparent huge pages for those
blocks keep the page-fault cost of that down (measured at 1024 px: peak
RSS 4.49 -> 3.48 GB, step 17.5 -> 20.0 s; tests/benchmarks/RESULTS.md). The settings are glibc
tunables, read when a process starts, so a running process re-executes
itself to apply them. Elsewhere (another libc, a GPU run's CUDA allocator)
they change nothing.
"""

from __future__ import annotations

import os
import sys

LEAN_TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.mmap_threshold=524288")


def lean_allocator_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: os.environ) with the lean allocator's tunables added."""
    env = dict(os.environ if env is None else env)
    have = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=")[0] for t in have}
    env["GLIBC_TUNABLES"] = ":".join(have + [t for t in LEAN_TUNABLES if t.split("=")[0] not in names])
    return env


def uses_lean_allocator() -> bool:
    return all(t.split("=")[0] in os.environ.get("GLIBC_TUNABLES", "") for t in LEAN_TUNABLES)


def reexec_with_lean_allocator() -> None:
    """Restart this Python process (same argv) with the lean allocator, unless it has it."""
    if uses_lean_allocator() or not sys.platform.startswith("linux"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], lean_allocator_env())
