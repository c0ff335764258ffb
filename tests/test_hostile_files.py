"""No file from a run folder, a checkpoint mirror or a user can run code: each is refused, named."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import ROOT, data, launch  # noqa: F401 (data: the module's prepared-dataset fixture)

from launch.cli import main as cli_main


class _Evil:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    """Replace a torch file by one whose unpickling would create `marker`."""
    torch.save({"module": _Evil(marker)}, path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):  # noqa: F811
    """A finished 1-rank ZeRO-2 run (step 2), copied fresh for each test by `fresh_run`."""
    folder = tmp_path_factory.mktemp("hostile") / "run"
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch(data, folder, port, "zero_stage=2", "max_steps=2", "checkpoint_every=2", world=1)
    return folder


@pytest.fixture
def fresh_run(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _vdvae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)


@pytest.mark.parametrize("victim", ["ema_rank00000.pt", "mp_rank_00_model_states.pt",
                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_planted_pickle_in_a_run_folder_is_refused_by_export_sample_and_eval(fresh_run, tmp_path, victim, data,  # noqa: F811
                                                                               capsys):
    marker = tmp_path / "pwned"
    folder = fresh_run / "checkpoints" / "global_step2"
    _plant(folder / victim, marker)
    for args in (["export", "--run-dir", str(fresh_run), "--out", str(tmp_path / "out")],
                 ["sample", str(fresh_run), "--out", str(tmp_path / "s.png")],
                 ["eval", str(fresh_run), "--data", data["data"], "--split", "valid", "--workers", "0"]):
        assert cli_main(args) == 2, args  # (in this process: an exception other than the refusal would raise)
        err = capsys.readouterr().err
        assert f"{folder / victim}" in err and "cannot be loaded safely" in err, err[-2000:]
        assert not marker.exists()
    out = _vdvae("export", "--run-dir", str(fresh_run), "--out", str(tmp_path / "out"))  # as a user sees it
    assert out.returncode == 2 and "Traceback" not in out.stderr and "cannot be loaded safely" in out.stderr
    assert not marker.exists()


def test_a_planted_pickle_stops_the_resume_before_anything_runs(fresh_run, tmp_path, data, free_port):  # noqa: F811
    marker = tmp_path / "pwned"
    _plant(fresh_run / "checkpoints" / "global_step2" / "mp_rank_00_model_states.pt", marker)
    procs = launch(data, fresh_run, free_port, "zero_stage=2", "max_steps=4", "checkpoint_every=2", world=1,
                   wait=False)
    out, err = procs[0].communicate(timeout=600)
    assert procs[0].returncode == 2 and "cannot be loaded safely" in err and "mp_rank_00_model_states.pt" in err
    assert not marker.exists()


def test_a_planted_pickle_in_the_s3_mirror_is_refused(data, tmp_path, free_port, bucket, s3_server):  # noqa: F811
    run = tmp_path / "run"
    mirror = f"s3://{bucket}/runs/evil"
    launch(data, run, free_port, "zero_stage=2", "max_steps=2", "checkpoint_every=2",
           f"checkpoint_mirror={mirror}", world=1)
    marker, planted = tmp_path / "pwned", tmp_path / "evil.pt"
    _plant(planted, marker)
    s3_server["client"].upload_file(str(planted), bucket, "runs/evil/global_step2/ema_rank00000.pt")
    shutil.rmtree(run / "checkpoints")  # the node is gone: the resume reads the mirror
    procs = launch(data, run, free_port, "zero_stage=2", "max_steps=4", "checkpoint_every=2",
                   f"checkpoint_mirror={mirror}", world=1, wait=False)
    out, err = procs[0].communicate(timeout=600)
    assert procs[0].returncode == 2 and "ema_rank00000.pt" in err and "cannot be loaded safely" in err, err[-2000:]
    assert not marker.exists()


def test_user_weights_files_that_would_run_code_are_refused(tmp_path, capsys):
    marker, planted = tmp_path / "pwned", tmp_path / "evil.th"
    _plant(planted, marker)
    assert cli_main(["sample", str(planted), "--out", str(tmp_path / "s.png"), "--preset", "cifar10"]) == 2
    assert "cannot be loaded safely" in capsys.readouterr().err
    assert cli_main(["import-official", str(planted), "--preset", "cifar10", "--out", str(tmp_path / "w.pt")]) == 2
    assert "cannot be loaded safely" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "w.pt").exists()
