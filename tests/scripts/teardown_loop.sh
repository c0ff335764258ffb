#!/usr/bin/env bash
# Run tests/test_train.py::test_started_by_mpirun's mpirun command N times in a row (default 30) and
# count the runs that fail, and those where a rank died of SIGABRT ("terminate called without an
# active exception"). The tiny dataset and model JSON are prepared once, as the test's `data` fixture
# does. LOAD=N keeps N `yes` processes busy beside the runs (a loaded CI machine). Extra variables for the
# ranks go in RANK_ENV ("NAME=value ..."), each passed with `mpirun -x`; EXTRA_PYTHONPATH goes before
# the repository on the ranks' PYTHONPATH (e.g. a folder with a sitecustomize.py that delays a rank's exit).
# Each run's output goes to $FAIL_LOG_DIR (default $TMPDIR or /tmp): teardown_loop_last.log, and
# teardown_loop_fail_<run>.log for a run that failed. Exit status 0 when every run passed.
#
#   bash tests/scripts/teardown_loop.sh 30
#   LOAD=1 bash tests/scripts/teardown_loop.sh 30
set -u
runs=${1:-30}
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
logs=${FAIL_LOG_DIR:-${TMPDIR:-/tmp}}
work=$(mktemp -d)
load_pids=()
cleanup() {
    for pid in "${load_pids[@]}"; do kill "$pid" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT

cd "$root/tests" && "$python" - "$work" <<'EOF' || exit 1
import json, sys
from dataclasses import asdict
from pathlib import Path
sys.path[:0] = [".", ".."]
from conftest import TINY, gradient_photos
from data_prep.prep import prep
tmp = Path(sys.argv[1])
prep("folder", gradient_photos(tmp / "src"), str(tmp / "data"), samples_per_shard=16, resolution=8,
     num_valid=8, progress=False)
(tmp / "tiny.json").write_text(json.dumps(asdict(TINY)))
EOF
cd "$root" || exit 1

for _ in $(seq 1 "${LOAD:-0}"); do
    yes > /dev/null &
    load_pids+=($!)
done
extra=()
for kv in ${RANK_ENV:-}; do extra+=(-x "$kv"); done

failed=0 aborted=0
for i in $(seq 1 "$runs"); do
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    rm -rf "$work/run"
    env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u MASTER_ADDR PMIX_MCA_psec=native \
        mpirun --allow-run-as-root --oversubscribe -n 2 -x "MASTER_PORT=$port" -x DS_ACCELERATOR=cpu \
        -x OMP_NUM_THREADS=1 -x "PYTHONPATH=${EXTRA_PYTHONPATH:+$EXTRA_PYTHONPATH:}$root" "${extra[@]}" \
        "$python" -m launch.cli train --preset cifar10 --data "$work/data" --run-dir "$work/run" \
        "model_json=$work/tiny.json" batch_per_gpu=4 workers=0 log_every=1 max_steps=2 zero_stage=2 \
        > "$work/out" 2>&1
    rc=$?
    cp "$work/out" "$logs/teardown_loop_last.log"
    if [ $rc -ne 0 ]; then
        failed=$((failed + 1))
        if grep -q "signal 6\|terminate called" "$work/out"; then aborted=$((aborted + 1)); fi
        cp "$work/out" "$logs/teardown_loop_fail_$i.log"
        echo "run $i: exit $rc (log: $logs/teardown_loop_fail_$i.log)"
        grep -m3 "terminate called\|signal 6\|Error" "$work/out"
    else
        echo "run $i: ok"
    fi
done
echo "runs $runs, passed $((runs - failed)), failed $failed, aborted (signal 6) $aborted"
[ $failed -eq 0 ]
