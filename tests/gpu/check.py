"""The GPU check: the training job and the benchmarks on one machine, one JSON file of results.

    bash tests/gpu/check.sh [--wheels DIR] [--official-src DIR] [--out FILE]   # on a GPU machine
    bash tests/gpu/check.sh --cpu --out FILE                                   # the same sequence on CPU

check.sh installs what is missing from a folder of wheels (tests/gpu/wheels.sh) and runs this driver,
which runs each stage below as its own processes, writes FILE (default $OUT/gpu_check.json) after every
stage, and keeps every log under FILE's folder, in <name>_logs/ beside it (gpu_check_logs/). Data, run
folders and checkpoints go to a scratch folder (--work, default a new temporary folder, removed at the
end unless --keep-work): the checkpoints of the cifar10 model take hundreds of MB each.

Stages (`--list` prints them for a mode):
  install             what check.sh installed, or that nothing was missing (its outcome, time and log)
  environment         versions, the GPU (GPU mode fails without CUDA), how `vdvae` is called
  prep                generated PNG images (smooth gradients plus noise) -> `vdvae prep folder` shards
  train_<leg>         `vdvae train`, one rank (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set as a launcher
                      would; NCCL on a GPU, gloo on CPU), activation_checkpointing=all: on a GPU the
                      cifar10 preset's model (39M parameters, 32 px, batch 16) for 20 steps;
                      legs: zero2_bf16 and zero3_fp16 (CPU: zero3_bf16, fp16 being GPU-only)
  cut_resume_<leg>    the same run with SIGUSR1 after a few steps: it must checkpoint and exit with 85;
                      then the same command resumes it to step N
  resume_identical_<leg>  the cut run's per-step losses (RUN/log.jsonl) against the uninterrupted run's:
                      identical, every step
  fp16_refused_on_cpu (CPU) precision=fp16 must stop before training, exit 2, with a message that says
                      fp16 needs GPUs and names what to use
  eval, sample, export  `vdvae eval` / `vdvae sample` / `vdvae export` on the zero2_bf16 run
  train_compile_zero2_bf16  (GPU) compile=true, a few steps
  model_step_<preset>_b<B>_<dtype>[_compile]  tests/benchmarks/model_step.py (--peak --profile 15 on a
                      GPU: the step's top ops in the stage's log, the matmuls' and convolutions' share
                      and ceiling in its figures): on a GPU cifar10 b16, ffhq256 b1 and ffhq1024 b1,
                      each fp32, bf16 and bf16 --compile
  official_<preset>_b<B>_<dtype>  tests/gpu/official_step.py: the official model's step, with
                      --official-src (reported as not run without it)
  max_batch_ffhq1024_bf16_ckpt_all  (GPU) model_step.py --max-batch --checkpointing all
  conv1x1_forms       tests/benchmarks/conv1x1.py: the model's 1x1 convs as matmuls and as convolutions,
                      matmul / conv time per shape (which form this device should use; CPU: fp32, 2 calls)

GPU mode runs the training stages side by side (one GPU holds them all) and then the timing stages
one at a time, alone on the machine. CPU mode (--cpu) runs the same sequence shortened: the tiny
model of tests/conftest.py (TINY) at 8 px, a few steps, bf16 for fp16, model_step.py on cifar10 at
batch 1 in fp32 without --peak, no compile and no --max-batch. A global time budget (--budget,
counted from check.sh's start) bounds the whole check: each stage has its own timeout within it, a
stage that would start with too little time left is skipped, and at the budget's end whatever runs
is killed.
A failing stage stops only the stages that need its output.

The JSON: {"ok", "mode", "seconds", "budget_s", "environment", "stages": {name: {"status": ok | failed
| skipped | not_run, "seconds", "figures", "reason", "log", "log_tail" (on failure)}}, "side_by_side":
[ours / official step-time ratios], "summary"}. Exit status 0 when every stage that ran passed (not_run
stages: not asked for, or not possible here, with the reason), 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
MODEL_STEP = ROOT / "tests/benchmarks/model_step.py"
CONV1X1 = ROOT / "tests/benchmarks/conv1x1.py"
OFFICIAL_STEP = ROOT / "tests/gpu/official_step.py"
REQUEUE_EXIT_CODE = 85  # pipeline.distributed.REQUEUE_EXIT_CODE (not imported: the driver loads no torch)
CONFIG_ERROR_EXIT_CODE = 2
TINY_MODEL = {  # tests/conftest.py TINY (tests/test_gpu_check.py checks that they agree)
    "image_size": 8, "width": 16, "enc_blocks": "8x2,8d2,4x1,4d4,1x1", "dec_blocks": "1x1,4m1,4x1,8m4,8x1",
    "zdim": 4, "num_mixtures": 2, "input_shift": -120.0, "input_scale": 1 / 64.0,
}
TAIL_CHARS = 4000


# ---------------------------------------------------------------- what each mode runs


@dataclass(frozen=True)
class Leg:
    """One training configuration of the check."""

    name: str
    zero_stage: int
    precision: str

    def settings(self) -> tuple[str, ...]:
        return (f"zero_stage={self.zero_stage}", f"precision={self.precision}", "activation_checkpointing=all")


@dataclass(frozen=True)
class Bench:
    """One model_step.py or official_step.py run."""

    preset: str
    batch: int
    dtype: str
    compile: bool = False

    @property
    def key(self) -> str:
        return f"{self.preset}_b{self.batch}_{self.dtype}" + ("_compile" if self.compile else "")


@dataclass(frozen=True)
class Plan:
    """What one mode runs: the data, the training legs, the timings, the limits."""

    gpu: bool
    image_size: int
    num_images: int
    num_valid: int
    samples_per_shard: int
    steps: int
    """Steps of each training leg."""
    signal_after: int
    """SIGUSR1 once the cut run has logged this many steps."""
    legs: tuple[Leg, ...]
    train_settings: tuple[str, ...]
    benches: tuple[Bench, ...]
    compiled_benches: tuple[Bench, ...]
    bench_steps: int
    bench_warmup: int
    peak: bool
    max_parallel: int
    train_threads: int
    conv1x1_args: tuple[str, ...]
    """conv1x1.py's arguments besides --device."""
    timeouts: dict[str, float] = field(default_factory=dict)


