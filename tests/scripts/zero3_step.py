"""One process of DeepSpeed ZeRO-3 on CPU (gloo) training the tiny VDVAE for two steps.

Run by tests/test_zero3.py in a subprocess: DeepSpeed sets process-wide state.
Prints one JSON line with the ZeRO-3 losses and those of the same model and
optimizer without DeepSpeed.
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
from pipeline.distributed import without_shared_memory_op  # noqa: E402
from pipeline.engine import share_fp32_master  # noqa: E402

policy, reentrant = sys.argv[1], sys.argv[2] == "1"
torch.manual_seed(0)
model = VDVAE(TINY)
model.set_activation_checkpointing(policy, use_reentrant=reentrant)
reference = VDVAE(TINY)
reference.load_state_dict(model.state_dict())
ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, betas=(0.9, 0.9), weight_decay=0.01)
config = {
    "train_micro_batch_size_per_gpu": 4,
    # Threshold 0: partition every parameter (small ones otherwise stay whole on each rank).
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.9], "weight_decay": 0.01,
                                              "torch_adam": True}},
}
without_shared_memory_op()
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
freed = share_fp32_master(engine)
masters_shared = all(m.data_ptr() == p.data_ptr() for m, p in zip(engine.optimizer.fp32_partitioned_groups_flat,
                                                                  engine.optimizer.fp16_partitioned_groups_flat, strict=True))
images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
losses, ref_losses = [], []
for step in range(2):
    torch.manual_seed(10 + step)
    loss = engine(images).elbo
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
    torch.manual_seed(10 + step)
    ref_loss = reference(images).elbo
    ref_opt.zero_grad()
    ref_loss.backward()
    ref_opt.step()
    ref_losses.append(ref_loss.item())
samples = engine.module.sample(2, 0.8, generator=torch.Generator().manual_seed(0))
print(json.dumps({"losses": losses, "reference": ref_losses, "sample_shape": list(samples.shape),
                  "freed": freed, "masters_shared": masters_shared,
                  "params": sum(p.numel() for p in reference.parameters())}))
