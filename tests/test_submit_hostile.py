"""`vdvae submit`'s scripts against hostile input: a value that would end an #SBATCH line or break out into
the shell is refused, naming its option; a value written into shell text stays one intact argument when the
rendered script runs (under bash, with stub srun/scontrol/mpirun/sbatch that record their arguments)."""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch.slurm import Resources, SubmitError, eval_script, prep_scripts, train_script
from pipeline.distributed import REQUEUE_EXIT_CODE
from pipeline.health import STUCK_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]

# Stubs for the Slurm and MPI commands: record their arguments (NUL-separated, one file per call) and
# exit 0. srun and mpirun never start the command they are given.
RECORD = 'f=$(mktemp "$STUB_LOG/{name}.XXXXXX") && printf \'%s\\0\' "$@" > "$f"\n'
STUBS = {
    "srun": RECORD.format(name="srun") + 'e=$(mktemp "$STUB_LOG/srun-env.XXXXXX") && printf \'%s\\0\' '
            '"MASTER_ADDR=${MASTER_ADDR-}" "MASTER_PORT=${MASTER_PORT-}" "VDVAE_SETUP_RAN=${VDVAE_SETUP_RAN-}" '
            '> "$e"\n' + 'exit "${STUB_SRUN_STATUS:-0}"\n',
    "mpirun": RECORD.format(name="mpirun"),
    "sbatch": RECORD.format(name="sbatch") + "echo 1\n",
    "scontrol": RECORD.format(name="scontrol") + 'case "$1 $2" in\n'
                '  "show hostnames") printf "node-a\\nnode-b\\n" ;;\n'
                '  "show node") printf "NodeName=%s Arch=x86_64 NodeAddr=%s NodeHostName=%s State=IDLE\\n" '
                '"$4" "$STUB_NODEADDR" "$4" ;;\n'
                "esac\n",
}


@dataclass
class Job:
    """A place to run rendered scripts: stub commands first on PATH, and an interpreter (sys.executable
    while the scripts are rendered) at a path with a space, a quote and a command substitution in it."""

    tmp: Path
    work: Path
    log: Path
    bin: Path
    python: str
    node_addr: str = "10.1.2.3"

    def run(self, script: str, srun_status: int = 0) -> subprocess.CompletedProcess:
        path = self.tmp / f"job-{len(list(self.tmp.glob('job-*.sbatch')))}.sbatch"
        path.write_text(script)
        env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "OMPI_", "PMI"))}
        env.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT), STUB_LOG=str(self.log),
                   STUB_NODEADDR=self.node_addr, DS_ACCELERATOR="cpu", MASTER_ADDR="stale-from-submit-shell",
                   MASTER_PORT="1", SLURM_JOB_ID="4242", SLURM_JOBID="4242", SLURM_JOB_NODELIST="node-[a-b]",
                   SLURM_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NTASKS="4",
                   SLURM_RESTART_COUNT="0", SLURM_SUBMIT_DIR=str(self.work), SLURM_ARRAY_JOB_ID="4242",
                   SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="2", STUB_SRUN_STATUS=str(srun_status))
        return subprocess.run(["bash", str(path)], cwd=self.work, env=env, capture_output=True, text=True,
                              timeout=120)

    def calls(self, name: str) -> list[list[str]]:
        return [path.read_bytes().decode().split("\0")[:-1] for path in sorted(self.log.glob(f"{name}.*"))]

    def srun_env(self) -> dict[str, str]:
        (path,) = self.log.glob("srun-env.*")
        return dict(item.split("=", 1) for item in path.read_bytes().decode().split("\0")[:-1])

    def assert_no_marker(self) -> None:
        markers = [str(p) for p in self.tmp.rglob("pwned*")]
        assert markers == [], f"a hostile value ran as a command: {markers}"

    def ran(self, result: subprocess.CompletedProcess) -> None:
        assert result.returncode == 0, result.stdout + result.stderr
        self.assert_no_marker()
        assert self.calls("sbatch") == []


