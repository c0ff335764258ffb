"""The DeepSpeed engine of a run: the VDVAE built from the config, activation checkpointing applied,
ZeRO's fp32 master shared with the parameter partition at stage 3.

DeepSpeed internals used (pinned in pyproject.toml): stage 3's
`fp16_partitioned_groups_flat` / `fp32_partitioned_groups_flat`,
`offload_optimizer`, `swap_optimizer`.
"""

from __future__ import annotations

import deepspeed
import torch

from model import VDVAE

from .config import RunConfig


def device_of_this_rank() -> torch.device:
    return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")


def build_engine(config: RunConfig, world: int, device: torch.device):
    """The engine, with the same initial weights on every rank (seeded by the config)."""
    torch.manual_seed(config.seed)
    model = VDVAE(config.model_config())
    model.set_activation_checkpointing(config.activation_checkpointing, use_reentrant=config.zero_stage == 3)
    if config.compile:  # (ZeRO 0-2: the config refuses stage 3, where DeepSpeed's hooks break every graph)
        model.compile_blocks()
    ds = config.deepspeed_config(world, on_gpu=device.type == "cuda")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    share_fp32_master(engine)
    return engine


def share_fp32_master(engine) -> int:
    """Make ZeRO-3's fp32 master weights the fp32 parameter partition itself, as DeepSpeed intends.

    When the parameters are already fp32 on the optimizer's device, DeepSpeed's
    stage 3 means to use each partition as its own master copy. It decides so
    by comparing a ``torch.device`` with the device's name, which recent
    PyTorch never finds equal, and clones the partition instead: one more
    partition-sized fp32 buffer per rank, a sixth of stage 3's state with Adam
    and the EMA. The optimizer keeps its tensor objects (its state is keyed by
    them); only their storage becomes the partition's. DeepSpeed's copy from
    master to partition after each step is then a copy onto itself, as in its
    own aliased case. bf16/fp16 runs keep their fp32 master: nothing to share.
    Returns the bytes freed on this rank.
    """
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() != 3 or getattr(optimizer, "offload_optimizer", False) \
            or getattr(optimizer, "swap_optimizer", False):
        return 0
    freed = 0
    for part, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat,
                            strict=True):
        if part is None or master.numel() == 0 or part.dtype != master.dtype or part.device != master.device \
                or part.numel() != master.numel() or part.data_ptr() == master.data_ptr():
            continue
        if not torch.equal(part, master):  # a master that already differs is not a copy to drop
            raise RuntimeError("ZeRO-3 fp32 master differs from its parameter partition; call "
                               "share_fp32_master right after deepspeed.initialize")
        freed += master.untyped_storage().nbytes()
        master.data = part.data
    return freed
