"""What the tests of starting, continuing and resizing runs share (tests/test_init.py, tests/test_resize.py).

A small prepared dataset; watched `vdvae train` jobs of N ranks (tests/scripts/train_probe.py: the
whole state at the start and at each checkpoint, every step's global batch); official-layout
checkpoints made here; and the same training in plain PyTorch, rank by rank, as the reference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from conftest import TINY, gradient_photos
from data_prep.prep import prep
from model import VDVAE, ModelConfig, official_state_dict
from pipeline.config import RunConfig
from pipeline.stream import ShardStream

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "scripts" / "train_probe.py"
SETTINGS = ("batch_per_gpu=4", "lr=2e-3", "warmup_iters=2", "workers=0", "log_every=1", "eval_every=100000",
            "sample_every=100000", "ema_rate=0.9", "checkpoint_every=100000")
"""The runs' settings (later ones override them); the cifar10 preset's clip 200 and skip 400 never act here."""


def prepared_data(tmp: Path) -> dict:
    """64 training and 8 valid 8 px images (learnable gradients) as shards, and the tiny model's JSON."""
    prep("folder", gradient_photos(tmp / "src"), str(tmp / "data"), samples_per_shard=16, resolution=8,
         num_valid=8, progress=False)
    (tmp / "tiny.json").write_text(json.dumps(asdict(TINY)))
    return {"data": str(tmp / "data"), "model_json": str(tmp / "tiny.json")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_of(data: dict, *settings: str, run_dir: str = "unused") -> RunConfig:
    return RunConfig.from_preset("cifar10", data["data"], str(run_dir), [f"model_json={data['model_json']}",
                                                                         *SETTINGS, *settings])


@dataclass
class Probe:
    """What a watched job left: its run folder and the probe's files."""

    run_dir: Path
    out: Path

    @property
    def start(self) -> dict:
        return torch.load(self.out / "start.pt", weights_only=True)

    def saved(self, step: int) -> dict:
        return torch.load(self.out / f"saved{step}.pt", weights_only=True)

    @property
    def keys(self) -> list[list[str]]:
        """Each step's global batch, in the order the job ran them."""
        return json.loads((self.out / "keys.json").read_text())

    @property
    def losses(self) -> dict[int, float]:
        """Step -> the mean ELBO over ranks, from the run's jsonl log."""
        lines = (self.run_dir / "log.jsonl").read_text().splitlines()
        return {r["step"]: r["train/elbo"] for r in map(json.loads, lines) if "train/elbo" in r}


def probe(data: dict, run_dir: Path, out: Path, world: int, *settings: str) -> Probe:
    """A `vdvae train` job of `world` ranks on the tiny model, watched (tests/scripts/train_probe.py)."""
    port = free_port()
    cmd = [sys.executable, str(PROBE), "--preset", "cifar10", "--data", data["data"], "--run-dir",
           str(run_dir), f"model_json={data['model_json']}", *SETTINGS, *settings]
    procs = []
    for rank in range(world):
        env = dict(os.environ, DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT), PROBE_OUT=str(out))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=ROOT))
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (stdout[-2000:], stderr[-4000:])
    return Probe(run_dir, out)