@pytest.fixture
def job(tmp_path, monkeypatch):
    work, log, bin_dir = tmp_path / "work", tmp_path / "log", tmp_path / "bin"
    for folder in (work, log, bin_dir):
        folder.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body + "exit 0\n")
        (bin_dir / name).chmod(0o755)
    # The interpreter the scripts name: it records its arguments, runs the real one for the rendezvous
    # (pipeline.distributed) and starts nothing else.
    py_dir = tmp_path / "py it's $(touch pwned-python)"
    py_dir.mkdir()
    python = py_dir / "python"
    real = shlex.quote(sys.executable)
    python.write_text("#!/bin/sh\n" + RECORD.format(name="python")
                      + f'if [ "$1 $2" = "-m pipeline.distributed" ]; then exec {real} "$@"; fi\n' + "exit 0\n")
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    return Job(tmp=tmp_path, work=work, log=log, bin=bin_dir, python=str(python))


def refused(option: str, call, control: bool = False) -> str:
    with pytest.raises(SubmitError) as error:
        call()
    message = str(error.value)
    assert message.startswith(f"{option} "), message
    assert "\n" not in message and "\r" not in message and "\0" not in message
    if control:
        assert "control character" in message, message
    return message


NEWLINE = "x\ntouch /tmp/pwned-MARKER"
CONTROL = [NEWLINE, "x\rtouch /tmp/pwned-MARKER", "x\0touch", "x\x1b[2J", "x\x85touch", "x\u2028touch"]
SHELL = ["x; touch pwned-MARKER", "$(touch pwned-MARKER)", "`touch pwned-MARKER`", "x y", "x'y", 'x"y', "x#y",
         "x|touch", "x&&touch", "x>pwned", "x\\y", "x%j", "x\ty"]


@pytest.mark.parametrize("value", CONTROL + SHELL + ["", "gp\u00fc", "a/b", "a:b", "a=b"])
@pytest.mark.parametrize("name", ["partition", "account", "job_name"])
def test_names_are_refused_unless_letters_digits_and_dot_underscore_comma_dash(name, value):
    kwargs = {"job_name": "ok", name: value}
    refused(f"--{name.replace('_', '-')}", lambda: Resources(**kwargs), control=value in CONTROL)


@pytest.mark.parametrize("value", CONTROL + SHELL + ["10 --qos=high", "1:2:3:4", "1-2-3", "-1", "1d", "forever"])
def test_time_is_refused_unless_sbatch_time_syntax(value):
    refused("--time", lambda: Resources(job_name="ok", time=value), control=value in CONTROL)


@pytest.mark.parametrize("value", ["30", "30:00", "12:30:00", "2-00", "2-12:30", "2-00:00:00", "UNLIMITED",
                                   "infinite"])
def test_sbatch_time_syntax_is_kept(value):
    assert f"#SBATCH --time={value}" in Resources(job_name="ok", time=value).sbatch_lines(per_node=True)


@pytest.mark.parametrize("value", ["64G\ntouch /tmp/pwned-MARKER", "64G\r", "64\0G", "\uff16\uff14G", "64G; touch",
                                   "$(touch pwned-MARKER)G"])
@pytest.mark.parametrize("name", ["mem", "mem_per_task"])
def test_memory_is_refused_unless_ascii_digits_and_a_unit(name, value):
    refused(f"--{name.replace('_', '-')}", lambda: Resources(job_name="ok", **{name: value}),
            control=any(c in value for c in "\n\r\0"))


@pytest.mark.parametrize("value", ["--qos=high\ntouch /tmp/pwned-MARKER", "--qos=high\r", "--qos=$(touch pwned)",
                                   "--comment=`touch pwned`", "--qos high", "--comment='a'", '--comment="a"',
                                   "--qos=high#x", "--qos=a\\b", "--qos=\x1b", "-p gpu", "qos=high", "--QOS=high",
                                   "--=x", "--qos="])
def test_extra_sbatch_options_are_refused_unless_one_long_option_word(value):
    refused("--sbatch", lambda: Resources(job_name="ok", extra_sbatch=["--exclusive", value]),
            control=any(c in value for c in "\n\r\x1b"))


def test_valid_extra_sbatch_options_are_kept():
    lines = Resources(job_name="ok", extra_sbatch=["--qos=high", "--exclusive", "--constraint=a100|h100",
                                                   "--mail-user=me@example.org"]).sbatch_lines(per_node=True)
    assert lines.splitlines() == ["#SBATCH --qos=high", "#SBATCH --exclusive", "#SBATCH --constraint=a100|h100",
                                  "#SBATCH --mail-user=me@example.org"]


