"""`vdvae submit ... --dry-run`: the sbatch scripts rendered from launch/, and bad options refused before sbatch."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.prep import prep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submit-data")
    (tmp / "src").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp / "src" / f"{i:02d}.png")
    prep("folder", tmp / "src", str(tmp / "data"), resolution=32, num_valid=4, progress=False)
    return tmp


def vdvae(*args, cwd, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def bash_syntax_ok(script: str) -> None:
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_train_script(data, tmp_path):
    out = vdvae("submit", "train", "--preset", "cifar10", "--data", "data", "--run-dir", "runs/a", "--nodes", "4",
                "--gpus-per-node", "8", "--cpus-per-task", "6", "--mem", "400G", "--partition", "gpu",
                "--account", "proj1", "--time", "2-00:00:00", "--job-name", "c10", "--sbatch=--qos=high",
                "--setup", "module load cuda/12.4", "--setup", "source /opt/venv/bin/activate",
                "--signal-grace", "600", "zero_stage=2", "lr=1e-4", "--dry-run", cwd=data,
                env={"AWS_SECRET_ACCESS_KEY": "very-secret-value", "AWS_ACCESS_KEY_ID": "AKIDSECRETID"})
    assert out.returncode == 0, out.stderr
    script = out.stdout
    bash_syntax_ok(script)
    lines = script.splitlines()
    for option in ("--job-name=c10", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=6",
                   "--mem=400G", "--partition=gpu", "--account=proj1", "--time=2-00:00:00", "--qos=high",
                   "--requeue", "--signal=B:USR1@600", "--open-mode=append", "--export=ALL",
                   f"--output={data}/runs/a/slurm-%j.out"):
        assert f"#SBATCH {option}" in lines, option
    assert lines.index("module load cuda/12.4") < lines.index("source /opt/venv/bin/activate") < \
        next(i for i, line in enumerate(lines) if line.startswith("srun"))
    (srun,) = [line for line in lines if line.startswith("srun")]
    assert srun.startswith("srun --kill-on-bad-exit=1 --cpus-per-task=6 ")
    assert srun.endswith(f" train --preset cifar10 --data {data}/data --run-dir {data}/runs/a zero_stage=2 "
                         "lr=1e-4 &")
    assert "scontrol requeue" in script and "trap 'forward USR1' USR1" in script
    assert "very-secret-value" not in script and "AKIDSECRETID" not in script
    assert not (data / "runs").exists()  # a dry run creates nothing


def test_memory_per_task_becomes_memory_per_node(data):
    out = vdvae("submit", "train", "--preset", "cifar10", "--data", "data", "--run-dir", "r", "--gpus-per-node", "4",
                "--mem-per-task", "48G", "--dry-run", cwd=data)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --mem=192G" in out.stdout and "#SBATCH --ntasks-per-node=4" in out.stdout
    both = vdvae("submit", "train", "--preset", "cifar10", "--data", "data", "--run-dir", "r", "--mem", "1G",
                 "--mem-per-task", "48G", "--dry-run", cwd=data)
    assert both.returncode == 2 and "not both" in both.stderr


def test_cpu_nodes_get_one_task_each_and_no_gpu_request(data):
    out = vdvae("submit", "train", "--preset", "cifar10", "--data", "data", "--run-dir", "r", "--nodes", "2",
                "--gpus-per-node", "0", "--dry-run", cwd=data)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --ntasks-per-node=1" in out.stdout and "gpus" not in out.stdout


@pytest.mark.parametrize("args, message", [
    (["lr=fast"], "lr"),
    (["warmup=5"], "warmup"),
    (["--signal-grace", "3"], "--signal-grace"),
    (["--job-name", "a b"], "job name"),
    (["--sbatch=qos=high"], "--qos=high"),
    (["--nodes", "0"], "--nodes"),
    (["--mem", "lots"], "--mem"),
])
def test_bad_train_options_fail_before_sbatch(data, args, message):
    out = vdvae("submit", "train", "--preset", "cifar10", "--data", "data", "--run-dir", "r", *args, cwd=data)
    assert out.returncode == 2 and message in out.stderr and out.stdout == "", out.stderr
    assert not (data / "r").exists()


def test_missing_data_is_named_before_sbatch(data):
    out = vdvae("submit", "train", "--preset", "cifar10", "--data", "nowhere", "--run-dir", "r", cwd=data)
    assert out.returncode == 2 and "nowhere/train/manifest.json does not exist" in out.stderr


def test_without_sbatch_the_error_says_where_to_submit_from(data, tmp_path):
    out = vdvae("submit", "train", "--preset", "cifar10", "--data", "data", "--run-dir", str(tmp_path / "r"),
                cwd=data, env={"PATH": str(Path(sys.executable).parent)})
    assert out.returncode == 2 and "sbatch not found" in out.stderr and "--dry-run" in out.stderr


def test_prep_scripts(data):
    mpi = vdvae("submit", "prep", "folder", "--src", "src", "--out", "s3://bucket/x", "--ranks", "8",
                "--resolution", "8", "--dry-run", cwd=data)
    assert mpi.returncode == 0, mpi.stderr
    bash_syntax_ok(mpi.stdout)
    assert "#SBATCH --ntasks=8" in mpi.stdout
    assert f"\nmpirun {sys.executable} -m launch.cli prep folder --src {data}/src --out s3://bucket/x " \
           "--resolution 8\n" in mpi.stdout
    srun = vdvae("submit", "prep", "folder", "--src", "src", "--out", "s3://bucket/x", "--launcher", "srun",
                 "--dry-run", cwd=data)
    assert "\nsrun --kill-on-bad-exit=1 --mpi=pmix " in srun.stdout
    array = vdvae("submit", "prep", "folder", "--src", "src", "--out", "out", "--ranks", "5", "--array",
                  "--overwrite", "--dry-run", cwd=data)
    assert array.returncode == 0, array.stderr
    first, second = array.stdout.split("# ---- then, after every array task succeeded:")
    bash_syntax_ok(first)
    bash_syntax_ok(second)
    assert "#SBATCH --array=0-4" in first and "--finalize" not in first
    assert f"prep folder --src {data}/src --out {data}/out --overwrite --finalize" in second
    missing = vdvae("submit", "prep", "folder", "--src", "nope", "--out", "out", "--dry-run", cwd=data)
    assert missing.returncode == 2 and "nope does not exist" in missing.stderr


def test_eval_script(data):
    out = vdvae("submit", "eval", str(data / "data"), "--data", "data", "--split", "valid", "--gpus-per-node", "1",
                "--dry-run", cwd=data)
    assert out.returncode == 0, out.stderr
    bash_syntax_ok(out.stdout)
    assert "#SBATCH --gpus-per-task=1" in out.stdout
    assert f"srun --ntasks=1 {sys.executable} -m launch.cli eval {data}/data --data {data}/data --split valid" \
        in out.stdout
