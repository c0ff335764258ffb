"""One rank of a 2-rank DeepSpeed run (gloo, CPU) checking the paper's update rule and the EMA.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python update_rule.py STAGE

Steps, each on 4 images per rank with the same RNG seed on both ranks:
  1. a normal step: the reported pre-clip norm beside the norm of the same
     two half-batches computed in one process with plain PyTorch;
  2. rank 1's loss made NaN: every rank must skip;
  3. the skip threshold set below the norm: every rank must skip;
  4. a normal step again.
Under ZeRO 1-3 the optimizer gets DeepSpeed's dynamic fp16 loss scaler
(starting at 1, so fp32 values are unchanged): a NaN is an overflow and
halves the scale, a skip over the threshold must leave it.
Prints one JSON line: norms, skip flags, the loss scale after each step,
and whether this rank's parameters (its partition under ZeRO-3) and EMA
changed at each step.
"""

import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
from conftest import TINY  # noqa: E402

from model import VDVAE  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.distributed import without_shared_memory_op  # noqa: E402
from pipeline.ema import EMA  # noqa: E402
from pipeline.update import UpdateRule  # noqa: E402

stage = int(sys.argv[1])
rank = int(os.environ["RANK"])
without_shared_memory_op()
deepspeed.init_distributed(dist_backend="gloo")
config = RunConfig.from_preset("cifar10", "unused", "unused", [f"zero_stage={stage}", "batch_per_gpu=4",
                                                              "lr=1e-3", "grad_clip=5", "skip_threshold=1e6"])
ds = config.deepspeed_config(world_size=2, on_gpu=False)
torch.manual_seed(0)
model = VDVAE(TINY)
reference = VDVAE(TINY)
reference.load_state_dict(model.state_dict())
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
if stage > 0:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    engine.optimizer.loss_scaler = DynamicLossScaler(init_scale=1.0, scale_window=1000, min_scale=1e-4,
                                                     delayed_shift=1, consecutive_hysteresis=False)
rule = UpdateRule(engine, config.grad_clip, config.skip_threshold)
ema = EMA(engine, 0.9, rank, int(os.environ["WORLD_SIZE"]))


def images(r: int, step: int) -> torch.Tensor:
    return torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(100 * step + r))


def local_state() -> list[torch.Tensor]:
    return [ema._source(p).detach().clone() for p in engine.module.parameters()]


def reference_norm(step: int) -> float:
    """The same step in one process: the mean of the two ranks' gradients."""
    reference.zero_grad()
    for r in range(2):
        torch.manual_seed(step)
        (reference(images(r, step)).elbo / 2).backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in reference.parameters() if p.grad is not None]))


result = {"norms": [], "reference_norm": None, "skipped": [], "params_changed": [], "ema_changed": [],
          "loss_scale": []}
for step in range(4):
    before, ema_before = local_state(), [s.clone() for s in ema.shadow]
    torch.manual_seed(step)
    loss = engine(images(rank, step)).elbo
    if step == 1 and rank == 1:
        loss = loss * float("nan")
    if step == 2:
        rule.skip_threshold = 1e-3
    engine.backward(loss)
    stats = rule.step()
    rule.skip_threshold = config.skip_threshold
    if not stats.skipped:
        ema.update()
    if step == 0:
        result["reference_norm"] = reference_norm(step)
    result["norms"].append(stats.grad_norm)
    result["skipped"].append(stats.skipped)
    result["loss_scale"].append(float(getattr(getattr(engine.optimizer, "loss_scaler", None), "cur_scale", 1.0)))
    result["params_changed"].append(any(not torch.equal(a, b) for a, b in zip(before, local_state(), strict=True)))
    result["ema_changed"].append(any(not torch.equal(a, b) for a, b in zip(ema_before, ema.shadow, strict=True)))
result["ema_numel"] = ema.numel()
result["model_numel"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
print(json.dumps(result))