@pytest.mark.parametrize("value", ["module load cuda\ntouch /tmp/pwned-MARKER", "module load cuda\r",
                                   "module\0load", "echo \x1b]0;x\x07"])
def test_setup_lines_are_refused_unless_one_line(value):
    refused("--setup", lambda: Resources(job_name="ok", setup=["module load cuda/12.4", value]), control=True)


def test_setup_lines_stay_shell():
    res = Resources(job_name="ok", setup=["module load cuda/12.4", "source \"$HOME/venv/bin/activate\"\t# venv"])
    assert res.setup == ["module load cuda/12.4", "source \"$HOME/venv/bin/activate\"\t# venv"]


UNSAFE_PATHS = [NEWLINE, "/runs/a\rb", "/runs/a\0b", "/runs/a b", "/runs/a\tb", "/runs/%j", "/runs/a'b", '/runs/a"b',
                "/runs/a#b", "/runs/a\\b", "/runs/a\x1bb", "/runs/a\u2028b", "/runs/a\u00a0b"]


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_run_dir_is_refused_where_sbatch_cannot_write_the_log(path):
    message = refused("--run-dir", lambda: train_script(Resources(job_name="ok"), "cifar10", "data", Path(path), []),
                      control=True)
    assert "choose a folder" in message


@pytest.mark.parametrize("path", UNSAFE_PATHS)
@pytest.mark.parametrize("render", ["prep", "prep_array", "eval"])
def test_log_dir_is_refused_where_sbatch_cannot_write_the_log(path, render):
    res = Resources(job_name="ok")
    call = {"prep": lambda: prep_scripts(res, ["folder"], Path(path), 2),
            "prep_array": lambda: prep_scripts(res, ["folder"], Path(path), 2, array=True),
            "eval": lambda: eval_script(res, ["/run"], Path(path))}[render]
    message = refused("--log-dir", call, control=True)
    assert "choose a folder" in message


def test_arguments_no_command_line_can_carry_are_refused():
    res = Resources(job_name="ok")
    refused("training argument", lambda: train_script(res, "cifar10", "data", Path("/r"), ["lr=1\x00e-4"]))
    refused("prep argument", lambda: prep_scripts(res, ["folder", "--src", "/a\x00b"], Path("/l"), 2))
    refused("eval argument", lambda: eval_script(res, ["/run\x00"], Path("/l")))


def test_numbers_must_be_numbers():
    refused("--nodes", lambda: Resources(job_name="ok", nodes="2\ntouch /tmp/pwned-MARKER"))
    refused("--ranks", lambda: prep_scripts(Resources(job_name="ok"), ["folder"], Path("/l"), "2\ntouch"))
    refused("--signal-grace", lambda: train_script(Resources(job_name="ok"), "p", "d", Path("/r"), [], grace="60;x"))


# Hostile but allowed: these reach the script only as shell words, and must arrive as themselves.
DATA = "s3://bucket/it's $(touch pwned-data)"
OVERRIDES = ["lr=1e-4", "note='; touch pwned-quote; '", "lines=a\n\n\ntouch pwned-newline\n", "sub=$(touch pwned-sub)",
             "tick=`touch pwned-tick`", "amp=x & touch pwned-amp", "glob=*", "tab=\tx"]


def sbatch_directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_train_script_passes_hostile_values_as_single_arguments(job):
    run_dir = job.tmp / "runs" / ";touch${IFS}pwned-run|`touch${IFS}pwned-tick`&$(touch${IFS}pwned-sub)"
    res = Resources(job_name="hostile", nodes=2, gpus_per_node=2, cpus_per_task=3, partition="gpu,gpu-long",
                    time="1-00:00", extra_sbatch=["--qos=high"], setup=["export VDVAE_SETUP_RAN=yes"])
    script = train_script(res, "cifar10", DATA, run_dir, OVERRIDES)
    assert f"#SBATCH --output={run_dir}/slurm-%j.out" in sbatch_directives(script)
    job.ran(job.run(script))
    (srun,) = job.calls("srun")
    assert srun == ["--kill-on-bad-exit=1", "--cpus-per-task=3", job.python, "-m", "launch.cli", "train",
                    "--preset", "cifar10", "--data", DATA, "--run-dir", str(run_dir), *OVERRIDES]
    # The rendezvous comes from `python -m pipeline.distributed rendezvous`, not from the submitting shell.
    assert job.calls("python") == [["-m", "pipeline.distributed", "rendezvous"]]
    env = job.srun_env()
    assert env["MASTER_ADDR"] == "10.1.2.3" and re.fullmatch(r"[0-9]+", env["MASTER_PORT"]), env
    assert env["MASTER_PORT"] != "1" and env["VDVAE_SETUP_RAN"] == "yes"
    assert ["show", "hostnames", "node-[a-b]"] in job.calls("scontrol")
    assert not any(call[:1] == ["requeue"] for call in job.calls("scontrol"))


