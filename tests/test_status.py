"""`vdvae status RUN` on real run folders: a finished run (with an S3 mirror), a running one, one whose
Slurm commands fail or are missing, and `--watch`. A preempted-and-requeued job on the test Slurm cluster:
tests/test_slurm.py's end-to-end test asks `vdvae status` about it."""

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.status import JOBS_NAME, run_status
from test_train import data, launch, records  # noqa: F401  (`data`: the prepared 8 px dataset)

ROOT = Path(__file__).resolve().parents[1]
CLEAR_SCREEN = "\033[H\033[2J"


def status(run: Path, *options: str, env: dict | None = None, code: int = 0) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "launch.cli", "status", str(run), *options], cwd=ROOT,
                         env={**(env or os.environ), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == code, (out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr
    return out


def status_json(run: Path, env: dict | None = None) -> dict:
    return json.loads(status(run, "--json", env=env).stdout)  # stdout is the object and nothing else


@pytest.fixture(scope="module")
def finished(data, s3_server, tmp_path_factory):  # noqa: F811
    """A run trained to its max_steps on one rank, its checkpoints mirrored to S3."""
    run = tmp_path_factory.mktemp("finished") / "run"
    s3_server["client"].create_bucket(Bucket="status-mirror")
    with socket.socket() as sock:  # a free port for the rendezvous (conftest's free_port is per test)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch(data, run, port, "zero_stage=2", "max_steps=4", "checkpoint_every=2", "eval_every=4",
           "checkpoint_mirror=s3://status-mirror/run", world=1)
    return run


def test_a_finished_run(finished):
    got = status_json(finished)
    train, evaluation = records(finished)[-1], records(finished, "eval")[-1]
    assert got["preset"] == "cifar10" and got["data"].endswith("data") and got["max_steps"] == 4
    assert got["step"] == 4 and got["done"] is True and got["eta_s"] == 0
    assert got["batch"] == {"per_gpu": 4, "grad_accum": 1, "global": 4, "ranks": 1}
    assert got["images_seen"] == 16
    assert got["train"] == {"step": 4, "bpd": train["train/bpd"], "elbo": train["train/elbo"]}
    assert got["eval"] == {"step": 4, "bpd": evaluation["eval/bpd"], "elbo": evaluation["eval/elbo"],
                           "images": 8}
    assert got["window"]["from_step"] == 0 and got["window"]["to_step"] == 4
    assert got["window"]["skip_rate"] == train["train/skipped_updates"] / 4
    assert got["window"]["nan_rate"] == train["train/nan_losses"] / 4
    assert got["images_per_s"] == train["train/images_per_s"] and got["window"]["step_time_s"] > 0
    assert got["checkpoint"]["tag"] == "global_step4" and got["checkpoint"]["step"] == 4
    assert got["mirror"] == {"url": "s3://status-mirror/run", "tag": "global_step4", "step": 4}
    groups = train.get("latents/active_groups")  # (logged by training where pipeline/latents.py is in)
    assert got["active_groups"] == (None if groups is None else {"step": 4, "value": groups})
    assert got["jobs"] == [] and got["jobs_recorded"] == 0 and got["log"]["exists"]

    text = status(finished).stdout
    print("\n" + text)
    assert f"({got['preset']}, data {got['data']})" in text
    assert re.search(r"^step +4 of 4 \(100\.0 %\), 16 images seen \(4 a step: 4 per GPU x 1 rank x grad_accum 1\)$",
                     text, re.MULTILINE)
    assert f"{train['train/bpd']:.4f} bits/dim at step 4" in text
    assert f"{evaluation['eval/bpd']:.4f} bits/dim at step 4 on 8 images" in text
    assert "; done" in text and "global_step4" in text
    assert re.search(r"^mirror +s3://status-mirror/run: global_step4$", text, re.MULTILINE)
    assert re.search(r"^latents +-$" if groups is None else rf"^latents +{groups:g} active groups at step 4$",
                     text, re.MULTILINE)
    assert re.search(r"^slurm +-$", text, re.MULTILINE)


def copy_of(run: Path, into: Path) -> Path:
    """The files status reads of a run folder (not the checkpoints' weights)."""
    into.mkdir()
    for name in ("config.json", "log.jsonl"):
        shutil.copy(run / name, into / name)
    (into / "checkpoints").mkdir()
    shutil.copy(run / "checkpoints" / "latest", into / "checkpoints" / "latest")
    return into


def test_a_mirror_that_cannot_be_read_and_slurm_commands_that_fail_are_lines(finished, tmp_path):
    run = copy_of(finished, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "checkpoint_mirror": "s3://no-such-bucket-here/x"}))
    (run / JOBS_NAME).write_text('{"job": "41", "submitted": "2026-01-01T00:00:00+00:00"}\nnot json\n'
                                 '{"job": "42", "submitted": "2026-01-02T00:00:00+00:00"}\n')
    (run / "log.jsonl").write_text((run / "log.jsonl").read_text() + '{"step": 5, "train/el')  # a line being written
    down = "slurm_load_jobs error: Unable to contact slurm controller"  # and accounting is off
    env = fake_slurm(tmp_path / "bin", squeue=(1, down), scontrol=(1, down),
                     sacct=(1, "Slurm accounting storage is disabled"))
    got = status_json(run, env)
    assert got["step"] == 4 and got["mirror"]["tag"] is None and "no-such-bucket-here" in got["mirror"]["error"]
    assert [job["job"] for job in got["jobs"]] == ["42", "41"] and got["jobs"][0]["state"] is None
    assert got["jobs"][0]["notes"] == ["squeue failed: slurm_load_jobs error: Unable to contact slurm controller",
                                       "scontrol failed: slurm_load_jobs error: Unable to contact slurm controller",
                                       "sacct unavailable (Slurm accounting storage is disabled)"]
    text = status(run, env=env).stdout
    assert re.search(r"^mirror +s3://no-such-bucket-here/x: error: .*no-such-bucket-here", text, re.MULTILINE)
    assert re.search(r"^job 42 +state unknown, restarts \?, submitted 2026-01-02 00:00:00$", text, re.MULTILINE)
    assert "sacct unavailable (Slurm accounting storage is disabled)" in text

    got = status_json(run, {**os.environ, "PATH": str(tmp_path / "nothing")})  # no Slurm installed at all
    assert got["jobs"][0]["notes"] == ["squeue not installed", "scontrol not installed",
                                       "sacct unavailable (sacct not installed)"]


