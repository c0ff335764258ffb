"""The training job: one process per GPU (or CPU rank), all running `train(config)`.

The parts live in their own rooms: the engine (`engine.py`), the paper's
update rule (`update.py`), the EMA (`ema.py`), the data stream
(`stream.py`), the checkpoint (`checkpoint.py`), metrics (`metrics.py`),
evaluation and samples (`evaluate.py`). This module is the loop: a
`train_step()` and periodic work behind `every(n)` checks. A SIGUSR1 or
SIGTERM is acted on at the next step by every rank together: all
checkpoint, all stop, and the process exits with REQUEUE_EXIT_CODE.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from data_prep.storage import LocalStore
from model.vdvae import conv1x1_form

from .checkpoint import Checkpointer
from .config import RunConfig, precision_warning, validate_run
from .distributed import REQUEUE_EXIT_CODE, detect_ranks, end_distributed, init_distributed
from .ema import EMA
from .engine import build_engine, device_of_this_rank
from .evaluate import evaluate, sample_grids, samples_per_grid_row
from .images import save_png
from .health import STUCK_EXIT_CODE, Alarms, Stuck
from .init import start_from
from .latents import LatentUsage, RateWindow
from .metrics import Metrics, memory_gb, reduce_by_name
from .provenance import record_start, start_record
from .runtime import bf16_is_native
from .stream import ShardStream
from .update import UpdateRule

class Preempted(Exception):
    """Raised (on every rank together) after the checkpoint that a SIGUSR1/SIGTERM asked for."""

    def __init__(self, step: int):
        super().__init__(f"stopped by a signal; checkpoint at step {step}")
        self.step = step


def lr_at(config: RunConfig, step: int) -> float:
    """The official schedule: `step / warmup_iters` up to warmup, then constant (step 0 has lr 0)."""
    if config.warmup_iters == 0 or step > config.warmup_iters:
        return config.lr
    return config.lr * step / config.warmup_iters


def every(n: int, step: int, stop: int) -> bool:
    """Periodic work is due at every n-th step and at the last one."""
    return step % n == 0 or step == stop


@dataclass
class _Window:
    """The steps since the last log. Per-rank values stay on the device, one row per step, until the
    log reads them back; the update rule's (the same on every rank) are host values already."""

    rows: list[torch.Tensor] = field(default_factory=list)
    """Per step: this rank's (elbo, distortion, rate, NaN loss) as one float64 tensor."""
    steps: list[int] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    images: int = 0
    data_wait: float = 0.0
    start: float = field(default_factory=time.time)

    def add(self, step: int, update: "_Update", images: int) -> None:
        self.rows.append(update.values)
        self.steps.append(step)
        self.grad_norm.append(update.grad_norm)
        self.skipped.append(update.skipped)
        self.images += images

    def read(self, world: int) -> np.ndarray:
        """(steps, 4): each step's (elbo, distortion, rate) mean over the ranks and its count of ranks
        with a NaN loss. One collective on the device and one read back for the whole window."""
        if not self.rows:
            return np.zeros((0, 4))
        table = torch.stack(self.rows)
        if dist.is_initialized():
            dist.all_reduce(table)
        table = table.cpu().numpy()
        table[:, :3] /= world
        return table


@dataclass(frozen=True)
class _Update:
    values: torch.Tensor
    """This rank's (elbo, distortion, rate, NaN loss), float64, on the engine's device."""
    grad_norm: float
    skipped: bool


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


