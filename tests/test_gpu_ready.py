"""The training path as a GPU runs it, checked on CPU ranks: collectives on the engine's device (or the
gloo control group), no read-back to the host on the hot path, torch's fused AdamW and no JIT-built op."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_train
from test_train import launch, losses

data = test_train.data  # the fixture: the tiny model's prepared dataset

ROOT = Path(__file__).resolve().parents[1]


def _env(rank: int, world: int, port: int) -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT))


@pytest.mark.parametrize("stage", [3])  # the most collectives (gathers, reduce-scatters); the trainer's are the same at 0-2
def test_collectives_on_the_engine_device_and_no_host_read_outside_logging(data, tmp_path, free_port, stage):
    run, world = tmp_path / "run", 2
    procs = []
    for rank in range(world):
        cmd = [sys.executable, str(ROOT / "tests/scripts/watch_train.py"), str(tmp_path / f"report{rank}.json"),
               "train", "--preset", "cifar10", "--data", data["data"], "--run-dir", str(run),
               f"model_json={data['model_json']}", "batch_per_gpu=4", "workers=0", f"zero_stage={stage}",
               "max_steps=8", "log_every=4", "checkpoint_every=100", "eval_every=100", "sample_every=100"]
        procs.append(subprocess.Popen(cmd, env=_env(rank, world, free_port), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (out[-2000:], err[-4000:])
    for rank in range(world):
        report = json.loads((tmp_path / f"report{rank}.json").read_text())
        assert report["steps"] == 8
        in_run = [c for c in report["collectives"] if c["in_run"]]
        assert in_run, "the watcher saw no collective: it watches the wrong functions"
        for c in report["collectives"]:
            expected = [report["device"]] if c["default_group"] else ["cpu"]  # the control group is gloo
            assert c["devices"] in ([], expected), c
        # no host read on the hot path: only logging (steps 4 and 8), the update rule, periodic work
        assert report["host_reads"] == [], report["host_reads"][:5]
        # the losses of steps 1-3 and 5-7 were read back at the logging steps, in one collective each
        window_reads = [c for c in in_run if c["name"] == "all_reduce" and c["step"] in (4, 8)]
        assert window_reads
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/elbo" in r] == [4, 8]


_BUILD = r"""
import json, sys
import torch
import deepspeed
from deepspeed.ops.op_builder.builder import OpBuilder

built = []
def refuse(self, *args, **kwargs):
    built.append(type(self).__name__)
    raise RuntimeError(f"op builder {type(self).__name__} invoked")
OpBuilder.load = OpBuilder.jit_load = OpBuilder.builder = refuse

from pipeline.config import RunConfig
from pipeline.distributed import init_distributed
from model import VDVAE

init_distributed()
results = []
for stage in (0, 2, 3):
    config = RunConfig.from_preset("cifar10", "d", "r", sys.argv[2:] + [f"zero_stage={stage}"])
    model = VDVAE(config.model_config())
    ds = config.deepspeed_config(1, on_gpu=True)  # the JSON a GPU run gets, on this CPU rank
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    for _ in range(2):
        engine.backward(engine(images).elbo)
        engine.step()
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = next(iter(inner.state.values()))
    results.append({"stage": stage, "ds_optimizer": ds["optimizer"], "fused": inner.defaults.get("fused"),
                    "class": type(inner).__module__ + "." + type(inner).__name__, "state": sorted(state)})
    engine.destroy()
print(json.dumps({"results": results, "built": built}))
"""


def test_gpu_deepspeed_json_selects_torch_fused_adamw_and_builds_no_op(data, tmp_path, free_port):
    script = tmp_path / "build.py"
    script.write_text(_BUILD)
    out = subprocess.run([sys.executable, str(script), "x", f"model_json={data['model_json']}"],
                         env=_env(0, 1, free_port), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["stage"] for r in report["results"]] == [0, 2, 3]
    for result in report["results"]:
        assert result["ds_optimizer"]["params"]["torch_adam"] is True and result["ds_optimizer"]["params"]["fused"]
        assert result["class"] == "torch.optim.adamw.AdamW" and result["fused"] is True, result
        assert result["state"] == ["exp_avg", "exp_avg_sq", "step"], result  # what DeepSpeed's checkpoints hold
    assert report["built"] == []


def test_compile_true_trains_like_eager(data, tmp_path, free_port):
    """`compile=true` (inductor on CPU) at ZeRO-2, checkpointed: the same per-step losses as eager,
    within float rounding."""
    settings = ("zero_stage=2", "max_steps=3", "activation_checkpointing=all")
    launch(data, tmp_path / "eager", free_port, *settings, world=1)
    launch(data, tmp_path / "compiled", free_port, *settings, "compile=true", world=1)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == [1, 2, 3]
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_compile_true_is_refused_at_zero_3():
    from pipeline.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="compile=true works at zero_stage 0, 1 or 2"):
        RunConfig.from_preset("cifar10", "d", "r", ["zero_stage=3", "compile=true"])
