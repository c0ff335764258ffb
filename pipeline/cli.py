"""The `vdvae` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_presets(args: argparse.Namespace) -> int:
    import torch

    from model import PRESETS, VDVAE

    print(f"{'preset':<11} {'px':>5} {'params':>12} {'official':>12}  batch x GPUs  lr       "
          f"clip/skip  EMA     test bpd")
    for name, p in PRESETS.items():
        with torch.device("meta"):
            n = sum(t.numel() for t in VDVAE(p.model).parameters())
        t = p.training
        official = f"{p.official_num_params:,}" if p.official_num_params else "-"
        print(f"{name:<11} {p.model.image_size:>5} {n:>12,} {official:>12}  {t.batch_per_gpu:>5} x {t.num_gpus:<4}"
              f"  {t.lr:<8g} {t.grad_clip:g}/{t.skip_threshold:<5g} {t.ema_rate:<7g} {p.official_test_bpd}")
    return 0


def _cmd_import_official(args: argparse.Namespace) -> int:
    from model import get_preset, load_official

    from .weights import save_weights

    get_preset(args.preset)  # unknown preset: fail before reading a large file
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists; pass --overwrite to replace it")
    model = load_official(args.checkpoint, args.preset)
    save_weights(model, out, preset=args.preset)
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {args.checkpoint} as preset {args.preset} ({n:,} parameters) -> {out}")
    return 0


def _cmd_prep(args: argparse.Namespace) -> int:
    from data_prep.prep import prep

    from .environment import detect_ranks

    ranks = detect_ranks()
    if ranks.launcher in ("slurm", "env") and ranks.world > 1 and not args.finalize:
        raise ValueError(f"{ranks.world} prep tasks without MPI cannot meet before the manifest is written: "
                         "start the ranks with mpirun (or srun --mpi=pmix), or run an array job and then "
                         "--finalize (vdvae submit prep does either)")
    prep(args.dataset, args.src, args.out, samples_per_shard=args.samples_per_shard,
         workers=args.workers or 1, overwrite=args.overwrite, strict=args.strict,
         resolution=args.resolution, num_valid=args.num_valid, ranks=ranks,
         finalize_only=args.finalize, progress=ranks.rank == 0 or ranks.launcher == "slurm-array")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), steps=args.steps, images=args.images)


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from .config import RunConfig, check_data

    config = RunConfig.from_preset(args.preset, args.data, args.run_dir, args.overrides)
    counts = check_data(config)
    if not args.dry_run:
        from .runtime import reexec_with_fast_allocator
        from .train import train

        reexec_with_fast_allocator()
        return train(config)
    print(f"# run config ({config.preset}; overrides: {' '.join(config.overrides) or 'none'})")
    print(config.to_json())
    print(f"# data: {', '.join(f'{k} {v:,} samples' for k, v in counts.items())}")
    print(f"# DeepSpeed JSON for {args.world_size} rank(s)")
    print(json.dumps(config.deepspeed_config(args.world_size, on_gpu=args.gpu), indent=1, sort_keys=True))
    return 0


def _load_model(source: str, preset: str | None, weights: str = "ema"):
    """A VDVAE from a run folder (its latest checkpoint; EMA weights unless weights="model"), one of
    our weights files, or an official *-model.th (needs --preset). Returns (model, preset)."""
    from model import load_official

    from .weights import load_weights

    path = Path(source)
    if path.is_dir():
        from model import VDVAE

        from .export import consolidate

        config, tag, model_sd, ema_sd = consolidate(path)
        model = VDVAE(config.model_config())
        model.load_state_dict(ema_sd if weights == "ema" else model_sd)
        print(f"{source}: {tag}, {weights} weights", file=sys.stderr)
        return model, config.preset
    if not path.is_file():
        raise FileNotFoundError(f"{source}: not a run folder, weights file or official checkpoint")
    try:
        return load_weights(path)
    except ValueError:
        if preset is None:
            raise ValueError(f"{source} is not one of our weights files; for an official checkpoint "
                             "give its --preset") from None
        return load_official(path, preset), preset


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    for path in export(args.run_dir, args.out, args.tag):
        print(path)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from model import get_preset

    from .images import make_grid, save_png

    model, preset = _load_model(args.source, args.preset, args.weights)
    model.eval()
    temperatures = [float(t) for t in args.temperatures.split(",")] if args.temperatures else \
        list(get_preset(preset).training.sample_temperatures if preset else (1.0,))
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        rows = [model.sample(args.num, t, generator=generator) for t in temperatures]
    save_png(make_grid(rows), args.out)
    print(f"{len(rows)} rows of {args.num} samples at temperatures {temperatures} -> {args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import math

    import torch

    from .stream import ShardStream

    model, _ = _load_model(args.source, args.preset, args.weights)
    model.eval()
    stream = ShardStream(f"{args.data.rstrip('/')}/{args.split}", args.batch, train=False, workers=args.workers)
    total, count, unreadable = 0.0, 0, 0
    torch.manual_seed(args.seed)
    with torch.no_grad():
        for batch in stream:
            per_image = model(batch.images).per_image_elbo.double()
            total += float((per_image * batch.valid).sum())
            count += int(batch.valid.sum())
            unreadable += batch.skipped
    elbo = total / count
    print(f"{args.split}: {elbo / math.log(2):.4f} bits/dim ({elbo:.4f} nats/dim) on {count} images"
          + (f", {unreadable} unreadable samples left out" if unreadable else ""))
    return 0


def _resources(args: argparse.Namespace, default_name: str):
    from launch.slurm import Resources

    return Resources(job_name=args.job_name or default_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, mem=args.mem,
                     mem_per_task=args.mem_per_task,
                     partition=args.partition, account=args.account, time=args.time,
                     extra_sbatch=args.sbatch or [], setup=args.setup or [])


def _local_or_url(value: str) -> str:
    from launch.slurm import absolute

    return value if "://" in value else str(absolute(value))


def _cmd_submit_train(args: argparse.Namespace) -> int:
    from launch.slurm import absolute, sbatch, train_script

    from .config import RunConfig, check_data

    run_dir = absolute(args.run_dir)
    data = _local_or_url(args.data)
    config = RunConfig.from_preset(args.preset, data, str(run_dir), args.overrides)  # bad settings fail here
    check_data(config)
    res = _resources(args, f"vdvae-{args.preset}")
    script = train_script(res, args.preset, data, run_dir, args.overrides, grace=args.signal_grace)
    if args.dry_run:
        print(script, end="")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    job = sbatch(script)
    print(f"submitted training job {job}: {res.nodes} node(s) x {res.tasks} task(s)")
    print(f"  log:         {run_dir}/slurm-{job}.out")
    print(f"  watch:       tensorboard --logdir {run_dir}/tensorboard")
    print("  preemption:  checkpoints and requeues itself; resubmitting the same command resumes too")
    return 0


def _cmd_submit_prep(args: argparse.Namespace) -> int:
    from launch.slurm import SubmitError, absolute, prep_scripts, sbatch

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
    from launch.slurm import absolute, eval_script, sbatch

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


DATASETS = ("cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq1024", "folder")


def _prep_arguments(p: argparse.ArgumentParser) -> None:
    """What `vdvae prep` and `vdvae submit prep` both take (PREP_OPTIONS: those passed on as given)."""
    p.add_argument("dataset", choices=DATASETS,
                   help="the dataset; `folder`: any folder of images, center-cropped and resized")
    p.add_argument("--src", required=True,
                   help="the dataset folder: cifar-10-batches-py/ (cifar10); train_32x32/ + valid_32x32/ "
                        "or train_data_batch_1..10 + val_data (imagenet32, and 64 alike); "
                        "images1024x1024/ or a flat folder of 00000.png ... 69999.png (ffhq256, ffhq1024); "
                        "any folder of images (folder)")
    p.add_argument("--out", required=True, help="s3://bucket/prefix or a local folder")
    p.add_argument("--samples-per-shard", type=int,
                   help="default by dataset, for shards of roughly 50-300 MB: cifar10 and imagenet32 "
                        "10000, imagenet64 4000, ffhq256 1000, ffhq1024 200, folder 1000")
    p.add_argument("--workers", type=int, help="local worker processes (per rank; default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output made with other options")
    p.add_argument("--resolution", type=int, help="folder: side of the square images written")
    p.add_argument("--num-valid", type=int, help="folder: images held out for validation (default 0)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad image instead of listing it in the manifest's rejections")


PREP_OPTIONS = ("samples_per_shard", "workers", "resolution", "num_valid", "overwrite", "strict")


def _eval_arguments(p: argparse.ArgumentParser, source_help: str) -> None:
    """What `vdvae eval` and `vdvae submit eval` both take (all passed on as given)."""
    p.add_argument("source", help=source_help)
    p.add_argument("--data", required=True, help="the prepared dataset (s3://... or a folder)")
    p.add_argument("--split", default="test", help="default test (ffhq has valid only)")
    p.add_argument("--preset", help="the preset of an official checkpoint")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="of a run folder (default ema)")


EVAL_OPTIONS = ("split", "preset", "batch", "workers", "seed", "weights")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdvae",
        description="Train Very Deep VAEs (Child, 2021) on Slurm clusters from webdataset shards on S3.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("presets", help="list the paper's presets with parameter counts and settings",
                       description="List the paper's presets: resolution, parameter count (ours and "
                                   "the official model's), batch, lr, grad clip/skip threshold, EMA, "
                                   "and the released test bits/dim.")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser(
        "import-official", help="convert a released openai/vdvae checkpoint to our weights file",
        description="Convert an official *-model.th or *-model-ema.th state dict into our weights "
                    "file (state dict + model config). Fails, listing the differences, if the file "
                    "does not fit the preset.")
    p.add_argument("checkpoint", help="path of the official *-model.th / *-model-ema.th file")
    p.add_argument("--preset", required=True, help="cifar10, imagenet32, imagenet64, ffhq256 or ffhq1024")
    p.add_argument("--out", required=True, help="path of the weights file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser(
        "prep", help="shard a dataset into webdataset tars plus a manifest, locally or on S3",
        description="Read a dataset as it is distributed, split it as the official code does, and "
                    "write <out>/<split>/<split>-NNNNNN.tar shards and <out>/<split>/manifest.json. "
                    "Rerunning after an interruption completes only what is missing. Parallel: "
                    "under mpirun (or srun with PMI) the ranks share the shards and rank 0 writes the "
                    "manifests; as a Slurm array each task writes its share and a last run with "
                    "--finalize writes the manifests.")
    _prep_arguments(p)
    p.add_argument("--finalize", action="store_true",
                   help="only write the manifests, once every shard is complete (after a Slurm array)")
    p.set_defaults(func=_cmd_prep)

    from .config import SETTINGS

    p = sub.add_parser(
        "train", help="train a preset with DeepSpeed ZeRO from prepared shards",
        description="Resolve the run config (the preset's numbers, then key=value overrides), check "
                    "the data against the preset, then train (one process per GPU or CPU rank, started "
                    "by srun, mpirun, torchrun or deepspeed), resuming from the run folder's latest "
                    "checkpoint; --dry-run prints the config and the DeepSpeed JSON instead. "
                    f"Settings: {', '.join(SETTINGS)}.")
    p.add_argument("--preset", required=True, help="cifar10, imagenet32, imagenet64, ffhq256 or ffhq1024")
    p.add_argument("--data", required=True, help="the prepared dataset (`vdvae prep --out`): s3://... or a folder")
    p.add_argument("--run-dir", required=True, help="the run folder (config, checkpoints, tensorboard/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that differ from the preset")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed JSON, then stop")
    p.add_argument("--world-size", type=int, default=1, help="ranks to size the DeepSpeed JSON for (dry run)")
    p.add_argument("--gpu", action="store_true", help="size the DeepSpeed JSON for GPUs (dry run)")
    p.set_defaults(func=_cmd_train)

    source_help = ("a run folder (its latest checkpoint), one of our weights files (vdvae export, "
                   "import-official), or an official *-model.th with --preset")
    p = sub.add_parser("export", help="whole fp32 model and EMA weights from a run, loadable without DeepSpeed",
                       description="Consolidate a run's checkpoint (ZeRO shards included) into model.pt and "
                                   "model-ema.pt (our weights format) and <preset>-model.th / "
                                   "<preset>-model-ema.th (the official key layout).")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True, help="folder for the four files")
    p.add_argument("--tag", help="checkpoint tag (default: latest), e.g. global_step5000")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("sample", help="a PNG grid of samples, one row per temperature",
                       description="Unconditional samples from " + source_help + ".")
    p.add_argument("source", help=source_help)
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--preset", help="the preset of an official checkpoint")
    p.add_argument("--temperatures", help="comma-separated (default: the preset's, e.g. 1.0,0.9,0.8)")
    p.add_argument("--num", type=int, default=8, help="samples per row (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="of a run folder (default ema)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("eval", help="bits/dim of a model on a prepared split, every image once",
                       description="The test (or valid) bits/dim of " + source_help + ", on a split "
                                   "prepared by `vdvae prep`, with the number of images evaluated.")
    _eval_arguments(p, source_help)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "submit", help="submit training, prep or eval to Slurm (sbatch)",
        description="Render an sbatch script from the templates in launch/ and submit it with sbatch. "
                    "Credentials and the S3 endpoint (AWS_*) reach the job through the environment of "
                    "this shell; nothing secret is written into the script. --dry-run prints the script.")
    jobs = p.add_subparsers(dest="job", required=True, metavar="JOB")

    def slurm_options(q: argparse.ArgumentParser, nodes: bool) -> None:
        g = q.add_argument_group("Slurm resources (default: the cluster's)")
        if nodes:
            g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
            g.add_argument("--gpus-per-node", type=int, default=1,
                           help="GPUs per node; one training task per GPU (default 1; 0 for CPU nodes)")
            g.add_argument("--tasks-per-node", type=int, help="tasks per node (default: one per GPU)")
        else:
            q.set_defaults(nodes=1, tasks_per_node=None)
            g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per task (default 0)")
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

    q = jobs.add_parser("train", help="a DeepSpeed training job, one task per GPU, requeued on preemption",
                        description="Training on --nodes x --gpus-per-node ranks started by srun. On the "
                                    "preemption signal (--signal-grace seconds before the time limit, or "
                                    "scancel --signal=USR1 --batch) every rank checkpoints and the job "
                                    "requeues itself; it resumes from the run folder's latest checkpoint.")
    q.add_argument("--preset", required=True, help="cifar10, imagenet32, imagenet64, ffhq256 or ffhq1024")
    q.add_argument("--data", required=True, help="the prepared dataset: s3://... or a shared folder")
    q.add_argument("--run-dir", required=True, help="the run folder, on a filesystem every node sees")
    q.add_argument("--signal-grace", type=int, default=300,
                   help="seconds before the time limit that Slurm signals the job to checkpoint (default 300)")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="settings that differ from the preset")
    slurm_options(q, nodes=True)
    q.set_defaults(func=_cmd_submit_train)

    q = jobs.add_parser("prep", help="dataset sharding as MPI ranks, or as an array job plus a finalize job",
                        description="`vdvae prep` on --ranks processes: MPI ranks in one job (mpirun inside "
                                    "the allocation, or srun with PMIx), or with --array an array job of "
                                    "--ranks tasks and a finalize job that writes the manifests after them.")
    _prep_arguments(q)
    q.add_argument("--ranks", type=int, default=2, help="processes (MPI ranks or array tasks; default 2)")
    q.add_argument("--array", action="store_true", help="an array job plus a finalize job instead of MPI")
    q.add_argument("--launcher", choices=["mpirun", "srun"], default="mpirun",
                   help="how MPI ranks start (default mpirun; srun needs Slurm built with PMIx)")
    q.add_argument("--log-dir", default="vdvae-logs", help="folder for the job logs (default ./vdvae-logs)")
    slurm_options(q, nodes=False)
    q.set_defaults(func=_cmd_submit_prep)

    q = jobs.add_parser("eval", help="a job that prints the test bits/dim of a model",
                        description="`vdvae eval` as a one-task job; the bits/dim line is in its log.")
    _eval_arguments(q, source_help)
    q.add_argument("--log-dir", help="folder for the job log (default: the run folder, else ./)")
    slurm_options(q, nodes=False)
    q.set_defaults(func=_cmd_submit_eval)

    p = sub.add_parser(
        "demo", help="the whole system on one machine: photographs -> shards -> 2-process DeepSpeed training",
        description="Cut a small dataset from the photographs that ship inside scikit-image and "
                    "scikit-learn, laid out like the FFHQ release; shard it with `vdvae prep`; train a small "
                    "32 px VDVAE on 2 local DeepSpeed processes streaming the shards; leave TensorBoard "
                    "logs, a sample grid PNG and checkpoints in --out. A rerun reuses the dataset and "
                    "resumes the run.")
    p.add_argument("--out", default="runs/demo", help="folder for everything (default: runs/demo)")
    p.add_argument("--steps", type=int, default=1500, help="training steps (default: 1500)")
    p.add_argument("--images", type=int, default=4000, help="images in the dataset (default: 4000)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from data_prep.storage import StorageError
    from launch.slurm import SubmitError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, StorageError, SubmitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