GPU_PLAN = Plan(
    gpu=True, image_size=32, num_images=256, num_valid=32, samples_per_shard=64, steps=20, signal_after=5,
    legs=(Leg("zero2_bf16", 2, "bf16"), Leg("zero3_fp16", 3, "fp16")),
    train_settings=("workers=2",),
    benches=tuple(Bench(p, b, d) for p, b in (("cifar10", 16), ("ffhq256", 1), ("ffhq1024", 1))
                  for d in ("fp32", "bf16")),
    compiled_benches=tuple(Bench(p, b, "bf16", True) for p, b in (("cifar10", 16), ("ffhq256", 1), ("ffhq1024", 1))),
    bench_steps=10, bench_warmup=3, peak=True, max_parallel=8, train_threads=4, conv1x1_args=(),
    timeouts={"environment": 60, "prep": 60, "train": 180, "cut_resume": 240, "compare": 10, "use": 90,
              "train_compile": 240, "bench": 60, "bench_compile": 150, "max_batch": 120, "conv1x1": 60},
)
CPU_PLAN = Plan(
    gpu=False, image_size=8, num_images=48, num_valid=8, samples_per_shard=16, steps=6, signal_after=2,
    legs=(Leg("zero2_bf16", 2, "bf16"), Leg("zero3_bf16", 3, "bf16")),
    train_settings=("batch_per_gpu=4", "lr=2e-3", "warmup_iters=2", "workers=0"),
    # one: the check's code is the same for every preset and dtype; fp32, which every CPU computes natively
    # (an AVX2-only CPU emulates bf16: this step took 30 s there in bf16, 2.3 s in fp32)
    benches=(Bench("cifar10", 1, "fp32"),),
    compiled_benches=(),
    bench_steps=1, bench_warmup=0, peak=False, max_parallel=3, train_threads=1,
    conv1x1_args=("--dtype", "fp32", "--repeats", "2"),
    timeouts={"environment": 60, "prep": 60, "train": 150, "cut_resume": 200, "compare": 10, "use": 90,
              "fp16_refused": 90, "bench": 120, "conv1x1": 60},
)


# ---------------------------------------------------------------- stages and their results


class Failed(Exception):
    """A stage's check did not hold; `figures` are what it measured before that."""

    def __init__(self, reason: str, figures: dict | None = None):
        super().__init__(reason)
        self.figures = figures or {}


@dataclass
class Result:
    status: str  # ok | failed | skipped | not_run
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    reason: str | None = None
    log: str | None = None
    log_tail: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Stage:
    name: str
    run: Callable[["StageContext"], dict]
    timeout: float
    needs: tuple[str, ...] = ()
    exclusive: bool = False
    """Runs alone on the machine (a timing)."""
    min_time: float = 15.0
    """Not started with less of the budget left than this."""
    not_run: str | None = None
    """Why this mode does not run it (reported, not a failure)."""
    after: tuple[str, ...] = ()
    """Stages that must have ended first, whatever their outcome (order only)."""


