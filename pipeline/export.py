"""Whole fp32 weights from a run's checkpoint, without DeepSpeed at load time: the model and its EMA.

The model comes from DeepSpeed's own consolidation (`zero_to_fp32`) at
ZeRO 1-3, or its model-states file at stage 0. The EMA at ZeRO 1-3 is one
file per rank, each holding its piece of every parameter and where that
piece starts in the parameter's flattened values (`EMA.starts`); the pieces
are put in place (under ZeRO-3 rank r holds [r * ceil(n / world), ...),
the last one padded beyond n).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from model import VDVAE, official_state_dict

from .config import RunConfig
from .weights import save_weights


def _tag(checkpoints: Path, tag: str | None) -> str:
    if tag is not None:
        return tag
    latest = checkpoints / "latest"
    if not latest.exists():
        raise FileNotFoundError(f"{checkpoints} has no `latest`: no finished checkpoint to export")
    return latest.read_text().strip()


def consolidate(run_dir: str | os.PathLike, tag: str | None = None) -> tuple[RunConfig, str, dict, dict]:
    """(config, tag, model state dict, EMA state dict), fp32 on the CPU."""
    run_dir = Path(run_dir)
    config = RunConfig.from_json((run_dir / "config.json").read_text())
    checkpoints = run_dir / "checkpoints"
    tag = _tag(checkpoints, tag)
    folder = checkpoints / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist")
    if config.zero_stage == 0:
        model = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    model = {k: v.float() for k, v in model.items()}
    shards = [torch.load(p, map_location="cpu", weights_only=False) for p in sorted(folder.glob("ema_rank*.pt"))]
    if not shards:
        raise FileNotFoundError(f"{folder} holds no EMA (ema_rank*.pt)")
    ema = {}
    for i, name in enumerate(shards[0]["names"]):
        n = model[name].numel()
        flat = torch.zeros(n)
        for shard in shards:  # each rank's piece in place (a partition's padding falls beyond n)
            piece, start = shard["shadow"][i].reshape(-1), shard["starts"][i]
            k = max(0, min(piece.numel(), n - start))
            flat[start:start + k] = piece[:k]
        ema[name] = flat.reshape(model[name].shape)
    return config, tag, model, ema


def export(run_dir: str | os.PathLike, out: str | os.PathLike, tag: str | None = None) -> list[Path]:
    """Write `model.pt` and `model-ema.pt` (our weights format) and `<preset>-model.th` /
    `<preset>-model-ema.th` (the official key layout) into `out`."""
    config, tag, model_sd, ema_sd = consolidate(run_dir, tag)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, state in (("", model_sd), ("-ema", ema_sd)):
        model = VDVAE(config.model_config())
        model.load_state_dict(state)
        written.append(save_weights(model, out / f"model{suffix}.pt", preset=config.preset))
        tmp = out / f".{config.preset}-model{suffix}.th.tmp"
        torch.save(official_state_dict(model), tmp)
        os.replace(tmp, out / f"{config.preset}-model{suffix}.th")
        written.append(out / f"{config.preset}-model{suffix}.th")
    return written
