#!/usr/bin/env bash
# The GPU check: install what is missing, then run tests/gpu/check.py (the stages, one JSON file).
#
#   # on a machine with the package index: the wheels the GPU machine lacks (about 25 MB)
#   bash tests/gpu/wheels.sh build/gpu-wheels
#   # the official model, for the side-by-side timings (optional; never commit it): its vae.py and
#   # vae_helpers.py from a checkout of openai/vdvae, copied to build/openai-vdvae/
#   # on the GPU machine (one NVIDIA GPU, Python 3.12 with torch, tensorboard and mpi4py; no network),
#   # from the repository root, with build/gpu-wheels and build/openai-vdvae carried there:
#   bash tests/gpu/check.sh --wheels build/gpu-wheels --official-src build/openai-vdvae --out "$OUT/gpu_check.json"
#   # the same sequence, shortened, on CPU (what tests/test_gpu_check.py runs):
#   bash tests/gpu/check.sh --cpu --out runs/gpu-check/gpu_check.json
#
# Installing: when deepspeed, webdataset and boto3 import already (a set-up venv), nothing is
# installed. Otherwise they and their dependencies are installed from --wheels DIR (default
# build/gpu-wheels when it exists) with pip --no-index, and then the project itself (--no-deps, built
# with the setuptools and wheel of that folder). The install's log, time and outcome are the
# JSON's first stage, `install`; after a failed install the stages run and fail on what is missing.
#
# Python: $PYTHON, else the repository's .venv/bin/python when there is one, else the first of
# python3 and python on PATH that has torch.
# Every other option goes to check.py: `bash tests/gpu/check.sh --help` lists them (--out,
# --official-src, --budget (450 s, counted from this script's start), --only, --skip, --list, ...).
# The exit status is check.py's: 0 when every stage that ran passed, 1 otherwise.
set -uo pipefail

STARTED=$(date +%s.%N)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-}
if [[ -z $PY && -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; fi
if [[ -z $PY ]]; then  # the first interpreter on PATH that has torch
    for candidate in python3 python; do
        if "$candidate" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' 2>/dev/null; then
            PY=$candidate
            break
        fi
    done
    PY=${PY:-python3}
fi

WHEELS=""
ARGS=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h|--help)
            sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            echo
            echo "check.py's options:"
            exec "$PY" "$ROOT/tests/gpu/check.py" --help ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
        --wheels=*) WHEELS=${1#--wheels=}; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
if [[ -z $WHEELS && -d $ROOT/build/gpu-wheels ]]; then WHEELS=$ROOT/build/gpu-wheels; fi

INSTALL_LOG=$(mktemp -t vdvae-gpu-check-install.XXXXXX)
trap 'rm -f "$INSTALL_LOG"' EXIT
# what does not import (looked up, not imported: importing deepspeed takes seconds)
MISSING=$("$PY" -c '
import importlib.util as u
print(" ".join(m for m in ("deepspeed", "webdataset", "boto3") if u.find_spec(m) is None))' 2>>"$INSTALL_LOG") \
    || MISSING="python"
PROJECT=$(cd / && "$PY" -c 'import importlib.metadata as m; print(m.version("vdvae-pipeline"))' 2>/dev/null || true)

pip_install() {
    echo "\$ pip install $*" >>"$INSTALL_LOG"
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --no-index --find-links "$WHEELS" \
        --disable-pip-version-check --no-input --progress-bar off "$@" >>"$INSTALL_LOG" 2>&1
}

T0=$(date +%s.%N)
if [[ $MISSING == python ]]; then
    STATUS=failed NOTE="$PY does not run"
elif [[ -z $MISSING ]]; then
    STATUS=ok NOTE="nothing to install: deepspeed, webdataset and boto3 import (project: ${PROJECT:-run from the checkout})"
elif [[ -z $WHEELS ]]; then
    STATUS=failed NOTE="missing: $MISSING; make a wheel folder with tests/gpu/wheels.sh DIR and pass --wheels DIR"
elif [[ ! -d $WHEELS ]]; then
    STATUS=failed NOTE="missing: $MISSING; --wheels $WHEELS is not a folder"
else
    echo "installing $MISSING and the project from $WHEELS ..." >&2
    if pip_install deepspeed webdataset boto3 nvidia-ml-py && pip_install --no-deps "$ROOT"; then
        STATUS=ok NOTE="installed $MISSING, their dependencies and the project from the wheel folder"
    else
        STATUS=failed NOTE="pip install from $WHEELS failed (see the install log)"
        tail -20 "$INSTALL_LOG" >&2
    fi
fi
T1=$(date +%s.%N)
# where pip put the scripts (`vdvae`, `ninja`): this interpreter's scheme first, then the user scheme's
SCRIPT_DIRS=$("$PY" -c 'import sysconfig as s; print(s.get_path("scripts", s.get_preferred_scheme("user")))
print(s.get_path("scripts"))' 2>/dev/null || true)
while read -r DIR; do
    if [[ -n $DIR && -d $DIR ]]; then PATH="$DIR:$PATH"; fi
done <<<"$SCRIPT_DIRS"
export PATH

"$PY" "$ROOT/tests/gpu/check.py" "${ARGS[@]}" --started "$STARTED" --install-status "$STATUS" \
    --install-note "$NOTE" --install-seconds "$("$PY" -c "print($T1 - $T0)")" --install-log "$INSTALL_LOG"