class StageContext:
    """What a running stage has: its log, its deadline, and a way to run commands within both."""

    def __init__(self, check: "Check", stage: Stage, deadline: float):
        self.check, self.stage, self.deadline = check, stage, deadline
        self.log_path = check.logs / f"{stage.name}.log"
        self.log_path.write_text("")

    def remaining(self) -> float:
        return self.deadline - time.time()

    def note(self, text: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(text.rstrip("\n") + "\n")

    def start(self, cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, int]:
        """Start `cmd` (its own process group) with its output appended to the log; (process, offset of
        its output in the log)."""
        self.note(f"$ {' '.join(cmd)}")
        offset = self.log_path.stat().st_size
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env or self.check.env(), cwd=ROOT, start_new_session=True)
        self.check.track(proc)
        return proc, offset

    def wait(self, proc: subprocess.Popen, what: str = "the command") -> int:
        try:
            return proc.wait(timeout=max(self.remaining(), 0.1))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise Failed(f"{what} timed out (stage limit {self.stage.timeout:.0f} s or the time budget)") from None
        finally:
            self.check.untrack(proc)

    def output_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def run(self, cmd: list[str], env: dict | None = None, what: str = "the command") -> tuple[int, str]:
        """Run `cmd` to its end within the stage's time; (exit status, its output)."""
        proc, offset = self.start(cmd, env)
        code = self.wait(proc, what)
        return code, self.output_since(offset)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def last_line(text: str) -> str:
    """The last non-blank line of a command's output (its error, where it failed), stripped."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def last_json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise Failed("no JSON line in its output")


def read_log(run_dir: Path) -> list[dict]:
    """RUN/log.jsonl's records (a line being written is left out)."""
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> train/elbo (the last record of a step, where a resume logged it again)."""
    return {r["step"]: r["train/elbo"] for r in read_log(run_dir) if "train/elbo" in r}


def median_of(records: list[dict], key: str, digits: int = 4) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return rounded(float(statistics.median(values)), digits) if values else None


def rounded(value, digits: int = 4):
    return round(value, digits) if isinstance(value, float) and math.isfinite(value) else value


# ---------------------------------------------------------------- the check


class Check:
    def __init__(self, args: argparse.Namespace, plan: Plan):
        self.args, self.plan = args, plan
        self.out = args.out
        self.logs = self.out.parent / f"{self.out.stem}_logs"
        self.work: Path | None = args.work  # (a temporary folder is made by run() when not given)
        self.started = args.started or time.time()
        self.deadline = self.started + args.budget
        self.results: dict[str, Result] = {}
        self.environment: dict = {}
        self.vdvae = vdvae_command()
        self.running: dict[str, tuple[threading.Thread, Stage, list]] = {}
        """Stage name -> (its thread, the stage, the box its Result comes back in)."""
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stages = self._stages()

    # -- processes

    def track(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.add(proc)

    def untrack(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def kill_all(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            kill_group(proc)

    def env(self, **extra: str) -> dict:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1")
        if not self.plan.gpu:
            env["DS_ACCELERATOR"] = "cpu"
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(extra)
        return env

    def rank_env(self) -> dict:
        """One training rank, as a launcher would set it (tests/test_train.py does the same)."""
        return self.env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(free_port()), OMP_NUM_THREADS=str(self.plan.train_threads))

    # -- the stages

    def _stages(self) -> list[Stage]:
        plan, t = self.plan, self.plan.timeouts
        stages = [Stage("environment", self.stage_environment, t["environment"], min_time=5),
                  Stage("prep", self.stage_prep, t["prep"], ("environment",), min_time=10)]
        for leg in plan.legs:
            stages += [
                Stage(f"train_{leg.name}", lambda c, leg=leg: self.stage_train(c, leg), t["train"], ("prep",)),
                Stage(f"cut_resume_{leg.name}", lambda c, leg=leg: self.stage_cut_resume(c, leg), t["cut_resume"],
                      ("prep",)),
                Stage(f"resume_identical_{leg.name}", lambda c, leg=leg: self.stage_compare(c, leg), t["compare"],
                      (f"train_{leg.name}", f"cut_resume_{leg.name}"), min_time=1),
            ]
        first = f"train_{plan.legs[0].name}"
        if not plan.gpu:
            stages.append(Stage("fp16_refused_on_cpu", self.stage_fp16_refused, t["fp16_refused"], ("prep",)))
        stages += [Stage("eval", self.stage_eval, t["use"], (first,)),
                   Stage("sample", self.stage_sample, t["use"], (first,)),
                   Stage("export", self.stage_export, t["use"], (first,))]
        stages.append(Stage("train_compile_zero2_bf16", self.stage_train_compile, t.get("train_compile", 0),
                            ("prep",), min_time=60,
                            not_run=None if plan.gpu else "GPU mode only (compiling the model takes minutes on a CPU)"))
        official = self.args.official_src
        no_official = None if official else ("no --official-src: give a folder with openai/vdvae's vae.py and "
                                             "vae_helpers.py to time the official model beside ours")
        after = () if plan.gpu else ("prep",)  # on CPU: side by side, but after the training has its share
        for bench in plan.benches:
            stages.append(Stage(f"model_step_{bench.key}", lambda c, b=bench: self.stage_model_step(c, b),
                                t["bench"], ("environment",), exclusive=plan.gpu, after=after))
            stages.append(Stage(f"official_{bench.key}", lambda c, b=bench: self.stage_official(c, b), t["bench"],
                                ("environment",), exclusive=plan.gpu, not_run=no_official, after=after))
        stages.append(Stage("conv1x1_forms", self.stage_conv1x1, t["conv1x1"], ("environment",),
                            exclusive=plan.gpu, after=after))
        compiled = [Stage(f"model_step_{b.key}", lambda c, b=b: self.stage_model_step(c, b), t["bench_compile"],
                          ("environment",), exclusive=True, min_time=60) for b in plan.compiled_benches]
        max_batch = Stage("max_batch_ffhq1024_bf16_ckpt_all", self.stage_max_batch, t.get("max_batch", 0),
                          ("environment",), exclusive=True, min_time=40)
        if plan.gpu:  # the first compiled preset, the max-batch search, the other compiled presets
            stages += compiled[:1] + [max_batch] + compiled[1:]
        else:
            max_batch.not_run = "GPU mode only"
            stages += [Stage("model_step_compile", lambda c: {}, 0, not_run="GPU mode only"), max_batch]
        return stages

    # environment

    def stage_environment(self, ctx: StageContext) -> dict:
        code, out = ctx.run([sys.executable, "-c", ENVIRONMENT_PROBE], what="the environment probe")
        if code != 0:
            raise Failed(f"the environment probe failed ({code})")
        info = last_json_line(out)
        info["vdvae_command"] = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(self.vdvae))
        self.environment = info
        missing = [p for p in ("deepspeed", "webdataset", "boto3", "tensorboard") if not info["packages"].get(p)]
        if missing:
            raise Failed(f"not installed: {', '.join(missing)}", info)
        if self.plan.gpu and not info.get("cuda_available"):
            raise Failed("GPU mode, but torch sees no CUDA device (use --cpu for the CPU check)", info)
        return info

    def install_result(self) -> Result:
        """What check.sh did before this driver started (its outcome comes in the --install-* options)."""
        a = self.args
        if a.install_status is None:
            return Result("not_run", reason="check.py was run directly: check.sh installs")
        result = Result(a.install_status, seconds=round(a.install_seconds or 0.0, 1),
                        figures={"python": sys.executable, "note": a.install_note},
                        reason=a.install_note if a.install_status != "ok" else None)
        if a.install_log and Path(a.install_log).exists():
            result.log = str(shutil.copy(a.install_log, self.logs / "install.log"))
            if result.status != "ok":
                result.log_tail = Path(result.log).read_text(errors="replace")[-TAIL_CHARS:]
        return result

    # prep

    def stage_prep(self, ctx: StageContext) -> dict:
        plan = self.plan
        src = self.work / "images"
        if src.exists():
            shutil.rmtree(src)
        write_gradient_images(src, plan.num_images, plan.image_size)
        cmd = [*self.vdvae, "prep", "folder", "--src", str(src), "--out", str(self.data), "--overwrite",
               "--resolution", str(plan.image_size), "--num-valid", str(plan.num_valid),
               "--samples-per-shard", str(plan.samples_per_shard)]
        code, _ = ctx.run(cmd, what="vdvae prep")
        if code != 0:
            raise Failed(f"vdvae prep exited with {code}")
        counts = {split: json.loads((self.data / split / "manifest.json").read_text())["num_samples"]
                  for split in ("train", "valid")}
        if counts != {"train": plan.num_images - plan.num_valid, "valid": plan.num_valid}:
            raise Failed(f"the manifests count {counts}", {"samples": counts})
        if not plan.gpu:
            (self.work / "tiny.json").write_text(json.dumps(TINY_MODEL))
        return {"images": plan.num_images, "resolution": plan.image_size, "samples": counts}

    # training

    def train_cmd(self, run_dir: Path, *settings: str) -> list[str]:
        plan = self.plan
        model = () if plan.gpu else (f"model_json={self.work / 'tiny.json'}",)
        return [*self.vdvae, "train", "--preset", "cifar10", "--data", str(self.data), "--run-dir", str(run_dir),
                *model, *plan.train_settings, "log_every=1", "checkpoint_every=100000", *settings]

    def keep_run_log(self, run_dir: Path) -> None:
        if (run_dir / "log.jsonl").exists():
            shutil.copy(run_dir / "log.jsonl", self.logs / "runs" / f"{run_dir.name}.jsonl")

    def train_figures(self, run_dir: Path, steps: int) -> dict:
        records = read_log(run_dir)
        train = [r for r in records if "train/elbo" in r]
        elbo = losses(run_dir)
        if sorted(elbo) != list(range(1, steps + 1)):
            raise Failed(f"the log has steps {sorted(elbo)}, not 1..{steps}")
        settled = [r for r in train if r["step"] > min(2, steps - 1)] or train  # past the first steps' start-up
        figures = {
            "steps": steps,
            "elbo_first": rounded(elbo[1]), "elbo_last": rounded(elbo[steps]),
            "all_finite": all(math.isfinite(v) for v in elbo.values()),
            "step_time_s_median": median_of(settled, "train/step_time_s"),
            "images_per_s_median": median_of(settled, "train/images_per_s", 1),
            "skipped_updates": train[-1].get("train/skipped_updates"),
        }
        memory = {k: max(r[k] for r in train if k in r) for k in train[-1] if "memory" in k}
        figures.update({k.replace("/", "_") + "_max": rounded(v, 3) for k, v in memory.items()})
        if "train/loss_scale" in train[-1]:
            figures["loss_scale_last"] = train[-1]["train/loss_scale"]
        evals = [r for r in records if "eval/bpd" in r]
        if evals:
            figures["eval_bpd"] = rounded(evals[-1]["eval/bpd"])
            figures["eval_images"] = evals[-1].get("eval/images")
        if not figures["all_finite"]:
            raise Failed("non-finite training losses", figures)
        return figures

    def stage_train(self, ctx: StageContext, leg: Leg) -> dict:
        run_dir = self.runs / f"whole_{leg.name}"
        start = time.time()
        code, _ = ctx.run(self.train_cmd(run_dir, *leg.settings(), f"max_steps={self.plan.steps}"),
                          self.rank_env(), "vdvae train")
        self.keep_run_log(run_dir)
        if code != 0:
            raise Failed(f"vdvae train exited with {code}")
        return {"run_s": round(time.time() - start, 1), **self.train_figures(run_dir, self.plan.steps)}

    def stage_cut_resume(self, ctx: StageContext, leg: Leg) -> dict:
        plan = self.plan
        run_dir = self.runs / f"cut_{leg.name}"
        proc, _ = ctx.start(self.train_cmd(run_dir, *leg.settings(), "max_steps=1000000"), self.rank_env())
        try:
            while len(losses(run_dir)) < plan.signal_after:
                if proc.poll() is not None:
                    raise Failed(f"the run ended (exit {proc.returncode}) before {plan.signal_after} logged steps")
                if ctx.remaining() < 0:
                    raise Failed(f"no {plan.signal_after} logged steps within the stage's time")
                time.sleep(0.02)
            logged = len(losses(run_dir))
            proc.send_signal(signal.SIGUSR1)
            code = ctx.wait(proc, "the signalled run")
        finally:
            if proc.poll() is None:
                kill_group(proc)
            self.untrack(proc)
        figures = {"signal_after_logged_steps": logged, "exit_code_after_signal": code}
        if code != REQUEUE_EXIT_CODE:
            raise Failed(f"after SIGUSR1 the run exited with {code}, not {REQUEUE_EXIT_CODE}", figures)
        cut_step = max(losses(run_dir))
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        figures.update(cut_at_step=cut_step, checkpoint=latest)
        if latest != f"global_step{cut_step}":
            raise Failed(f"the signal's checkpoint is {latest}, the last logged step {cut_step}", figures)
        if cut_step >= plan.steps:
            raise Failed(f"the signal stopped the run at step {cut_step}, not before {plan.steps}: nothing left "
                         "to resume", figures)
        code, out = ctx.run(self.train_cmd(run_dir, *leg.settings(), f"max_steps={plan.steps}"), self.rank_env(),
                            "the resumed run")
        self.keep_run_log(run_dir)
        if code != 0:
            raise Failed(f"the resumed run exited with {code}", figures)
        resumed = re.search(r"resumed from \S+ at step (\d+)", out)
        figures["resumed_at_step"] = int(resumed.group(1)) if resumed else None
        if figures["resumed_at_step"] != cut_step:
            raise Failed(f"the resumed run did not say it resumed at step {cut_step}", figures)
        return figures

    def stage_compare(self, ctx: StageContext, leg: Leg) -> dict:
        whole, cut = losses(self.runs / f"whole_{leg.name}"), losses(self.runs / f"cut_{leg.name}")
        cut_step = self.results[f"cut_resume_{leg.name}"].figures["cut_at_step"]
        steps = list(range(1, self.plan.steps + 1))
        if sorted(whole) != steps or sorted(cut) != steps:
            raise Failed(f"steps logged: uninterrupted {sorted(whole)}, cut and resumed {sorted(cut)}")
        differing = [s for s in steps if whole[s] != cut[s]]
        before = [abs(whole[s] - cut[s]) for s in steps if s <= cut_step]
        after = [abs(whole[s] - cut[s]) for s in steps if s > cut_step]
        figures = {"steps_compared": len(steps), "cut_at_step": cut_step, "identical": not differing,
                   "first_differing_step": differing[0] if differing else None,
                   "max_abs_diff_before_cut": max(before), "max_abs_diff_after_cut": max(after)}
        if differing:
            cause = (" The steps before the cut differ too: the training is not deterministic here, so a resume "
                     "cannot be compared exactly." if max(before) > 0 else " Only steps after the resume differ.")
            raise Failed(f"per-step losses differ from step {differing[0]}.{cause}", figures)
        return figures

    def stage_fp16_refused(self, ctx: StageContext) -> dict:
        run_dir = self.runs / "fp16_on_cpu"
        code, out = ctx.run(self.train_cmd(run_dir, "zero_stage=3", "precision=fp16", "max_steps=1"),
                            self.rank_env(), "vdvae train precision=fp16")
        message = next((line.strip() for line in reversed(out.splitlines()) if "fp16" in line), "")
        figures = {"exit_code": code, "message": message}
        clear = "fp16" in message and "GPU" in message and "bf16" in message
        figures["message_names_the_cause_and_the_remedy"] = clear
        if code != CONFIG_ERROR_EXIT_CODE:
            raise Failed(f"precision=fp16 on CPU exited with {code}, not {CONFIG_ERROR_EXIT_CODE}", figures)
        if not clear:
            raise Failed("the refusal does not say that fp16 needs GPUs and to use bf16", figures)
        if (run_dir / "checkpoints").exists():
            raise Failed("the refused run left checkpoints", figures)
        return figures

    def stage_train_compile(self, ctx: StageContext) -> dict:
        run_dir = self.runs / "compile_zero2_bf16"
        steps = 4
        code, out = ctx.run(self.train_cmd(run_dir, "zero_stage=2", "precision=bf16", "compile=true",
                                           f"max_steps={steps}"), self.rank_env(), "vdvae train compile=true")
        self.keep_run_log(run_dir)
        if code != 0:
            error = next((line.strip() for line in reversed(out.splitlines()) if line.startswith("error:")), None)
            raise Failed(f"vdvae train compile=true exited with {code}" + (f": {error}" if error else ""))
        figures = self.train_figures(run_dir, steps)
        first = next(r for r in read_log(run_dir) if r.get("step") == 1 and "train/step_time_s" in r)
        figures["first_step_s"] = rounded(first["train/step_time_s"], 2)  # the compilation
        return figures

    # using the run

    def stage_eval(self, ctx: StageContext) -> dict:
        code, out = ctx.run([*self.vdvae, "eval", str(self.runs / f"whole_{self.plan.legs[0].name}"), "--data",
                             str(self.data), "--split", "valid", "--batch", "8", "--workers", "0"], what="vdvae eval")
        if code != 0:
            raise Failed(f"vdvae eval exited with {code}")
        match = re.search(r"valid: ([-\d.naif]+) bits/dim \(([-\d.naif]+) nats/dim\) on (\d+) images", out)
        if not match:
            raise Failed("vdvae eval printed no 'valid: ... bits/dim ... on N images' line")
        figures = {"bpd": float(match.group(1)), "elbo": float(match.group(2)), "images": int(match.group(3))}
        if figures["images"] != self.plan.num_valid or not math.isfinite(figures["bpd"]):
            raise Failed(f"expected a finite bits/dim on {self.plan.num_valid} images", figures)
        return figures

    def stage_sample(self, ctx: StageContext) -> dict:
        grid = self.logs / "sample.png"
        num, temperatures = 4, "1.0,0.8"
        code, _ = ctx.run([*self.vdvae, "sample", str(self.runs / f"whole_{self.plan.legs[0].name}"), "--out",
                           str(grid), "--num", str(num), "--temperatures", temperatures], what="vdvae sample")
        if code != 0:
            raise Failed(f"vdvae sample exited with {code}")
        with Image.open(grid) as image:
            size = image.size
        cell = self.plan.image_size + 2
        figures = {"png": str(grid), "size": list(size), "rows": 2, "per_row": num}
        if size != (num * cell + 2, 2 * cell + 2):
            raise Failed(f"the grid is {size}, not 2 rows of {num} {self.plan.image_size} px samples", figures)
        return figures

    def stage_export(self, ctx: StageContext) -> dict:
        out = self.work / "export"
        code, _ = ctx.run([*self.vdvae, "export", "--run-dir", str(self.runs / f"whole_{self.plan.legs[0].name}"),
                           "--out", str(out)], what="vdvae export")
        if code != 0:
            raise Failed(f"vdvae export exited with {code}")
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
        expected = {"model.pt", "model-ema.pt", "cifar10-model.th", "cifar10-model-ema.th"}
        figures = {"files": {k: round(v / 2**20, 2) for k, v in files.items()}, "unit": "MiB"}
        if set(files) != expected:
            raise Failed(f"export wrote {sorted(files)}, not {sorted(expected)}", figures)
        return figures

    # timings

    def device_args(self) -> list[str]:
        return ["--device", "cuda" if self.plan.gpu else "cpu"]

    def stage_model_step(self, ctx: StageContext, bench: Bench) -> dict:
        plan = self.plan
        warmup = max(plan.bench_warmup - 1, 1) if bench.compile else plan.bench_warmup
        cmd = [sys.executable, str(MODEL_STEP), "--preset", bench.preset, "--batch", str(bench.batch),
               "--dtype", bench.dtype, *self.device_args(), "--steps", str(plan.bench_steps),
               "--warmup", str(warmup), *(["--peak", "--profile", "15"] if plan.peak else []),
               *(["--compile"] if bench.compile else [])]
        return self.timing(ctx, cmd, "model_step.py")

    def stage_official(self, ctx: StageContext, bench: Bench) -> dict:
        plan = self.plan
        cmd = [sys.executable, str(OFFICIAL_STEP), "--official-src", str(self.args.official_src), "--preset",
               bench.preset, "--batch", str(bench.batch), "--dtype", bench.dtype, *self.device_args(),
               "--steps", str(plan.bench_steps), "--warmup", str(plan.bench_warmup)]
        return self.timing(ctx, cmd, "official_step.py")

    def stage_conv1x1(self, ctx: StageContext) -> dict:
        cmd = [sys.executable, str(CONV1X1), *self.device_args(), *self.plan.conv1x1_args]
        code, out = ctx.run(cmd, self.env(), "conv1x1.py")
        if code != 0:
            error = last_line(out)
            raise Failed(f"conv1x1.py exited with {code}: {error[-300:]}")
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{") and line.endswith("}")]
        ratios = {f"{x['dtype']}_{x['in']}x{x['out']}": x["matmul_over_conv"] for x in lines}
        if not lines or not all(isinstance(r, (int, float)) and r > 0 for r in ratios.values()):
            raise Failed("no positive matmul_over_conv in its JSON lines", {"lines": lines})
        return {"machine_form": lines[0]["machine_form"], "matmul_over_conv": ratios, "lines": lines}

    def stage_max_batch(self, ctx: StageContext) -> dict:
        cmd = [sys.executable, str(MODEL_STEP), "--preset", "ffhq1024", "--batch", "1", "--dtype", "bf16",
               "--checkpointing", "all", *self.device_args(), "--steps", "1", "--warmup", "1", "--max-batch"]
        figures = self.timing(ctx, cmd, "model_step.py --max-batch")
        if not isinstance(figures.get("max_batch"), int) or figures["max_batch"] < 1:
            raise Failed("no max_batch of at least 1 in its JSON line", figures)
        return figures

    def timing(self, ctx: StageContext, cmd: list[str], what: str) -> dict:
        code, out = ctx.run(cmd, self.env(), what)
        if code != 0:
            error = last_line(out)
            raise Failed(f"{what} exited with {code}: {error[-300:]}")
        figures = last_json_line(out)
        step = figures.get("median_step_s")
        if not isinstance(step, (int, float)) or not step > 0:
            raise Failed("no positive median_step_s in its JSON line", figures)
        return figures

    # -- running them

    def selected(self, stages: list[Stage]) -> set[str]:
        names = {s.name for s in stages}
        chosen = {n for n in names if not self.args.only or any(fnmatch.fnmatch(n, g) for g in self.args.only)}
        chosen -= {n for n in names if any(fnmatch.fnmatch(n, g) for g in self.args.skip)}
        by_name = {s.name: s for s in stages}
        todo = list(chosen)
        while todo:  # what a chosen stage needs is chosen too
            for need in by_name[todo.pop()].needs:
                if need not in chosen:
                    chosen.add(need)
                    todo.append(need)
        return chosen

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    def run(self) -> int:
        if self.logs.exists():
            shutil.rmtree(self.logs)
        (self.logs / "runs").mkdir(parents=True)
        if self.args.work is None:
            self.work = Path(tempfile.mkdtemp(prefix="vdvae-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        chosen = self.selected(self.stages)
        self.finished("install", self.install_result())
        pending: list[Stage] = []
        for stage in self.stages:
            if stage.not_run:
                self.finished(stage.name, Result("not_run", reason=stage.not_run))
            elif stage.name not in chosen:
                self.finished(stage.name, Result("not_run", reason="not selected (--only / --skip)"))
            else:
                pending.append(stage)
        while pending or self.running:
            for name, (thread, _, box) in list(self.running.items()):
                if not thread.is_alive():
                    del self.running[name]
                    self.finished(name, box[0])
            if time.time() > self.deadline and self.running:
                self.kill_all()  # the budget is spent: what still runs ends as failed ("timed out")
            self.start_ready(pending)
            time.sleep(0.05)
        return self.finish()

    def start_ready(self, pending: list[Stage]) -> None:
        """Start, in order, the pending stages whose needs passed, as far as the rules let: at most
        max_parallel at once; a timing (exclusive) only on a quiet machine, and nothing after it until then."""
        for stage in list(pending):
            if any(s.exclusive for _, s, _ in self.running.values()):
                return
            needs = [self.results.get(n) for n in stage.needs]
            if any(r is None for r in needs) or any(n not in self.results for n in stage.after):
                continue  # waits for what it needs
            unmet = [n for n, r in zip(stage.needs, needs, strict=True) if r.status != "ok"]
            if unmet:
                pending.remove(stage)
                self.finished(stage.name, Result("skipped", reason=f"needs {', '.join(unmet)}, which did not pass"))
                continue
            if (stage.exclusive and self.running) or len(self.running) >= self.plan.max_parallel:
                return
            pending.remove(stage)
            left = self.deadline - time.time()
            if left < stage.min_time:
                self.finished(stage.name, Result("skipped", reason=f"time budget spent ({left:.0f} s left, it "
                                                                   f"needs at least {stage.min_time:.0f} s)"))
                continue
            box: list = [None]
            thread = threading.Thread(target=self.run_stage, args=(stage, min(stage.timeout, left - 2), box),
                                      daemon=True)
            self.running[stage.name] = (thread, stage, box)
            thread.start()

    def run_stage(self, stage: Stage, timeout: float, box: list) -> None:
        """In the stage's thread: run it, and leave its Result in `box` (the main thread files it)."""
        start = time.time()
        ctx = StageContext(self, stage, start + timeout)
        try:
            result = Result("ok", figures=stage.run(ctx))
        except Failed as failure:
            result = Result("failed", figures=failure.figures, reason=str(failure))
        except Exception as error:  # a bug or a surprise in the check itself: reported like a failure
            ctx.note(traceback.format_exc())
            result = Result("failed", reason=f"{type(error).__name__}: {error}")
        result.seconds = round(time.time() - start, 1)
        result.log = str(ctx.log_path)
        if result.status == "failed":
            result.log_tail = ctx.log_path.read_text(errors="replace")[-TAIL_CHARS:]
        box[0] = result

    def finished(self, name: str, result: Result) -> None:
        """File a stage's result (main thread only), print a line, rewrite the JSON."""
        self.results[name] = result
        elapsed = time.time() - self.started
        detail = f" ({result.seconds:.1f} s)" if result.status in ("ok", "failed") else ""
        print(f"[{elapsed:5.0f} s] {name}: {result.status}{detail}" + (f" - {result.reason}" if result.reason else ""),
              flush=True)
        self.write()

    # -- the JSON

    def side_by_side(self) -> list[dict]:
        rows = []
        for bench in self.plan.benches:
            ours, theirs = self.results.get(f"model_step_{bench.key}"), self.results.get(f"official_{bench.key}")
            if not (ours and theirs and ours.status == theirs.status == "ok"):
                continue
            a, b = ours.figures["median_step_s"], theirs.figures["median_step_s"]
            rows.append({"preset": bench.preset, "batch": bench.batch, "dtype": bench.dtype, "ours_step_s": a,
                         "official_step_s": b, "ratio_ours_over_official": round(a / b, 3)})
        return rows

    def document(self) -> dict:
        names = ["install", *(s.name for s in self.stages)]
        results = {n: self.results.get(n) or Result("running" if n in self.running else "pending") for n in names}
        by_status: dict[str, list[str]] = {"ok": [], "failed": [], "skipped": [], "not_run": []}
        for name, result in results.items():
            by_status.setdefault(result.status, []).append(name)
        return {
            "check": "vdvae GPU check (tests/gpu/check.sh)",
            "ok": bool(by_status["ok"]) and set(by_status) == {"ok", "failed", "skipped", "not_run"}
            and not by_status["failed"] and not by_status["skipped"],
            "mode": "gpu" if self.plan.gpu else "cpu",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "budget_s": self.args.budget,
            "logs": str(self.logs),
            "environment": self.environment,
            "stages": {name: r.to_json() for name, r in results.items()},
            "side_by_side": self.side_by_side(),
            "summary": by_status,
        }

    def write(self) -> None:
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.document(), indent=1) + "\n")
        tmp.replace(self.out)

    def finish(self) -> int:
        self.kill_all()
        self.write()
        doc = self.document()
        print(f"{'ok' if doc['ok'] else 'FAILED'}: {len(doc['summary']['ok'])} passed, "
              f"{len(doc['summary']['failed'])} failed, {len(doc['summary']['skipped'])} skipped, "
              f"{len(doc['summary']['not_run'])} not run, in {doc['seconds']:.0f} s -> {self.out}", flush=True)
        for row in doc["side_by_side"]:
            print(f"  {row['preset']} b{row['batch']} {row['dtype']}: ours {row['ours_step_s']} s, official "
                  f"{row['official_step_s']} s, ratio {row['ratio_ours_over_official']}", flush=True)
        if not self.args.keep_work and self.args.work is None:
            shutil.rmtree(self.work, ignore_errors=True)
        return 0 if doc["ok"] else 1


