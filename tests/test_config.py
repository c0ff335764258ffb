"""The run config: the preset's numbers, typed overrides, validation, the DeepSpeed JSON, and the data check."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.prep import prep
from model import PRESETS
from pipeline.config import ConfigError, RunConfig, check_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_numbers_are_the_papers(name):
    c, t = RunConfig.from_preset(name, "s3://b/d", "run"), PRESETS[name].training
    assert (c.batch_per_gpu, c.lr, c.grad_clip, c.skip_threshold, c.ema_rate) == \
        (t.batch_per_gpu, t.lr, t.grad_clip, t.skip_threshold, t.ema_rate)
    assert (c.weight_decay, (c.adam_beta1, c.adam_beta2), c.warmup_iters) == (0.01, (0.9, 0.9), 100)


def test_overrides_are_typed_recorded_and_checked():
    c = RunConfig.from_preset("ffhq256", "d", "r", ["lr=1e-4", "zero_stage=3", "precision=bf16",
                                                     "activation-checkpointing=128"])
    assert c.lr == 1e-4 and c.zero_stage == 3 and c.precision == "bf16" and c.activation_checkpointing == "128"
    assert c.grad_clip == 130 and c.overrides == ("lr=1e-4", "zero_stage=3", "precision=bf16",
                                                  "activation-checkpointing=128")
    with pytest.raises(ConfigError, match="unknown setting 'grad_clp'; did you mean grad_clip"):
        RunConfig.from_preset("ffhq256", "d", "r", ["grad_clp=1"])
    with pytest.raises(ConfigError, match="zero_stage='two': expected int"):
        RunConfig.from_preset("ffhq256", "d", "r", ["zero_stage=two"])
    with pytest.raises(ConfigError, match="zero_stage must be 0, 1, 2 or 3"):
        RunConfig.from_preset("ffhq256", "d", "r", ["zero_stage=4"])
    with pytest.raises(ConfigError, match="expected key=value"):
        RunConfig.from_preset("ffhq256", "d", "r", ["lr"])
    with pytest.raises(ConfigError, match="preset"):
        RunConfig.from_preset("ffhq256", "d", "r", ["preset=cifar10"])  # not an override: a new run
    with pytest.raises(ValueError, match="unknown preset"):
        RunConfig.from_preset("ffhq512", "d", "r")


def test_saved_config_round_trips_and_refuses_unknown_keys():
    c = RunConfig.from_preset("cifar10", "s3://b/c10", "runs/a", ["ema_rate=0.99"])
    assert RunConfig.from_json(c.to_json()) == c
    data = json.loads(c.to_json())
    data["mystery"] = 1
    with pytest.raises(ConfigError, match="mystery"):
        RunConfig.from_json(json.dumps(data))


def test_deepspeed_json(tmp_path):
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True}))
    c = RunConfig.from_preset("imagenet32", "d", "r", ["grad_accum=2", "zero_stage=3", "precision=bf16",
                                                        f"deepspeed_json={extra}"])
    ds = c.deepspeed_config(world_size=4, on_gpu=False)
    assert ds["train_batch_size"] == 8 * 2 * 4 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": True,
                                       "reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000,
                                       "stage3_prefetch_bucket_size": 5_000_000}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["wall_clock_breakdown"]
    assert ds["optimizer"]["params"] == {"lr": 1.5e-4, "betas": [0.9, 0.9], "eps": 1e-8, "weight_decay": 0.01,
                                         "torch_adam": True, "fused": False}
    assert ds["gradient_clipping"] == 200 and "scheduler" not in ds  # the trainer's: it skips yet schedules
    assert RunConfig.from_preset("imagenet32", "d", "r", ["zero_stage=0"]).deepspeed_config(1, False)[
        "gradient_clipping"] == 0.0  # stage 0: the update rule clips
    with pytest.raises(ConfigError, match="stage 0 supports fp32 only"):
        RunConfig.from_preset("imagenet32", "d", "r", ["zero_stage=0", "precision=bf16"])
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_preset("imagenet32", "d", "r", [f"deepspeed_json={tmp_path / 'nope.json'}"])


def _prepared(tmp_path: Path, size: int) -> str:
    src = tmp_path / f"src{size}"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(src / f"{i}.png")
    prep("folder", src, str(tmp_path / f"data{size}"), samples_per_shard=4, resolution=size, num_valid=2,
         progress=False)
    return str(tmp_path / f"data{size}")


def test_data_is_checked_against_the_preset(tmp_path):
    data32 = _prepared(tmp_path, 32)
    assert check_data(RunConfig.from_preset("cifar10", data32, "r")) == {"train": 4, "valid": 2}
    with pytest.raises(ConfigError, match="holds 32 px images; preset imagenet64 trains on 64 px"):
        check_data(RunConfig.from_preset("imagenet64", data32, "r"))
    with pytest.raises(ConfigError, match="prepared as 8-bit data .* preset ffhq256 models 5-bit"):
        check_data(RunConfig.from_preset("ffhq256", _prepared(tmp_path, 256), "r"))
    with pytest.raises(ValueError, match="manifest.json does not exist"):
        check_data(RunConfig.from_preset("cifar10", str(tmp_path / "none"), "r"))


def test_train_dry_run_prints_config_and_deepspeed_json(tmp_path):
    data = _prepared(tmp_path, 32)
    cmd = [sys.executable, "-m", "launch.cli", "train", "--preset", "cifar10", "--data", data,
           "--run-dir", str(tmp_path / "run"), "lr=1e-4", "--dry-run", "--world-size", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert '"lr": 0.0001' in out.stdout and '"train_batch_size": 32' in out.stdout
    assert "train 4 samples, valid 2 samples" in out.stdout
    bad = subprocess.run(cmd[:-3] + ["lerning_rate=1", "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown setting 'lerning_rate'" in bad.stderr
