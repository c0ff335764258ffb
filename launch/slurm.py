"""`vdvae submit`: render an sbatch script from a template beside this file and submit it.

The scripts carry no secrets: credentials and the S3 endpoint reach the job
through the environment (`#SBATCH --export=ALL`), from the shell that submits.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent
_FIELD = re.compile(r"\{\{(\w+)\}\}")


class SubmitError(ValueError):
    """Bad options, or sbatch refused the job; the message says which and what to do."""


@dataclass
class Resources:
    """What every job asks of Slurm; None leaves a setting to the cluster's defaults."""

    job_name: str
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    """Tasks on each node; default one per GPU (one on a node without GPUs)."""
    cpus_per_task: int | None = None
    mem: str | None = None
    """Memory per node, in sbatch's syntax (64G)."""
    mem_per_task: str | None = None
    """Memory per task (64G); becomes --mem for the node's tasks together."""
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    """Wall-time limit, in sbatch's syntax (2-00:00:00, 30)."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More `#SBATCH` options, each as written after `#SBATCH` (--qos=high)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job's command (module load ..., source venv/bin/activate)."""

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and (value < (0 if name == "gpus_per_node" else 1)):
                raise SubmitError(f"--{name.replace('_', '-')} must be at least "
                                  f"{0 if name == 'gpus_per_node' else 1}, not {value}")
        if self.mem and self.mem_per_task:
            raise SubmitError("give --mem (per node) or --mem-per-task, not both")
        for name in ("mem", "mem_per_task"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"\d+[KMGT]?", value):
                raise SubmitError(f"--{name.replace('_', '-')} {value!r}: a number with an optional unit "
                                  "K, M, G or T, e.g. 64G")
        if not re.fullmatch(r"[\w.-]+", self.job_name):
            raise SubmitError(f"job name {self.job_name!r}: use letters, digits, '.', '_' or '-'")
        for line in self.extra_sbatch:
            if not line.startswith("-"):
                raise SubmitError(f"--sbatch {line!r}: give an sbatch option as it follows '#SBATCH', "
                                  "for example --sbatch=--qos=high")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def sbatch_lines(self, per_node: bool) -> str:
        lines = []
        if self.gpus_per_node and per_node:
            lines.append(f"--gpus-per-node={self.gpus_per_node}")
        elif self.gpus_per_node:
            lines.append(f"--gpus-per-task={self.gpus_per_node}")
        mem = self.mem
        if self.mem_per_task:
            number, unit = re.fullmatch(r"(\d+)([KMGT]?)", self.mem_per_task).groups()
            mem = f"{int(number) * (self.tasks if per_node else 1)}{unit}"
        for option, value in (("cpus-per-task", self.cpus_per_task), ("mem", mem),
                              ("partition", self.partition), ("account", self.account), ("time", self.time)):
            if value is not None:
                lines.append(f"--{option}={value}")
        lines += self.extra_sbatch
        return "\n".join(f"#SBATCH {line}" for line in lines)


def vdvae_command() -> str:
    """How a job starts `vdvae`: the interpreter running this command, so the job uses the same install."""
    return f"{shlex.quote(sys.executable)} -m pipeline.cli"


def render(template: str, **values: str) -> str:
    """The template with every {{field}} replaced; a field without a value is an error, not a blank."""
    text = (TEMPLATES / template).read_text()
    missing = sorted(set(_FIELD.findall(text)) - set(values))
    if missing:
        raise KeyError(f"{template}: no value for {', '.join(missing)}")
    text = _FIELD.sub(lambda m: str(values[m.group(1)]), text)
    return re.sub(r"\n{3,}", "\n\n", text)


def _common(res: Resources, log_dir: Path, per_node: bool = True) -> dict[str, str]:
    return {"job_name": res.job_name, "log_dir": str(log_dir), "python": shlex.quote(sys.executable),
            "vdvae": vdvae_command(), "sbatch_lines": res.sbatch_lines(per_node),
            "setup": "\n".join(res.setup)}


def _quote(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def train_script(res: Resources, preset: str, data: str, run_dir: Path, overrides: list[str],
                 grace: int = 300) -> str:
    """The training job: res.nodes x res.tasks ranks, requeued after a preemption checkpoint."""
    from pipeline.train import REQUEUE_EXIT_CODE

    if grace < 10:
        raise SubmitError(f"--signal-grace {grace}: give the training at least 10 s to checkpoint")
    args = ["--preset", preset, "--data", data, "--run-dir", str(run_dir), *overrides]
    srun_args = ""
    if res.cpus_per_task:
        srun_args = f"--cpus-per-task={res.cpus_per_task} "
    return render("train.sbatch", **_common(res, run_dir), nodes=str(res.nodes), tasks_per_node=str(res.tasks),
                  grace=str(grace), requeue_code=str(REQUEUE_EXIT_CODE), srun_args=srun_args,
                  train_args=_quote(args))


def prep_scripts(res: Resources, prep_args: list[str], log_dir: Path, ranks: int,
                 array: bool = False, launcher: str = "mpirun") -> list[str]:
    """The prep job: `ranks` MPI ranks in one job, or an array of `ranks` tasks plus a finalize job."""
    if ranks < 1:
        raise SubmitError(f"--ranks must be at least 1, not {ranks}")
    common = _common(res, log_dir, per_node=False)
    if array:
        return [render("prep_array.sbatch", **common, ntasks=str(ranks), last_task=str(ranks - 1),
                       prep_args=_quote(prep_args)),
                render("prep_finalize.sbatch", **common, prep_args=_quote(prep_args))]
    launchers = {"mpirun": "mpirun", "srun": "srun --kill-on-bad-exit=1 --mpi=pmix"}
    if launcher not in launchers:
        raise SubmitError(f"--launcher {launcher!r}: choose mpirun (inside the allocation) or srun "
                          "(needs Slurm's PMIx support)")
    return [render("prep.sbatch", **common, ntasks=str(ranks), launcher=launchers[launcher],
                   prep_args=_quote(prep_args))]


def eval_script(res: Resources, eval_args: list[str], log_dir: Path) -> str:
    return render("eval.sbatch", **_common(res, log_dir, per_node=False), eval_args=_quote(eval_args))


def sbatch(script: str, *options: str) -> str:
    """Submit a script (on stdin) and return its job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SubmitError("sbatch not found: submit from a Slurm login node (or print the script "
                          "with --dry-run and submit it yourself)")
    out = subprocess.run([exe, "--parsable", *options], input=script, capture_output=True, text=True)
    if out.returncode != 0:
        raise SubmitError(f"sbatch refused the job: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def absolute(path: str) -> Path:
    """Jobs run on other nodes from the submit folder; name every local path absolutely."""
    return Path(os.path.abspath(os.path.expanduser(path)))