ENVIRONMENT_PROBE = r"""
import importlib.metadata as md, json, os, platform
packages = {}
for name in ("torch", "deepspeed", "webdataset", "boto3", "tensorboard", "mpi4py", "numpy", "pillow",
             "pydantic", "ninja", "vdvae-pipeline"):
    try:
        packages[name] = md.version(name)
    except md.PackageNotFoundError:
        packages[name] = None
import torch
info = {"python": platform.python_version(), "packages": packages, "cpu_count": os.cpu_count(),
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
try:
    info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    info["cpu"] = platform.processor()
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                compute_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    try:
        nccl = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception as error:  # reported, not fatal: the training stages show whether NCCL works
        info["nccl"] = f"unknown ({error})"
print(json.dumps(info))
"""


def vdvae_command() -> list[str]:
    """The installed `vdvae` script of this interpreter (where check.sh installed the project), else
    `python -m launch.cli` from this checkout."""
    schemes = [sysconfig.get_path("scripts")]
    try:
        schemes.append(sysconfig.get_path("scripts", sysconfig.get_preferred_scheme("user")))
    except (AttributeError, KeyError):
        pass
    for folder in schemes:
        script = Path(folder) / "vdvae"
        if script.is_file() and os.access(script, os.X_OK):
            return [str(script)]
    return [sys.executable, "-m", "launch.cli"]


