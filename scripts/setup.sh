#!/usr/bin/env bash
# Set up a fresh machine for this project: the virtual environment at .venv/
# with torch (the CPU build where there is no NVIDIA GPU) and the project in
# editable mode with its test extras. Idempotent: a rerun with an unchanged
# pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-stamp
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

# System packages (Debian/Ubuntu), installed when missing: tcmalloc, the
# allocator of the compute processes (pipeline/runtime.py); Open MPI for
# mpi4py and `mpirun` (parallel prep); Slurm and munge, for `vdvae submit`
# and the test session's one-host Slurm cluster (tests/services.py).
need_apt=()
compgen -G "/usr/lib/*/libtcmalloc_minimal.so.4" >/dev/null || compgen -G "/usr/lib/libtcmalloc_minimal.so.4" >/dev/null \
    || need_apt+=(libtcmalloc-minimal4)
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin libopenmpi-dev)
command -v sbatch >/dev/null 2>&1 || need_apt+=(slurm-client)
[ -x /usr/sbin/slurmctld ] || need_apt+=(slurmctld)
[ -x /usr/sbin/slurmd ] || need_apt+=(slurmd)
[ -x /usr/sbin/munged ] || need_apt+=(munge)
if [ ${#need_apt[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: apt-get install ${need_apt[*]}"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "setup: warning: missing ${need_apt[*]} (install them as root); continuing without" >&2
    fi
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

# torch first, pinned, so that nothing below pulls a multi-GB CUDA build on a
# machine without a GPU. TORCH_SPEC overrides (for example on a GPU cluster).
if [ -z "${TORCH_SPEC:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        TORCH_SPEC="torch>=2.6,<2.15"
    else
        TORCH_SPEC="torch==2.13.0"
    fi
fi
echo "setup: installing $TORCH_SPEC"
pip install "$TORCH_SPEC"
echo "setup: installing the project and its test dependencies"
pip install -e ".[test,demo]"
echo "$want" > "$STAMP"
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