class Trainer:
    def __init__(self, config: RunConfig):
        self.config = config
        self.ranks = init_distributed(config.collective_timeout_s)
        self.rank, self.world = self.ranks.rank, self.ranks.world
        self.device = device_of_this_rank()
        self._save_config()
        self.engine = build_engine(config, self.world, self.device)
        self.rule = UpdateRule(self.engine, config.grad_clip, config.skip_threshold)
        self.ema = EMA(self.engine, config.ema_rate, self.rank, self.world)
        self.stream = ShardStream(f"{config.data.rstrip('/')}/train", config.batch_per_gpu, rank=self.rank,
                                  world=self.world, seed=config.seed, workers=config.workers,
                                  pin_memory=self.device.type == "cuda")
        self.checkpointer = Checkpointer(config, self.engine, self.ema, self.stream, self.rank, self.world)
        torch.manual_seed(config.seed * 1000 + self.rank)  # each rank's own latent noise
        resumed = self.checkpointer.resume()  # (restores the RNG states of the run it continues)
        # else a new run, perhaps from weights or continuing an official run (init=, init_official=)
        self.step = resumed.step if resumed else start_from(config, self.engine, self.ema, self.rank)
        self.counters = resumed.counters if resumed else {"skipped_updates": 0, "nan_losses": 0}
        self.metrics = Metrics(config.run_dir, self.rank, resume_step=self.step if resumed else None)
        if resumed is None:
            self.metrics.text("config", "```\n" + config.to_json() + "\n```", 0)
        elif self.rank == 0:
            print(f"resumed from {self.checkpointer.folder / resumed.tag} at step {self.step}", flush=True)
        self._record_start(resumed)
        self.alarms = Alarms(config.max_consecutive_skips, config.skip_threshold, config.grad_clip, config.lr)
        self.latent_window = RateWindow()
        self.signalled = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True  # acted on at the next step, by every rank together

    def _record_start(self, resumed) -> None:
        """This start's line of RUN/starts.jsonl (pipeline/provenance.py)."""
        if self.rank != 0:
            return
        if resumed is not None:
            started_from = {"checkpoint": resumed.tag, "step": resumed.step}
        else:
            started_from = {name: getattr(self.config, name) for name in ("init", "init_ema", "init_official")
                            if getattr(self.config, name, "")}
        ds = self.config.deepspeed_config(self.world, on_gpu=self.device.type == "cuda")
        record_start(self.config.run_dir, start_record(self.config, self.world, ds, started_from,
                                                       conv1x1_form(self.device.type)))

    def _save_config(self) -> None:
        if self.rank == 0:
            LocalStore(self.config.run_dir).write_bytes("config.json", (self.config.to_json() + "\n").encode())
        dist.barrier()

    def train_step(self, batch) -> _Update | None:
        """One micro-batch forward and backward, and at an accumulation boundary the paper's update;
        then this step's values (None inside an accumulation). No value is read back to the host here:
        the only wait for the device is the update rule's decision to skip, made on the gradient norm
        (inside DeepSpeed's step under ZeRO 1-3, which reads back its own overflow flag there too)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr_at(self.config, self.step)
        terms = self.engine(batch.images.to(self.device, non_blocking=True))
        self.engine.backward(terms.elbo)
        # each micro-batch's per-group KL, summed on the device until _log_window reads the window back
        self.latent_window.add(terms.per_group_rate)
        stats = self.rule.step()
        if stats is None:
            return None
        if not stats.skipped:
            self.ema.update()
        elbo = terms.elbo.detach().double()
        values = torch.stack([elbo, terms.distortion.detach().double(), terms.rate.detach().double(),
                              (~torch.isfinite(elbo)).double()])
        return _Update(values, stats.grad_norm, stats.skipped)

    def _any_signalled(self) -> bool:
        """Whether any rank has had a SIGUSR1/SIGTERM: one host flag over the gloo control group."""
        return reduce_by_name({"signalled": float(self.signalled)})["signalled"] > 0

    def run(self, max_steps: int | None = None) -> list[float]:
        """Train until `max_steps` (default: the config's; 0 = until stopped); per-step mean losses.

        Per-step values are read back at logging steps; alarms (a skip streak, NaN losses) are
        therefore decided there, and a step that checkpoints (periodic, on a signal) logs first."""
        config = self.config
        stop = max_steps if max_steps is not None else config.max_steps
        losses: list[float] = []
        window = _Window()
        batches = self.stream.forever()
        while not stop or self.step < stop:
            t0 = time.perf_counter()
            batch = next(batches)
            window.data_wait += time.perf_counter() - t0
            update = self.train_step(batch)
            if update is None:
                continue
            self.step += 1
            self.counters["skipped_updates"] += int(update.skipped)
            window.add(self.step, update, len(batch) * self.world * config.grad_accum)
            signalled = self._any_signalled()
            checkpoint_due = every(config.checkpoint_every, self.step, stop) or signalled
            stuck = None
            if every(config.log_every, self.step, stop) or checkpoint_due:
                table = window.read(self.world)
                losses += table[:, 0].tolist()
                self.counters["nan_losses"] += int((table[:, 3] > 0).sum())
                stuck = self._alarms(window, table[:, 3].tolist())
                self._log_window(window, table)
                window = _Window()
            if stuck:  # the same on every rank (skips and NaN losses are decided together)
                self.checkpointer.save(self.step, self.counters)
                raise Stuck(self.step, stuck)
            if every(config.eval_every, self.step, stop):
                self._evaluate()
            if every(config.sample_every, self.step, stop):
                self._write_samples()
            if checkpoint_due:
                self.checkpointer.save(self.step, self.counters)
            if signalled:  # any rank was signalled: all saved, all stop
                raise Preempted(self.step)
        return losses

    def _alarms(self, window: _Window, nan_ranks: list[float]) -> str | None:
        """The window's steps through the alarms in order; the stop message, if a streak ran too long."""
        stuck = None
        for step, skipped, nan, grad_norm in zip(window.steps, window.skipped, nan_ranks, window.grad_norm,
                                                 strict=True):
            said, stuck = self.alarms.update(step, skipped, nan > 0, grad_norm)
            for message in said + ([stuck] if stuck else []):
                self.metrics.alarm(message, step)
            if stuck:
                break
        return stuck

    def _log_window(self, window: _Window, table: np.ndarray) -> None:
        """Log the window's means; `table` is its per-step values read back (`_Window.read`)."""
        elapsed = time.time() - window.start
        elbo = _mean(table[:, 0])
        values = {
            "train/elbo": elbo,
            "train/bpd": elbo / math.log(2),
            "train/distortion": _mean(table[:, 1]),
            "train/rate": _mean(table[:, 2]),
            "train/grad_norm": _mean(window.grad_norm),
            "train/skipped_updates": self.counters["skipped_updates"],
            "train/nan_losses": self.counters["nan_losses"],
            "train/lr": lr_at(self.config, self.step - 1),
            "train/images_per_s": window.images / elapsed,
            "train/step_time_s": elapsed / len(window.steps),
            "train/data_wait_fraction": window.data_wait / elapsed,
            "train/skipped_samples": reduce_by_name({"skipped": self.stream.skipped})["skipped"],
        } | memory_gb(self.device)
        if self.config.precision == "fp16":  # DeepSpeed's dynamic loss scale
            values["train/loss_scale"] = float(getattr(self.engine.optimizer, "loss_scale", math.nan))
        # the window's per-group KL, mean over steps and ranks (a collective): latents/rate_<res>px, ...
        rates = self.latent_window.take()
        usage = None if rates is None else LatentUsage.of(rates, self.engine.module.config)
        if usage is not None:
            values |= usage.scalars("latents")
        for name, value in values.items():
            self.metrics.report(name, value, self.step)
        if usage is not None and self.rank == 0:
            self.metrics.image("latents/usage", usage.heatmap(), self.step)
        self.metrics.flush(self.step, f"elbo {values['train/elbo']:.4f} nats/dim ({values['train/bpd']:.4f} bpd), "
                                      f"grad norm {values['train/grad_norm']:.3g}, skipped "
                                      f"{values['train/skipped_updates']}, {values['train/images_per_s']:.1f} img/s")

    def _evaluate(self, split: str = "valid") -> None:
        """Mean per-image ELBO of the EMA weights over every image of the split, each counted once."""
        stream = ShardStream(f"{self.config.data.rstrip('/')}/{split}", self.config.batch_per_gpu, rank=self.rank,
                             world=self.world, train=False, workers=self.config.workers,
                             pin_memory=self.device.type == "cuda")
        with self.ema.swapped():
            result = evaluate(self.engine, stream, self.device, self.config.seed + 1 + self.rank, per_group=True)
        self.metrics.report("eval/elbo", result.elbo, self.step)
        self.metrics.report("eval/bpd", result.bpd, self.step)
        self.metrics.report("eval/images", result.images, self.step)
        usage = LatentUsage.of(result.per_group_rate, self.engine.module.config)  # eval_latents/rate_<res>px, ...
        for name, value in usage.scalars("eval_latents").items():
            self.metrics.report(name, value, self.step)
        if self.rank == 0:
            self.metrics.image("eval_latents/usage", usage.heatmap(), self.step)
        self.metrics.flush(self.step, f"eval elbo {result.elbo:.4f} nats/dim ({result.bpd:.4f} bpd) on "
                                      f"{result.images} images (EMA weights)")

    def _write_samples(self) -> None:
        """Sample and reconstruction grids of the EMA weights, to TensorBoard and RUN/samples/."""
        model = self.engine.module
        n = samples_per_grid_row(model.config.image_size)
        valid = ShardStream(f"{self.config.data.rstrip('/')}/valid", n, train=False)  # the same images on every rank
        originals = next(iter(valid)).images.to(self.device)
        grids = sample_grids(model, self.config.preset, originals, self.device, self.config.seed + 2, self.ema)
        if self.rank != 0:
            return
        for name, grid in grids.items():
            self.metrics.image(name, grid, self.step)
            save_png(grid, f"{self.config.run_dir}/samples/step{self.step:08d}-{name}.png")

    def close(self, together: bool = True) -> None:
        """The end of this rank: the metrics, the engine, the process groups. `together`: every rank
        closes in step (False on an error's way out)."""
        self.metrics.close()
        # The process groups must go before the interpreter's exit, and they go only with the last
        # reference to them: DeepSpeed's engine holds them, and this trainer the engine, as do the
        # signal handlers (bound methods of this trainer) for the life of the process. A signal
        # after this point changes nothing, as before (the run is over), through a handler that holds
        # nothing. See end_distributed for what went wrong when the groups outlived the run.
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)
        if getattr(self, "checkpointer", None) is not None:
            self.checkpointer.finish_uploads()  # the job does not end before its checkpoint is mirrored
        if getattr(self, "engine", None) is not None:
            self.engine.destroy()
        self.engine = self.rule = self.ema = self.checkpointer = None
        end_distributed(together)


def train(config: RunConfig) -> int:
    """Check the run, then run the job; the process exit status: 0 when done, REQUEUE_EXIT_CODE
    after a signal's checkpoint, STUCK_EXIT_CODE after an alarm's (not requeued)."""
    ranks = detect_ranks()
    validate_run(config, ranks.world, on_gpu=torch.cuda.is_available())
    warning = precision_warning(config, bf16_is_native())
    if warning and ranks.rank == 0:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    trainer = Trainer(config)
    in_step = False  # every rank ends here together (done, or all checkpointed on a signal)
    try:
        trainer.run()
        in_step = True
        return 0
    except Preempted as stop:
        in_step = True
        if trainer.rank == 0:
            print(f"{stop}; exiting with {REQUEUE_EXIT_CODE} for the launcher to requeue", flush=True)
        return REQUEUE_EXIT_CODE
    except Stuck as stop:
        in_step = True
        if trainer.rank == 0:
            print(f"{stop}; exiting with {STUCK_EXIT_CODE}, which the batch script does not requeue", flush=True)
        return STUCK_EXIT_CODE
    finally:
        trainer.close(together=in_step)  # on an error, no barrier: another rank may never reach it
