"""Everything that can be checked before the process group is checked there, with the file and line."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.prep import prep
from pipeline.config import ConfigError, RunConfig, check_data, check_run_folder, precision_warning

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data32(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("checks")
    src = tmp / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / f"{i}.png")
    prep("folder", src, str(tmp / "data"), samples_per_shard=4, resolution=32, num_valid=4, progress=False)
    return str(tmp / "data")


@pytest.mark.parametrize("setting", ["lr=inf", "lr=nan", "grad_clip=-inf", "skip_threshold=inf", "ema_rate=nan"])
def test_non_finite_numbers_are_refused(setting):
    with pytest.raises(ConfigError, match="finite"):
        RunConfig.from_preset("cifar10", "d", "r", [setting])


def test_a_saved_config_with_a_non_finite_number_is_refused(tmp_path):
    text = RunConfig.from_preset("cifar10", "d", "r").to_json().replace('"lr": 0.0002', '"lr": Infinity')
    with pytest.raises(ConfigError, match="lr=inf is not a finite number"):
        RunConfig.from_json(text)


def _malformed(path: Path) -> Path:
    path.write_text('{\n "zero_optimization": {"overlap_comm": true},\n "oops"\n}\n')
    return path


def test_malformed_json_files_are_named_with_the_line(tmp_path, data32):
    bad = _malformed(tmp_path / "ds.json")
    with pytest.raises(ConfigError, match=rf"deepspeed_json {bad} is not valid JSON: .* at line 4"):
        RunConfig.from_preset("cifar10", "d", "r", [f"deepspeed_json={bad}"])
    with pytest.raises(ConfigError, match=rf"model_json {bad} is not valid JSON: .* at line 4"):
        RunConfig.from_preset("cifar10", "d", "r", [f"model_json={bad}"])
    run = tmp_path / "run"
    run.mkdir()
    _malformed(run / "config.json")
    with pytest.raises(ConfigError, match=rf"{run / 'config.json'} is not valid JSON: .* at line 4"):
        check_run_folder(RunConfig.from_preset("cifar10", data32, str(run)))
    copy = tmp_path / "data"
    import shutil

    shutil.copytree(data32, copy)
    _malformed(copy / "valid" / "manifest.json")
    with pytest.raises(ConfigError, match=rf"{copy / 'valid' / 'manifest.json'} is not valid JSON: .* line 4"):
        check_data(RunConfig.from_preset("cifar10", str(copy), "r"))


@pytest.mark.parametrize("extra, message", [
    ({"zero_optimization": {"stage": 3}}, r"zero_optimization.stage=3 \(the run's zero_stage gives 2\)"),
    ({"train_micro_batch_size_per_gpu": 2}, r"train_micro_batch_size_per_gpu=2 \(the run's batch_per_gpu gives 16\)"),
    ({"gradient_clipping": 1.0}, r"gradient_clipping=1.0 \(the run's grad_clip gives 200"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled=True \(the run's precision gives False\)"),
    ({"optimizer": {"params": {"lr": 0.1}}}, r"optimizer.params.lr=0.1 \(the run's lr gives 0.0002\)"),
    ({"scheduler": {"type": "WarmupLR"}}, r"sets a scheduler"),
])
def test_a_deepspeed_json_that_contradicts_the_run_is_refused_with_both_values(tmp_path, extra, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(extra))
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_preset("cifar10", "d", "r", [f"deepspeed_json={path}"])
    agreeing = tmp_path / "same.json"  # repeating our own value, or adding a setting, is fine
    agreeing.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}}))
    assert RunConfig.from_preset("cifar10", "d", "r", [f"deepspeed_json={agreeing}"]).deepspeed_config(
        1, False)["zero_optimization"]["overlap_comm"] is True


def _train_on_two_ranks(data: str, run: Path, port: int, *settings: str) -> list[tuple[int, str, float]]:
    cmd = [sys.executable, "-m", "launch.cli", "train", "--preset", "cifar10", "--data", data, "--run-dir",
           str(run), "workers=0", "max_steps=1", *settings]
    start, procs = time.time(), []
    for rank in range(2):
        env = dict(os.environ, DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        results.append((proc.returncode, err, time.time() - start))
    return results


@pytest.mark.parametrize("problem", ["missing shard", "batch too large", "bad deepspeed_json"])
def test_problems_stop_every_rank_before_the_process_group(data32, tmp_path, free_port, problem):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data32, data)
    settings = ["batch_per_gpu=2"]
    if problem == "missing shard":
        (data / "train" / "train-000001.tar").unlink()
        expected = "1 shards its manifest lists are missing (train-000001.tar)"
    elif problem == "batch too large":
        settings = ["batch_per_gpu=5"]
        expected = "holds 8 samples, fewer than one batch of 5 for each of 2 ranks"
    else:
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({"gradient_accumulation_steps": 4}))
        settings.append(f"deepspeed_json={ds}")
        expected = "gradient_accumulation_steps=4 (the run's grad_accum gives 1)"
    for code, err, _ in _train_on_two_ranks(str(data), tmp_path / "run", free_port, *settings):
        assert code == 2 and expected in err, err[-2000:]
        assert "Traceback" not in err and "gloo" not in err.lower()
    assert not (tmp_path / "run").exists()  # nothing written: the checks come first


def test_train_from_a_saved_config_and_its_errors(tmp_path, capsys):
    from launch.cli import main as cli_main

    saved = RunConfig.from_preset("cifar10", str(tmp_path / "data"), str(tmp_path / "run"), ["lr=1e-4"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(saved.to_json())
    import argparse

    from launch.commands.train import run_config

    again = run_config(argparse.Namespace(preset=None, data=None, run_dir=None, config=str(tmp_path / "run"),
                                          overrides=["max_steps=5"]))
    assert again.lr == 1e-4 and again.max_steps == 5 and again.run_dir == saved.run_dir
    assert again.overrides == ("lr=1e-4", "max_steps=5")
    assert cli_main(["train", "--config", str(tmp_path / "run" / "config.json"), "--preset", "cifar10"]) == 2
    assert "leave out --preset" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(tmp_path / "nowhere.json")]) == 2
    assert "--config" in (err := capsys.readouterr().err) and "No such file" in err
    assert cli_main(["train", "--preset", "cifar10"]) == 2
    assert "give --data, --run-dir (or --config RUN/config.json" in capsys.readouterr().err


def test_bf16_where_it_is_emulated_is_warned_of_and_fp32_suggested():
    bf16 = RunConfig.from_preset("cifar10", "d", "r", ["precision=bf16", "zero_stage=1"])
    warning = precision_warning(bf16, bf16_native=False)
    assert "without native bf16" in warning and "use precision=fp32" in warning
    assert precision_warning(bf16, bf16_native=True) is None
    assert precision_warning(RunConfig.from_preset("cifar10", "d", "r", []), bf16_native=False) is None