def fake_slurm(folder: Path, **replies: tuple[int, str]) -> dict:
    """An environment whose Slurm commands are shell stubs: name -> (exit status, output)."""
    folder.mkdir()
    for name, (code, text) in replies.items():
        (folder / name).write_text(f"#!/bin/sh\ncat <<'EOF' >&{1 if code == 0 else 2}\n{text}\nEOF\nexit {code}\n")
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:/usr/bin:/bin"}


def test_a_submitted_job_that_has_not_started_yet(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / JOBS_NAME).write_text('{"job": "7", "submitted": "2026-01-02T03:04:05+00:00"}\n')
    env = fake_slurm(tmp_path / "bin", squeue=(0, "7|PENDING|0:00|1-00:00:00|(Priority)"),
                     scontrol=(0, "JobId=7 JobName=vdvae-cifar10 JobState=PENDING Reason=Priority Requeue=1 "
                                  "Restarts=0 BatchFlag=1 ExitCode=0:0 RunTime=00:00:00 TimeLimit=1-00:00:00"),
                     sacct=(1, "sacct: should not be asked while the job is queued"))
    got = status_json(run, env)
    assert got["started"] is False and got["preset"] is None and got["step"] == 0 and got["eta_s"] is None
    assert got["jobs"] == [{"job": "7", "state": "PENDING", "elapsed": "0:00", "time_limit": "1-00:00:00",
                            "where": "(Priority)", "restarts": 0, "exit_code": "0:0", "notes": [],
                            "submitted": "2026-01-02T03:04:05+00:00"}]
    text = status(run, env=env).stdout
    assert "(submitted; no config.json yet: training has not started)" in text
    assert re.search(r"^job 7 +PENDING, ran 0:00 of 1-00:00:00, \(Priority\), restarts 0, submitted "
                     r"2026-01-02 03:04:05$", text, re.MULTILINE)


def test_not_a_run_folder_is_an_error_naming_it(tmp_path):
    out = status(tmp_path, code=2)
    assert out.stderr.splitlines()[-1] == f"error: {tmp_path} is not a run folder (no config.json)"
    out = status(tmp_path / "missing", "--json", code=2)
    assert f"{tmp_path / 'missing'} is not a run folder" in out.stderr and out.stdout == ""


def test_watch_redraws_until_ctrl_c(finished):
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "status", str(finished), "--watch", "0.2"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C as typed
    try:
        shown, deadline = "", time.time() + 120
        while shown.count(CLEAR_SCREEN) < 3:  # two whole refreshes, and the start of a third
            assert proc.poll() is None and time.time() < deadline, (shown, proc.stderr.read())
            if select.select([proc.stdout], [], [], 1)[0]:
                shown += os.read(proc.stdout.fileno(), 65536).decode()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    screens = shown.split(CLEAR_SCREEN)[1:3]
    assert all("global_step4" in screen and "Ctrl-C to stop" in screen for screen in screens)


def test_a_running_run(data, tmp_path, free_port):  # noqa: F811
    run = tmp_path / "run"
    procs = launch(data, run, free_port, "zero_stage=2", "max_steps=100000", "checkpoint_every=100000",
                   world=1, wait=False)
    try:
        deadline = time.time() + 300
        while True:
            assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            assert time.time() < deadline, "no step logged"
            if (run / "config.json").exists():
                got = run_status(run)
                if got["step"] >= 2:
                    break
            time.sleep(0.5)
        assert not got["done"] and got["max_steps"] == 100000 and got["train"]["step"] == got["step"]
        assert got["eta_s"] > 0 and got["images_per_s"] > 0 and got["images_seen"] == 4 * got["step"]
        assert got["checkpoint"] == {"tag": None} and got["eval"] is None
        text = status(run).stdout
        assert re.search(r"; ETA \d+ (s|min|h|d)\b.* to step 100,000", text)
        assert re.search(r"^checkpoint +none yet$", text, re.MULTILINE)
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
