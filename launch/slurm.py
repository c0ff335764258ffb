"""`vdvae submit`: render an sbatch script from a template beside this file and submit it.

The scripts carry no secrets: credentials and the S3 endpoint reach the job
through the environment (`#SBATCH --export=ALL`), from the shell that submits.

Nothing a user gives becomes a shell command (other than the --setup lines,
which are shell by design, one line each). A value written into an `#SBATCH`
line is checked against what sbatch reads there: sbatch runs no shell on it,
but a newline ends the directive, whitespace ends the value, quotes and a
backslash are taken out, `#` starts a comment and `%` is a file-name pattern.
Every value written into the script's shell text is `shlex.quote`d.
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

from pipeline.distributed import REQUEUE_EXIT_CODE

PREP_LAUNCHERS = {"mpirun": "mpirun", "srun": "srun --kill-on-bad-exit=1 --mpi=pmix"}
"""How `vdvae submit prep` starts MPI ranks: mpirun inside the allocation, or srun with Slurm's PMIx."""

TEMPLATES = Path(__file__).resolve().parent
_FIELD = re.compile(r"\{\{(\w+)\}\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""Control characters (newline, carriage return, NUL, ...) and Unicode's line separators."""
_CONTROL_IN_LINE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
"""The same, less the tab: what one shell line (--setup) may not hold."""
_NAME = re.compile(r"[A-Za-z0-9_.,-]+")
_MEMORY = re.compile(r"([0-9]+)([KMGT]?)")
_TIME = re.compile(r"[0-9]+(:[0-9]+){0,2}|[0-9]+-[0-9]+(:[0-9]+){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)
_EXTRA = re.compile(r"--[a-z][a-z0-9-]*(=[^\s'\"#$`\\\x00-\x1f\x7f-\x9f]+)?")
_PATH_UNSAFE = re.compile(r"[\s%'\"#\\\x00-\x1f\x7f-\x9f]")
"""What a path in `#SBATCH --output=` may not hold: sbatch ends the value at whitespace, takes quotes and
backslashes out (a backslash also turns off its %j patterns), starts a comment at #, reads % as a pattern."""


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
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
                raise SubmitError(f"{_option(name)} {value!r}: a whole number")
            if value is not None and (value < (0 if name == "gpus_per_node" else 1)):
                raise SubmitError(f"{_option(name)} must be at least "
                                  f"{0 if name == 'gpus_per_node' else 1}, not {value}")
        for name in ("job_name", "mem", "mem_per_task", "partition", "account", "time"):
            if getattr(self, name) is not None:
                _sbatch_value(_option(name), getattr(self, name))
        if self.mem and self.mem_per_task:
            raise SubmitError("give --mem (per node) or --mem-per-task, not both")
        for name in ("mem", "mem_per_task"):
            value = getattr(self, name)
            if value is not None and not _MEMORY.fullmatch(value):
                raise SubmitError(f"{_option(name)} {value!r}: a number with an optional unit "
                                  "K, M, G or T, e.g. 64G")
        if not _NAME.fullmatch(self.job_name):
            raise SubmitError(f"--job-name {self.job_name!r}: the job name may use letters, digits, '.', "
                              "'_', ',' or '-'")
        for name in ("partition", "account"):
            value = getattr(self, name)
            if value is not None and not _NAME.fullmatch(value):
                raise SubmitError(f"{_option(name)} {value!r}: letters, digits, '.', '_', ',' or '-'"
                                  + (" (a comma-separated list for several)" if name == "partition" else ""))
        if self.time is not None and not _TIME.fullmatch(self.time):
            raise SubmitError(f"--time {self.time!r}: a wall-time limit in sbatch's syntax: MM, MM:SS, "
                              "HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED")
        for line in self.extra_sbatch:
            _sbatch_value("--sbatch", line)
            if not _EXTRA.fullmatch(line):
                raise SubmitError(f"--sbatch {line!r}: give an sbatch option as it follows '#SBATCH', as one "
                                  "word: for example --sbatch=--qos=high (a long option, its value after '=', "
                                  "no whitespace, quotes, '#', '$', '`' or backslash)")
        for line in self.setup:
            if not isinstance(line, str) or _CONTROL_IN_LINE.search(line):
                raise SubmitError(f"--setup {line!r}: one shell line per --setup, with no newline, carriage "
                                  "return, NUL or other control character; repeat --setup for more lines")

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
            number, unit = _MEMORY.fullmatch(self.mem_per_task).groups()
            mem = f"{int(number) * (self.tasks if per_node else 1)}{unit}"
        for option, value in (("cpus-per-task", self.cpus_per_task), ("mem", mem),
                              ("partition", self.partition), ("account", self.account), ("time", self.time)):
            if value is not None:
                lines.append(f"--{option}={value}")
        lines += self.extra_sbatch
        return "\n".join(f"#SBATCH {line}" for line in lines)


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _sbatch_value(option: str, value: str) -> None:
    """Refuse a value for an #SBATCH line that is not a string or holds a character that would end the line."""
    if not isinstance(value, str):
        raise SubmitError(f"{option} {value!r}: not a string")
    if _CONTROL.search(value):
        raise SubmitError(f"{option} {value!r}: no newline, carriage return, NUL or other control character "
                          "may appear in a value written into an #SBATCH line")


def _sbatch_path(option: str, path: Path | str) -> str:
    """The path as written after `#SBATCH --output=`, or a SubmitError naming the option and the fix."""
    text = str(path)
    found = _PATH_UNSAFE.search(text)
    if found:
        raise SubmitError(f"{option} {text!r}: the job log is written there through '#SBATCH --output=', "
                          f"where sbatch cannot take {found.group()!r}; choose a folder whose path has no "
                          "whitespace, '%', quotes, '#', backslash or control character")
    return text


def vdvae_command() -> str:
    """How a job starts `vdvae`: the interpreter running this command, so the job uses the same install."""
    return f"{shlex.quote(sys.executable)} -m launch.cli"


def render(template: str, **values: str) -> str:
    """The template with every {{field}} replaced; a field without a value is an error, not a blank."""
    text = (TEMPLATES / template).read_text()
    missing = sorted(set(_FIELD.findall(text)) - set(values))
    if missing:
        raise KeyError(f"{template}: no value for {', '.join(missing)}")
    # Blank runs are closed up in the template (where empty fields leave them), never inside a value:
    # a quoted argument keeps its newlines.
    text = _FIELD.sub(lambda m: m.group(0) if str(values[m.group(1)]) else "", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return _FIELD.sub(lambda m: str(values[m.group(1)]), text)


def _common(res: Resources, log_dir: Path, option: str, per_node: bool = True) -> dict[str, str]:
    """The fields every template has; `log_dir` is checked for `#SBATCH --output=`, named as `option`."""
    return {"job_name": res.job_name, "log_dir": _sbatch_path(option, log_dir),
            "python": shlex.quote(sys.executable), "vdvae": vdvae_command(),
            "sbatch_lines": res.sbatch_lines(per_node), "setup": "\n".join(res.setup)}


def _quote(args: list[str], what: str) -> str:
    """The arguments as shell words; a NUL, which no command line can carry, is refused."""
    for arg in args:
        if not isinstance(arg, str):
            raise SubmitError(f"{what} {arg!r}: not a string")
        if "\0" in arg:
            raise SubmitError(f"{what} {arg!r}: holds a NUL character, which no command line can carry")
    return " ".join(shlex.quote(a) for a in args)


def train_script(res: Resources, preset: str, data: str, run_dir: Path, overrides: list[str],
                 grace: int = 300) -> str:
    """The training job: res.nodes x res.tasks ranks, requeued after a preemption checkpoint."""

    if not isinstance(grace, int) or isinstance(grace, bool):
        raise SubmitError(f"--signal-grace {grace!r}: a whole number of seconds")
    if grace < 10:
        raise SubmitError(f"--signal-grace {grace}: give the training at least 10 s to checkpoint")
    args = ["--preset", preset, "--data", data, "--run-dir", str(run_dir), *overrides]
    srun_args = ""
    if res.cpus_per_task:
        srun_args = f"--cpus-per-task={res.cpus_per_task} "
    return render("train.sbatch", **_common(res, run_dir, "--run-dir"), nodes=str(res.nodes),
                  tasks_per_node=str(res.tasks), grace=str(grace), requeue_code=str(REQUEUE_EXIT_CODE),
                  srun_args=srun_args, train_args=_quote(args, "training argument"))


def prep_scripts(res: Resources, prep_args: list[str], log_dir: Path, ranks: int,
                 array: bool = False, launcher: str = "mpirun") -> list[str]:
    """The prep job: `ranks` MPI ranks in one job, or an array of `ranks` tasks plus a finalize job."""
    if not isinstance(ranks, int) or isinstance(ranks, bool):
        raise SubmitError(f"--ranks {ranks!r}: a whole number")
    if ranks < 1:
        raise SubmitError(f"--ranks must be at least 1, not {ranks}")
    common = _common(res, log_dir, "--log-dir", per_node=False)
    quoted = _quote(prep_args, "prep argument")
    if array:
        return [render("prep_array.sbatch", **common, ntasks=str(ranks), last_task=str(ranks - 1),
                       prep_args=quoted),
                render("prep_finalize.sbatch", **common, prep_args=quoted)]
    launchers = PREP_LAUNCHERS
    if launcher not in launchers:
        raise SubmitError(f"--launcher {launcher!r}: choose mpirun (inside the allocation) or srun "
                          "(needs Slurm's PMIx support)")
    return [render("prep.sbatch", **common, ntasks=str(ranks), launcher=launchers[launcher],
                   prep_args=quoted)]


def eval_script(res: Resources, eval_args: list[str], log_dir: Path) -> str:
    return render("eval.sbatch", **_common(res, log_dir, "--log-dir", per_node=False),
                  eval_args=_quote(eval_args, "eval argument"))


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
