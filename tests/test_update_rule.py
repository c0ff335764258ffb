"""The paper's update rule and EMA on 2 real DeepSpeed ranks (gloo, CPU) at every ZeRO stage."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "update_rule.py"


def run_two_ranks(stage: int, port: int) -> list[dict]:
    procs = []
    for rank in range(2):
        env = dict(os.environ, DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), str(stage)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_update_rule_and_ema(stage, free_port):
    ranks = run_two_ranks(stage, free_port)
    for r in ranks:
        # step 0: taken; the pre-clip norm over all shards equals one process's norm of the same gradients
        assert r["norms"][0] == pytest.approx(r["reference_norm"], rel=1e-4)
        assert r["skipped"] == [False, True, True, False]  # NaN on rank 1 only, then over the threshold
        assert not math.isfinite(r["norms"][1]) and math.isfinite(r["norms"][2]) and r["norms"][2] > 1e-3
        assert r["params_changed"] == [True, False, False, True]
        assert r["ema_changed"] == [True, False, False, True]
    assert [str(n) for n in ranks[0]["norms"][1:2]] == [str(n) for n in ranks[1]["norms"][1:2]]  # every rank agrees
    assert ranks[0]["norms"][::2] == pytest.approx(ranks[1]["norms"][::2])
    if stage > 0:
        # fp16's dynamic scale: halved by the NaN (an overflow), kept by the threshold skip
        assert all(r["loss_scale"] == [1.0, 0.5, 0.5, 0.5] for r in ranks), [r["loss_scale"] for r in ranks]
        # each rank averages its own share of the fp32 master only
        assert all(r["ema_numel"] <= r["model_numel"] / 2 + 2000 for r in ranks)
        assert sum(r["ema_numel"] for r in ranks) >= ranks[0]["model_numel"]
    else:
        assert all(r["ema_numel"] == r["model_numel"] for r in ranks)
