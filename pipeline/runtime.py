"""Process-level settings: the memory allocator of compute processes on CPU, and whether this
machine computes bf16 in hardware.

PyTorch on CPU allocates and frees large activation tensors many times a
step. glibc's malloc serves them slowly once its dynamic mmap threshold has
risen, and keeps freed blocks resident; tcmalloc reuses them from its own
page heap. Measured here (tests/benchmarks/RESULTS.md, ffhq1024 batch 1):
train step 17.5 s -> 9.3 s without checkpointing; with checkpointing
14.7 s -> 11.4 s and peak RSS 3.78 -> 3.07 GB. The allocator is chosen
when a process starts (LD_PRELOAD), so a running process re-executes itself
once to apply it. On a GPU the CUDA caching allocator holds the activations and this matters
far less, but it does no harm.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

MARKER = "VDVAE_ALLOCATOR"
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                 "/usr/local/lib")
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")


def find_tcmalloc() -> str | None:
    """Path of a tcmalloc shared library (Debian: libtcmalloc-minimal4), or None."""
    for directory in _LIBRARY_DIRS:
        for name in _NAMES:
            if (Path(directory) / name).is_file():
                return str(Path(directory) / name)
    found = ctypes.util.find_library("tcmalloc_minimal")
    return found if found and Path(found).is_absolute() else None


def allocator_env(env: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """A copy of `env` (default os.environ) that starts a process with tcmalloc, and its name."""
    env = dict(os.environ if env is None else env)
    library = find_tcmalloc() if sys.platform.startswith("linux") else None
    if library is None:
        env[MARKER] = "system"
        return env, "system"
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    env["LD_PRELOAD"] = ":".join([library, *[p for p in preload if p != library]])
    # Large single allocations are normal here (1024 px batches); don't log them.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    env[MARKER] = "tcmalloc"
    return env, "tcmalloc"


def active_allocator() -> str:
    """'tcmalloc' or 'system' in a process started through `reexec_with_fast_allocator`, else 'system'."""
    return os.environ.get(MARKER, "system")


def reexec_with_fast_allocator() -> None:
    """Restart this Python process (same argv) with tcmalloc preloaded, once.

    Does nothing when already done, on non-Linux systems, or when no
    tcmalloc library is installed (then the system allocator is used).
    """
    if MARKER in os.environ:
        return
    env, name = allocator_env()
    if name == "system":
        os.environ[MARKER] = "system"
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # keeps `-m module`


def bf16_is_native() -> bool:
    """Whether this machine computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX (what oneDNN's bf16 kernels need).

    Elsewhere (an AVX2-only CPU) torch emulates bf16 through fp32 conversions, and a bf16 step is
    slower than an fp32 one: the demo's model at batch 8 on one thread of an AVX2 AMD EPYC took
    2.0-2.9 s in bf16 against 0.33-0.46 s in fp32.
    """
    import torch  # (this module is imported before torch by every CLI start: see launch/cli.py)

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
