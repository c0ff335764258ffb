"""`vdvae submit train | prep | eval`: render an sbatch script (launch/slurm.py) and submit it."""

from __future__ import annotations

import argparse
import sys

from data_prep.storage import LocalStore
from pipeline.config import batch_problem, check_data
from pipeline.status import record_job

from ..slurm import PREP_LAUNCHERS, Resources, SubmitError, absolute, eval_script, prep_scripts, sbatch, train_script
from .data import PREP_OPTIONS, prep_arguments
from .models import EVAL_OPTIONS, eval_arguments
from .train import run_config, train_arguments


def _resources(args: argparse.Namespace, default_name: str) -> Resources:
    return Resources(job_name=args.job_name or default_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, mem=args.mem,
                     mem_per_task=args.mem_per_task, partition=args.partition, account=args.account,
                     time=args.time, extra_sbatch=args.sbatch or [], setup=args.setup or [])


def _local_or_url(value: str) -> str:
    return value if "://" in value else str(absolute(value))


def _as_flags(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The given options as command-line flags again (switches when on, values when set)."""
    flags = []
    for name in names:
        value = getattr(args, name)
        if value is True:
            flags.append(f"--{name.replace('_', '-')}")
        elif value is not None and value is not False:  # (0 is a value: `in (None, False)` would drop it)
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def _cmd_submit_train(args: argparse.Namespace) -> int:
    if args.config:  # the saved run, rendered as the settings it was made with (a requeue reruns them)
        saved = run_config(args)
        args.preset, args.data, args.run_dir = saved.preset, saved.data, saved.run_dir
        args.overrides = list(saved.overrides)
    run_dir = absolute(args.run_dir)
    data = _local_or_url(args.data)
    config = run_config(argparse.Namespace(preset=args.preset, data=data, run_dir=str(run_dir), config=None,
                                           overrides=args.overrides))  # bad settings fail here
    res = _resources(args, f"vdvae-{args.preset}")
    problem = batch_problem(config, check_data(config), res.nodes * res.tasks)
    if problem:  # (the job would stop at its start, before any process group)
        print(f"warning: {problem}", file=sys.stderr)
    script = train_script(res, args.preset, data, run_dir, args.overrides, grace=args.signal_grace)
    if args.dry_run:
        print(script, end="")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    job = sbatch(script)
    record_job(run_dir, job)  # (for `vdvae status RUN`)
    LocalStore(run_dir / "jobs").write_bytes(f"{job}.sbatch", script.encode())  # what ran, as submitted
    print(f"submitted training job {job}: {res.nodes} node(s) x {res.tasks} task(s)")
    print(f"  log:         {run_dir}/slurm-{job}.out")
    print(f"  watch:       tensorboard --logdir {run_dir}/tensorboard")
    print("  preemption:  checkpoints and requeues itself; resubmitting the same command resumes too")
    return 0


def _cmd_submit_prep(args: argparse.Namespace) -> int:
    src = absolute(args.src)
    if not src.exists():
        raise SubmitError(f"--src {src} does not exist (the jobs read it from the same path: a shared folder)")
    prep_args = [args.dataset, "--src", str(src), "--out", _local_or_url(args.out), *_as_flags(args, PREP_OPTIONS)]
    log_dir = absolute(args.log_dir)
    scripts = prep_scripts(_resources(args, f"vdvae-prep-{args.dataset}"), prep_args, log_dir, args.ranks,
                           array=args.array, launcher=args.launcher)
    if args.dry_run:
        print("\n# ---- then, after every array task succeeded:\n".join(scripts), end="")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    job = sbatch(scripts[0])
    if args.array:
        finalize = sbatch(scripts[1], f"--dependency=afterok:{job}")
        print(f"submitted prep array job {job} ({args.ranks} tasks) and finalize job {finalize}")
        print(f"  logs: {log_dir}/prep-{job}_*.out, {log_dir}/prep-finalize-{finalize}.out")
    else:
        print(f"submitted prep job {job} ({args.ranks} ranks)")
        print(f"  log: {log_dir}/prep-{job}.out")
    return 0


def _cmd_submit_eval(args: argparse.Namespace) -> int:
    source = absolute(args.source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: not a run folder, weights file or official checkpoint")
    eval_args = [str(source), "--data", _local_or_url(args.data), *_as_flags(args, EVAL_OPTIONS)]
    log_dir = absolute(args.log_dir) if args.log_dir else (source if source.is_dir() else absolute("."))
    script = eval_script(_resources(args, "vdvae-eval"), eval_args, log_dir)
    if args.dry_run:
        print(script, end="")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    job = sbatch(script)
    print(f"submitted eval job {job}; bits/dim in {log_dir}/eval-{job}.out")
    return 0


def _slurm_options(q: argparse.ArgumentParser, nodes: bool) -> None:
    g = q.add_argument_group("Slurm resources (default: the cluster's)")
    if nodes:
        g.add_argument("--nodes", type=int, default=1, help="nodes (default %(default)s)")
        g.add_argument("--gpus-per-node", type=int, default=1,
                       help="GPUs per node; one training task per GPU (default %(default)s; 0 for CPU nodes)")
        g.add_argument("--tasks-per-node", type=int, help="tasks per node (default: one per GPU)")
    else:
        q.set_defaults(nodes=1, tasks_per_node=None)
        g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per task (default %(default)s)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--mem", help="memory per node, e.g. 400G")
    g.add_argument("--mem-per-task", help="memory per task, e.g. 48G (sbatch --mem = this x tasks per node)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--time", help="wall-time limit, e.g. 2-00:00:00")
    g.add_argument("--job-name")
    g.add_argument("--sbatch", action="append", metavar="OPTION",
                   help="another #SBATCH option, written --sbatch=--qos=high (repeatable)")
    g.add_argument("--setup", action="append", metavar="LINE",
                   help="a shell line run first in the job, e.g. 'module load cuda' (repeatable)")
    q.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")


def add_commands(sub) -> None:
    p = sub.add_parser(
        "submit", help="submit training, prep or eval to Slurm (sbatch)",
        description="Render an sbatch script from the templates in launch/ and submit it with sbatch. "
                    "Credentials and the S3 endpoint (AWS_*) reach the job through the environment of "
                    "this shell; nothing secret is written into the script. Every option is checked "
                    "before it reaches the script. --dry-run prints the script.")
    jobs = p.add_subparsers(dest="job", required=True, metavar="JOB")

    q = jobs.add_parser("train", help="a DeepSpeed training job, one task per GPU, requeued on preemption",
                        description="Training on --nodes x --gpus-per-node ranks started by srun. On the "
                                    "preemption signal (--signal-grace seconds before the time limit, or "
                                    "scancel --signal=USR1 --batch) every rank checkpoints and the job "
                                    "requeues itself; it resumes from the run folder's latest checkpoint.")
    train_arguments(q)
    q.add_argument("--signal-grace", type=int, default=300,
                   help="seconds before the time limit that Slurm signals the job to checkpoint "
                        "(default %(default)s)")
    _slurm_options(q, nodes=True)
    q.set_defaults(func=_cmd_submit_train)

    q = jobs.add_parser("prep", help="dataset sharding as MPI ranks, or as an array job plus a finalize job",
                        description="`vdvae prep` on --ranks processes: MPI ranks in one job (mpirun inside "
                                    "the allocation, or srun with PMIx), or with --array an array job of "
                                    "--ranks tasks and a finalize job that writes the manifests after them.")
    prep_arguments(q)
    q.add_argument("--ranks", type=int, default=2, help="processes (MPI ranks or array tasks; default %(default)s)")
    q.add_argument("--array", action="store_true", help="an array job plus a finalize job instead of MPI")
    q.add_argument("--launcher", choices=tuple(PREP_LAUNCHERS), default="mpirun",
                   help="how MPI ranks start (default %(default)s; srun needs Slurm built with PMIx)")
    q.add_argument("--log-dir", default="vdvae-logs", help="folder for the job logs (default ./%(default)s)")
    _slurm_options(q, nodes=False)
    q.set_defaults(func=_cmd_submit_prep)

    q = jobs.add_parser("eval", help="a job that prints the test bits/dim of a model",
                        description="`vdvae eval` as a one-task job; the bits/dim line is in its log.")
    eval_arguments(q)
    q.add_argument("--log-dir", help="folder for the job log (default: the run folder, else ./)")
    _slurm_options(q, nodes=False)
    q.set_defaults(func=_cmd_submit_eval)
