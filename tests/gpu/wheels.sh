#!/usr/bin/env bash
# Make the folder of wheels that tests/gpu/check.sh installs on a GPU machine with no network.
#
#   bash tests/gpu/wheels.sh build/gpu-wheels
#
# Run it on a machine that reaches the package index. The GPU machine is
# expected to have Python 3.12 (x86_64 Linux) with torch, numpy, pillow,
# tensorboard and mpi4py, and to lack deepspeed, webdataset and boto3. The
# folder gets, for that interpreter (not this one):
#   - deepspeed, built here as a wheel (PyPI has a source distribution only;
#     nothing is compiled: its CUDA ops are built at their first use), at the
#     range pyproject.toml pins;
#   - deepspeed's runtime dependencies except torch and numpy (read from the
#     wheel just built), webdataset and boto3 at the project's ranges, with
#     every dependency of theirs, except numpy, which the GPU machine has
#     (keeps the folder small: about 16 MB less);
#   - setuptools and wheel, to build and install the project itself offline.
# Binary wheels only, manylinux2014 or manylinux_2_28 x86_64, CPython 3.12
# (PYTHON_VERSION and PLATFORMS override). Prints the folder's size at the
# end; it stays well within the 64 MiB a device call may carry. The folder
# goes under build/ (ignored by git) so that it travels with the working
# tree when named in the call's carry list; never commit it.
set -euo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    [[ $# -eq 1 && ( $1 == -h || $1 == --help ) ]] && exit 0 || exit 2
fi
DIR=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORMS=${PLATFORMS:-manylinux2014_x86_64 manylinux_2_28_x86_64}

# The project's ranges for the three packages, from pyproject.toml (one place for them).
spec() {
    "$PY" - "$ROOT/pyproject.toml" "$1" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
match = re.search(r'"(%s[<>=!~][^"]*)"' % re.escape(sys.argv[2]), text)
if not match:
    sys.exit(f"{sys.argv[2]} is not among the dependencies in {sys.argv[1]}")
print(match.group(1))
EOF
}
DEEPSPEED=$(spec deepspeed)
WEBDATASET=$(spec webdataset)
BOTO3=$(spec boto3)

mkdir -p "$DIR"
echo "== deepspeed wheel ($DEEPSPEED), built here" >&2
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" "$DEEPSPEED"
WHEEL=$(ls -t "$DIR"/deepspeed-*.whl | head -1)

# deepspeed's Requires-Dist, less torch and numpy (the GPU machine has them)
mapfile -t DS_DEPS < <("$PY" - "$WHEEL" <<'EOF'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:"):
            req = line.split(":", 1)[1].strip()
            if ";" in req and "extra" in req.split(";", 1)[1]:
                continue  # an optional extra
            name = re.split(r"[ <>=!~;\[(]", req, maxsplit=1)[0].lower()
            if name not in ("torch", "numpy"):
                print(req)
EOF
)

PLATFORM_ARGS=()
for p in $PLATFORMS; do PLATFORM_ARGS+=(--platform "$p"); done
echo "== binary wheels for CPython $PYTHON_VERSION: ${DS_DEPS[*]} $WEBDATASET $BOTO3 nvidia-ml-py setuptools wheel" >&2
"$PY" -m pip download --quiet --dest "$DIR" --only-binary=:all: --python-version "$PYTHON_VERSION" \
    "${PLATFORM_ARGS[@]}" "${DS_DEPS[@]}" "$WEBDATASET" "$BOTO3" nvidia-ml-py "setuptools>=77" wheel
rm -f "$DIR"/numpy-*.whl

echo "== $DIR" >&2
ls -1 "$DIR"
du -sh "$DIR"