def test_a_hostile_node_address_is_never_run(job):
    job.node_addr = "$(touch${IFS}pwned-addr)`touch${IFS}pwned-tick`;touch${IFS}pwned-semi"
    result = job.run(train_script(Resources(job_name="ok"), "cifar10", "data", job.tmp / "run", []))
    job.assert_no_marker()
    assert job.calls("python") == [["-m", "pipeline.distributed", "rendezvous"]]
    if job.calls("srun"):  # passed on as the address it is, or refused by the rendezvous command
        assert result.returncode == 0 and job.srun_env()["MASTER_ADDR"] == job.node_addr
    else:
        assert result.returncode != 0


def prep_args(job: Job) -> list[str]:
    src = job.tmp / "src $(touch pwned-src)" / "it's"
    return ["folder", "--src", str(src), "--out", "s3://b/x;touch pwned-out\n\n\n`touch pwned-tick`",
            "--resolution", "8"]


@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
def test_prep_script_passes_hostile_values_as_single_arguments(job, launcher):
    args = prep_args(job)
    (script,) = prep_scripts(Resources(job_name="prep", cpus_per_task=2, setup=["true"]), args,
                             job.tmp / "logs$(touch${IFS}pwned-log)", 4, launcher=launcher)
    job.ran(job.run(script))
    command = [job.python, "-m", "launch.cli", "prep", *args]
    if launcher == "mpirun":
        assert job.calls("mpirun") == [command] and job.calls("srun") == []
    else:
        assert job.calls("srun") == [["--kill-on-bad-exit=1", "--mpi=pmix", *command]] and job.calls("mpirun") == []


def test_prep_array_and_finalize_scripts_pass_hostile_values_as_single_arguments(job):
    args = prep_args(job)
    array, finalize = prep_scripts(Resources(job_name="prep"), args, job.tmp / "logs", 3, array=True)
    assert "#SBATCH --array=0-2" in sbatch_directives(array)
    job.ran(job.run(array))
    assert job.calls("python") == [["-m", "launch.cli", "prep", *args]]
    job.ran(job.run(finalize))
    assert sorted(job.calls("python")) == sorted([["-m", "launch.cli", "prep", *args],
                                                  ["-m", "launch.cli", "prep", *args, "--finalize"]])
    assert job.calls("srun") == [] and job.calls("mpirun") == []


def test_eval_script_passes_hostile_values_as_single_arguments(job):
    args = [str(job.tmp / "run $(touch pwned-run)" / "it's"), "--data", DATA, "--split", "valid\n\n\n;touch pwned-x"]
    script = eval_script(Resources(job_name="eval", gpus_per_node=1), args, job.tmp / "logs")
    job.ran(job.run(script))
    assert job.calls("srun") == [["--ntasks=1", job.python, "-m", "launch.cli", "eval", *args]]


@pytest.mark.parametrize("status, requeued", [(REQUEUE_EXIT_CODE, True), (STUCK_EXIT_CODE, False), (1, False)])
def test_the_train_script_requeues_a_preemption_only(job, status, requeued):
    """85 (every rank checkpointed on a signal) requeues; 86 (stopped by an alarm) and a crash do not."""
    script = train_script(Resources(job_name="j"), "cifar10", DATA, job.tmp / "run", [])
    result = job.run(script, srun_status=status)
    assert any(call[:1] == ["requeue"] for call in job.calls("scontrol")) == requeued, result.stdout
    assert result.returncode == (0 if requeued else status)
