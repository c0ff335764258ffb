"""The training job: DeepSpeed engine, the paper's update rule, EMA, streaming data, logs, checkpoints.

One process per GPU (or CPU rank), all running `train(config)`. Every
`checkpoint_every` steps (and at `max_steps`) each rank writes its EMA
shard, then DeepSpeed writes the engine state with the stream positions,
RNG states and counters as client state, and `latest` last: a checkpoint
cut short by a crash is never the one resumed from. A new start with the
same run folder resumes from `latest`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, RunConfig, check_data
from .stream import ShardStream
from .update import EMA, UpdateRule


REQUEUE_EXIT_CODE = 85
"""Exit status after a SIGUSR1/SIGTERM checkpoint: the batch script requeues the job on it."""


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


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return math.nan


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, config: RunConfig):
        import deepspeed
        import torch.distributed as dist

        from model import VDVAE

        from .distributed import init_distributed, share_fp32_master

        check_data(config)  # before any process group: a bad path or a wrong preset fails here
        if config.precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("precision=fp16 needs GPUs (DeepSpeed's CPU accelerator has no fp16); "
                              "use bf16 or fp32")
        self.config = config
        self.run_dir = Path(config.run_dir)
        self._check_run_folder()  # on every rank, before the process group: all fail alike, none waits
        self.ranks = init_distributed()
        self.rank, self.world = self.ranks.rank, self.ranks.world
        self.dist = dist
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self._save_config()
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = VDVAE(config.model_config())
        model.set_activation_checkpointing(config.activation_checkpointing,
                                           use_reentrant=config.zero_stage == 3)
        ds = config.deepspeed_config(self.world, on_gpu=self.device.type == "cuda")
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        share_fp32_master(self.engine)
        self.rule = UpdateRule(self.engine, config.grad_clip, config.skip_threshold)
        self.ema = EMA(self.engine, config.ema_rate)
        self.stream = ShardStream(f"{config.data.rstrip('/')}/train", config.batch_per_gpu, rank=self.rank,
                                  world=self.world, seed=config.seed, workers=config.workers,
                                  pin_memory=self.device.type == "cuda")
        self.step = 0
        self.counters = {"skipped_updates": 0, "nan_losses": 0}
        torch.manual_seed(config.seed * 1000 + self.rank)  # each rank's own latent noise
        self.signalled = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            self.writer.add_text("config", "```\n" + config.to_json() + "\n```", 0)
        self._resume()

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True  # acted on at the next step, by every rank together

    # -- run folder --------------------------------------------------------------------

    def _check_run_folder(self) -> None:
        path = self.run_dir / "config.json"
        if path.exists():
            saved = RunConfig.from_json(path.read_text())
            fixed = ("preset", "data", "model_json", "batch_per_gpu", "seed", "zero_stage")
            changed = [k for k in fixed if getattr(saved, k) != getattr(self.config, k)]
            if changed:
                raise ConfigError(f"{self.run_dir} holds a run with other {', '.join(changed)}; "
                                  "use a new --run-dir, or the same settings to resume it")

    def _save_config(self) -> None:
        path = self.run_dir / "config.json"
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(self.config.to_json() + "\n")
            os.replace(tmp, path)
        self.dist.barrier()

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        tag = f"global_step{self.step}"
        folder = self.checkpoint_dir / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.ema.sharded or self.rank == 0:
            tmp = folder / f".ema_rank{self.rank:05d}.pt.tmp"
            torch.save(self.ema.state_dict(), tmp)
            os.replace(tmp, folder / f"ema_rank{self.rank if self.ema.sharded else 0:05d}.pt")
        streams, rngs = [None] * self.world, [None] * self.world
        self.dist.all_gather_object(streams, self.stream.state_dict())
        self.dist.all_gather_object(rngs, _rng_state())
        client = {"step": self.step, "streams": streams, "rng": rngs, "counters": dict(self.counters),
                  "config": self.config.to_json()}
        # DeepSpeed's own `latest` is written by rank 0 before the other ranks are known to have
        # finished, and not atomically: write it here, after a barrier, by rename.
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client, save_latest=False)
        self.dist.barrier()
        if self.rank == 0:
            tmp = self.checkpoint_dir / ".latest.tmp"
            with open(tmp, "w") as f:
                f.write(tag)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.checkpoint_dir / "latest")
            self._prune()
            if self.config.checkpoint_mirror:
                self._mirror_upload(tag)
        self.dist.barrier()
        return folder

    # The S3 mirror: `<mirror>/<tag>/<files>`, then `<mirror>/latest` (the commit point).

    def _mirror_upload(self, tag: str) -> None:
        from data_prep.storage import open_store

        mirror = self.config.checkpoint_mirror.rstrip("/")
        folder = self.checkpoint_dir / tag
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            relative = path.relative_to(folder)
            open_store(f"{mirror}/{tag}/{relative.parent}".rstrip("/.")).put_file(relative.name, path)
        root = open_store(mirror)
        root.write_bytes("latest", tag.encode())
        tags = sorted((int(t.removeprefix("global_step")), t) for t in root.list_folders()
                      if t.startswith("global_step") and t.removeprefix("global_step").isdigit())
        for _, old in tags[:-self.config.keep_checkpoints]:
            if old != tag:
                self._mirror_delete(f"{mirror}/{old}")

    def _mirror_delete(self, url: str) -> None:
        from data_prep.storage import open_store

        store = open_store(url)
        for sub in store.list_folders():
            self._mirror_delete(f"{url}/{sub}")
        for name in store.list():
            store.delete(name)

    def _mirror_download(self) -> None:
        from data_prep.storage import open_store

        mirror = self.config.checkpoint_mirror.rstrip("/")
        root = open_store(mirror)
        if "latest" not in root.list():
            return
        tag = root.read_bytes("latest").decode().strip()

        def fetch(url: str, folder: Path) -> None:
            store = open_store(url)
            folder.mkdir(parents=True, exist_ok=True)
            for name in store.list():
                store.download(name, folder / name)
            for sub in store.list_folders():
                fetch(f"{url}/{sub}", folder / sub)
        fetch(f"{mirror}/{tag}", self.checkpoint_dir / tag)
        tmp = self.checkpoint_dir / ".latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, self.checkpoint_dir / "latest")
        print(f"fetched checkpoint {tag} from {mirror}", flush=True)

    def _prune(self) -> None:
        latest = (self.checkpoint_dir / "latest").read_text().strip()
        steps = sorted((int(p.name.removeprefix("global_step")), p) for p in self.checkpoint_dir.glob("global_step*")
                       if p.name.removeprefix("global_step").isdigit())
        for _, path in steps[:-self.config.keep_checkpoints]:
            if path.name != latest:
                shutil.rmtree(path, ignore_errors=True)

    def _resume(self) -> None:
        if self.config.checkpoint_mirror and not (self.checkpoint_dir / "latest").exists():
            if self.rank == 0:  # a run folder lost with its node: continue from the mirror
                self._mirror_download()
            self.dist.barrier()
        if not (self.checkpoint_dir / "latest").exists():
            return
        tag = (self.checkpoint_dir / "latest").read_text().strip()
        path, client = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"{self.checkpoint_dir}/latest names {tag}, which cannot be loaded")
        folder = self.checkpoint_dir / tag
        shard = folder / f"ema_rank{self.rank if self.ema.sharded else 0:05d}.pt"
        self.ema.load_state_dict(torch.load(shard, weights_only=False))
        if len(client["streams"]) != self.world:
            raise RuntimeError(f"checkpoint {tag} was written by {len(client['streams'])} ranks, this job has "
                               f"{self.world}: resume with the same number of ranks")
        self.stream.load_state_dict(client["streams"][self.rank])
        _set_rng_state(client["rng"][self.rank])
        self.step, self.counters = client["step"], dict(client["counters"])
        if self.rank == 0:
            print(f"resumed from {folder} at step {self.step}", flush=True)

    # -- evaluation --------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: str = "valid", use_ema: bool = True) -> dict:
        """Mean per-image ELBO over every image of the split, each counted once across ranks."""
        from contextlib import nullcontext

        stream = ShardStream(f"{self.config.data.rstrip('/')}/{split}", self.config.batch_per_gpu, rank=self.rank,
                             world=self.world, train=False, workers=self.config.workers)
        totals = torch.zeros(3, dtype=torch.float64)  # sum of per-image ELBO, images, unreadable samples
        devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        # its own random stream: evaluating must not change the training that follows
        with torch.random.fork_rng(devices=devices), self.ema.swapped() if use_ema else nullcontext():
            torch.manual_seed(self.config.seed + 1 + self.rank)
            for batch in stream:
                batch = batch.to(self.device)
                per_image = self.engine(batch.images).per_image_elbo.double().cpu()
                valid = batch.valid.cpu()
                totals += torch.stack([(per_image * valid).sum(), valid.sum().double(),
                                       torch.tensor(float(batch.skipped), dtype=torch.float64)])
        self.dist.all_reduce(totals)
        elbo = float(totals[0] / totals[1])
        return {"elbo": elbo, "bpd": elbo / math.log(2), "images": int(totals[1]), "unreadable": int(totals[2])}

    @torch.no_grad()
    def write_samples(self) -> None:
        """Sample grids at the preset's temperatures and, for a few valid images, samples that keep
        their first k latent groups (the official visualisation), with the EMA weights; to TensorBoard
        and to RUN/samples/. Every rank takes part (ZeRO-3 gathers parameters); rank 0 writes."""
        from model import get_preset

        from .images import make_grid, save_png

        model, paper = self.engine.module, get_preset(self.config.preset).training
        res = model.config.image_size
        n = 8 if res <= 64 else 4 if res <= 256 else 2
        valid = ShardStream(f"{self.config.data.rstrip('/')}/valid", n, train=False)  # the same images on every rank
        originals = next(iter(valid)).images.to(self.device)
        groups = model.config.num_latent_groups
        keep = sorted({int(k) for k in np.floor(np.linspace(0, 1, paper.num_variables_visualize + 2) * groups)[1:-1]})
        devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.ema.swapped():
            torch.manual_seed(self.config.seed + 2)
            samples = [model.sample(n, t) for t in paper.sample_temperatures]
            latents = [originals] + [model.sample_from_latents(originals, k) for k in keep]
        if self.rank != 0:
            return
        for name, rows in (("samples", samples), ("reconstructions", latents)):
            grid = make_grid(rows)
            self.writer.add_image(name, grid, self.step, dataformats="HWC")
            save_png(grid, self.run_dir / "samples" / f"step{self.step:08d}-{name}.png")
        self.writer.flush()

    # -- the loop ------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if "eval/elbo" in record:
            print(f"step {record['step']}: eval elbo {record['eval/elbo']:.4f} nats/dim ({record['eval/bpd']:.4f} "
                  f"bpd) on {record['eval/images']} images (EMA weights)", flush=True)
        else:
            print(f"step {record['step']}: elbo {record['train/elbo']:.4f} nats/dim ({record['train/bpd']:.4f} bpd), "
                  f"grad norm {record['train/grad_norm']:.3g}, skipped {record['train/skipped_updates']}, "
                  f"{record['train/images_per_s']:.1f} img/s", flush=True)

    def run(self, max_steps: int | None = None) -> list[float]:
        """Train until `max_steps` (default: the config's; 0 = until stopped); per-step mean losses."""
        config, engine = self.config, self.engine
        stop = max_steps if max_steps is not None else config.max_steps
        losses: list[float] = []
        window = {"loss": [], "distortion": [], "rate": [], "norm": [], "images": 0, "wait": 0.0, "start": time.time()}
        batches = self.stream.forever()
        while not stop or self.step < stop:
            for group in engine.optimizer.param_groups:
                group["lr"] = lr_at(config, self.step)
            t0 = time.perf_counter()
            batch = next(batches)
            window["wait"] += time.perf_counter() - t0
            terms = engine(batch.to(self.device).images)
            engine.backward(terms.elbo)
            stats = self.rule.step()
            if stats is None:  # inside a gradient accumulation
                continue
            if not stats.skipped:
                self.ema.update()
            reduced = torch.tensor([float(terms.elbo), float(terms.distortion), float(terms.rate),
                                    float(not math.isfinite(float(terms.elbo))), float(self.stream.skipped),
                                    float(self.signalled)])
            self.dist.all_reduce(reduced)
            mean = reduced[:3] / self.world
            self.counters["skipped_updates"] += int(stats.skipped)
            self.counters["nan_losses"] += int(reduced[3] > 0)
            self.step += 1
            losses.append(float(mean[0]))
            window["loss"].append(float(mean[0]))
            window["distortion"].append(float(mean[1]))
            window["rate"].append(float(mean[2]))
            window["norm"].append(stats.grad_norm)
            window["images"] += len(batch) * self.world * config.grad_accum
            if self.step % config.log_every == 0 or self.step == stop:
                elapsed = time.time() - window["start"]
                finite = [v for v in window["loss"] if math.isfinite(v)] or [math.nan]
                self._log({
                    "step": self.step,
                    "train/elbo": float(np.mean(finite)),
                    "train/bpd": float(np.mean(finite)) / math.log(2),
                    "train/distortion": float(np.nanmean(window["distortion"])),
                    "train/rate": float(np.nanmean(window["rate"])),
                    "train/grad_norm": float(np.nanmean(window["norm"])) if any(map(math.isfinite, window["norm"]))
                    else math.nan,
                    "train/skipped_updates": self.counters["skipped_updates"],
                    "train/nan_losses": self.counters["nan_losses"],
                    "train/lr": lr_at(config, self.step - 1),
                    "train/images_per_s": window["images"] / elapsed,
                    "train/step_time_s": elapsed / len(window["loss"]),
                    "train/data_wait_fraction": window["wait"] / elapsed,
                    "train/memory_gb": (torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda"
                                        else _rss_gb()),
                    "train/skipped_samples": float(reduced[4]),
                })
                window = {"loss": [], "distortion": [], "rate": [], "norm": [], "images": 0, "wait": 0.0,
                          "start": time.time()}
            if self.step % config.eval_every == 0 or self.step == stop:
                result = self.evaluate()
                if self.rank == 0:
                    self._log({"step": self.step, "eval/elbo": result["elbo"], "eval/bpd": result["bpd"],
                               "eval/images": result["images"]})
            if self.step % config.sample_every == 0 or self.step == stop:
                self.write_samples()
            if self.step % config.checkpoint_every == 0 or self.step == stop or reduced[5] > 0:
                self.save_checkpoint()
            if reduced[5] > 0:  # any rank was signalled: all saved, all stop
                raise Preempted(self.step)
        return losses

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        # An explicit end to the process group: left to interpreter teardown, gloo's threads were seen
        # to abort a finished rank ("terminate called without an active exception").
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(config: RunConfig) -> int:
    """Run the job; the process exit status: 0 when done, REQUEUE_EXIT_CODE after a signal's checkpoint."""
    trainer = Trainer(config)
    try:
        trainer.run()
        return 0
    except Preempted as stop:
        if trainer.rank == 0:
            print(f"{stop}; exiting with {REQUEUE_EXIT_CODE} for the launcher to requeue", flush=True)
        return REQUEUE_EXIT_CODE
    finally:
        trainer.close()
