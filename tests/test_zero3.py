"""The model under DeepSpeed ZeRO-3 (parameters partitioned), with and without activation checkpointing.

ZeRO-3 requires every parameter to be used only inside its owning module's
forward; this trains the tiny model for two steps on one CPU process and
checks the losses against plain PyTorch with the same optimizer.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "zero3_step.py"


@pytest.mark.parametrize("policy, reentrant", [("none", "0"), ("all", "0"), ("all", "1")])
def test_zero3_trains_like_plain_pytorch(policy, reentrant, free_port):
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port))
    out = subprocess.run([sys.executable, str(SCRIPT), policy, reentrant], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["losses"] == pytest.approx(result["reference"], rel=1e-5)
    assert result["losses"][1] != result["losses"][0]  # the step changed the weights
    assert result["sample_shape"] == [2, 8, 8, 3]
    # one process: the partition is the whole model, and the fp32 master is that partition, not a copy
    assert result["masters_shared"] and result["freed"] >= 4 * result["params"]