def write_gradient_images(folder: Path, count: int, size: int) -> None:
    """`count` learnable PNG images: colour gradients plus noise (as tests/conftest.py gradient_photos)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        base = np.linspace(0, 1, size)[None, :, None] * rng.uniform(60, 200, 3) + rng.uniform(0, 50, 3)
        pixels = np.broadcast_to(base, (size, size, 3)) + rng.normal(0, 4, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the shortened CPU sequence (no GPU needed)")
    p.add_argument("--out", type=Path, help="the JSON file to write (default: $OUT/gpu_check.json)")
    p.add_argument("--official-src", type=Path, help="a folder with openai/vdvae's vae.py and vae_helpers.py")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check, counted from "
                   "check.sh's start (default %(default)s)")
    p.add_argument("--work", type=Path, help="scratch folder for data, runs and checkpoints (default: a new "
                   "temporary folder, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    p.add_argument("--only", type=lambda s: s.split(","), default=[], metavar="GLOBS",
                   help="run only these stages (comma-separated names or globs, e.g. 'model_step_*'), and what "
                        "they need")
    p.add_argument("--skip", type=lambda s: s.split(","), default=[], metavar="GLOBS", help="leave these stages out")
    p.add_argument("--list", action="store_true", help="print the stages of this mode and exit")
    g = p.add_argument_group("set by check.sh")
    g.add_argument("--started", type=float, help="when check.sh started (epoch seconds)")
    g.add_argument("--install-status")
    g.add_argument("--install-note")
    g.add_argument("--install-seconds", type=float)
    g.add_argument("--install-log")
    args = p.parse_args(argv)
    if args.out is None:
        if not os.environ.get("OUT"):
            p.error("give --out FILE (or set $OUT: the JSON goes to $OUT/gpu_check.json)")
        args.out = Path(os.environ["OUT"]) / "gpu_check.json"
    if args.out.is_dir():
        p.error(f"--out {args.out} is a folder: give the JSON file's path")
    if args.official_src is not None and not (args.official_src / "vae.py").is_file():
        p.error(f"--official-src {args.official_src}: no vae.py there (a checkout of openai/vdvae is expected)")
    args.out = args.out.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check = Check(args, CPU_PLAN if args.cpu else GPU_PLAN)
    if args.list:
        for stage in check.stages:
            kind = "timing, alone" if stage.exclusive else "side by side"
            print(f"{stage.name:44s} {stage.timeout:5.0f} s  {kind}" + (f"  (not run: {stage.not_run})"
                                                                       if stage.not_run else ""))
        return 0

    def stop(signum, frame):
        check.kill_all()
        check.write()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"vdvae GPU check, {'CPU' if args.cpu else 'GPU'} mode: {len(check.stages)} stages, budget "
          f"{args.budget:.0f} s; JSON -> {check.out}; logs -> {check.logs}/", flush=True)
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