@contextmanager
def one_thread():
    """Torch on one thread: on a machine of few busy cores, two threads of this tiny model's steps
    wait for each other (measured: 80 times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- official-layout checkpoints ----------------------------------------------------------------------


def official_run(prefix: Path, data: dict, *, iteration: int = 7, adam_steps: int = 3, per_group_step: bool = False,
                 model_config: ModelConfig = TINY) -> dict:
    """PREFIX-model.th (DDP's `module.` keys), -model-ema.th, -opt.th (a torch AdamW over the model's
    parameters in order, `adam_steps` taken: apex's layouts) and -log.jsonl (train_loss up to
    `iteration`); the state they hold, by our parameter names."""
    with one_thread():
        return _official_run(prefix, data, iteration, adam_steps, per_group_step, model_config)


def _official_run(prefix, data, iteration, adam_steps, per_group_step, model_config) -> dict:
    torch.manual_seed(1)
    model = VDVAE(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.01)
    batches = ShardStream(f"{data['data']}/train", 4, seed=9).forever()
    for _ in range(adam_steps):
        loss = model(next(batches).images).elbo
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    generator = torch.Generator().manual_seed(2)
    ema = {k: v.detach() + 0.01 * torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}
    torch.save({f"module.{k}": v for k, v in official_state_dict(model).items()}, f"{prefix}-model.th")
    ema_model = VDVAE(model_config)
    ema_model.load_state_dict(ema)
    torch.save(official_state_dict(ema_model), f"{prefix}-model-ema.th")
    saved = optimizer.state_dict()
    if per_group_step:  # newer apex FusedAdam: one step count per group
        for slot in saved["state"].values():
            step = slot.pop("step")
        saved["param_groups"][0]["step"] = int(step)
    torch.save(saved, f"{prefix}-opt.th")
    lines = [{"type": "train_loss", "step": s, "elbo": 5.0, "epoch": 0} for s in range(1, iteration + 1)]
    lines.insert(2, {"type": "eval_loss", "step": iteration + 50, "elbo": 5.0})  # not a train_loss: not taken
    Path(f"{prefix}-log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    named = dict(model.named_parameters())
    return {"weights": {k: v.detach().clone() for k, v in named.items()},
            "exp_avg": {k: optimizer.state[p]["exp_avg"].clone() for k, p in named.items()},
            "exp_avg_sq": {k: optimizer.state[p]["exp_avg_sq"].clone() for k, p in named.items()},
            "adam_step": adam_steps, "ema": ema, "step": iteration}


# -- the reference: the same training in plain PyTorch ------------------------------------------------


@dataclass
class Reference:
    losses: dict[int, float]
    """Step -> the mean ELBO over the ranks."""
    states: dict[int, dict]
    """Step -> weights, exp_avg, exp_avg_sq, ema after it (at the steps asked for)."""
    keys: dict[int, list[str]]
    """Step -> its global batch, rank by rank."""


def plain_pytorch(data: dict, start: dict, world: int, steps: int, keep: tuple[int, ...] = (),
                  settings: tuple[str, ...] = ()) -> Reference:
    """What `vdvae train` on `world` ranks does from `start` (weights, EMA, and exp_avg, exp_avg_sq,
    adam_step unless fresh; its step), step by step in one process: each rank's batch from its own
    stream, its latent noise from its own generator (seeded as the trainer seeds it), the gradients
    averaged over the ranks, the paper's rule, torch's AdamW, the EMA on taken steps."""
    with one_thread():
        return _plain_pytorch(data, start, world, steps, keep, settings)


def _plain_pytorch(data, start, world, steps, keep, settings) -> Reference:
    config = config_of(data, *settings)
    from pipeline.train import lr_at  # (imports deepspeed: only the tests that need it pay for it)

    model = VDVAE(config.model_config())
    model.load_state_dict(start["weights"])
    named = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=1e-8, weight_decay=config.weight_decay)
    if start.get("exp_avg") is not None:
        for name, p in named.items():
            optimizer.state[p] = {"step": torch.tensor(float(start["adam_step"])),
                                  "exp_avg": start["exp_avg"][name].clone(),
                                  "exp_avg_sq": start["exp_avg_sq"][name].clone()}
    ema = {k: v.clone().float() for k, v in start["ema"].items()}
    streams = [ShardStream(f"{config.data}/train", config.batch_per_gpu, rank=r, world=world,
                           seed=config.seed).forever() for r in range(world)]
    rngs = []
    for rank in range(world):
        torch.manual_seed(config.seed * 1000 + rank)
        rngs.append(torch.get_rng_state())
    losses, states, keys = {}, {}, {}
    for step in range(start["step"] + 1, start["step"] + steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step - 1)
        optimizer.zero_grad()
        total, keys[step] = 0.0, []
        for rank in range(world):
            torch.set_rng_state(rngs[rank])
            batch = next(streams[rank])
            keys[step] += batch.keys
            elbo = model(batch.images).elbo
            (elbo / world).backward()
            rngs[rank] = torch.get_rng_state()
            total += float(elbo)
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if float(norm) < config.skip_threshold:
            torch.nn.utils.clip_grads_with_norm_(params, config.grad_clip, norm)
            optimizer.step()
            with torch.no_grad():
                for name, p in named.items():
                    ema[name].mul_(config.ema_rate).add_(p.detach(), alpha=1 - config.ema_rate)
        losses[step] = total / world
        if step in keep:
            states[step] = {"weights": {k: p.detach().clone() for k, p in named.items()},
                            "exp_avg": {k: optimizer.state[p]["exp_avg"].clone() for k, p in named.items()},
                            "exp_avg_sq": {k: optimizer.state[p]["exp_avg_sq"].clone() for k, p in named.items()},
                            "ema": {k: v.clone() for k, v in ema.items()}}
    return Reference(losses, states, keys)


def global_batches(data: dict, steps: int, batch: int = 8) -> list[list[str]]:
    """The first `steps` global batches of a new run's stream (world-free: one rank of `batch`)."""
    stream = ShardStream(f"{data['data']}/train", batch, seed=0).forever()
    return [next(stream).keys for _ in range(steps)]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)
