"""Our weights file: a VDVAE state dict with the config that builds it.

One `torch.save` dict, loadable with `torch.load(weights_only=True)` and
without DeepSpeed: {"format", "preset", "model_config", "state_dict"}.
Written to a temporary file and renamed, so a crash never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from data_prep.storage import LocalStore
from model import VDVAE, ModelConfig

FORMAT = "vdvae-weights/1"


def save_weights(model: VDVAE, path: str | os.PathLike, preset: str | None = None) -> Path:
    path = Path(path)
    payload = {
        "format": FORMAT,
        "preset": preset,
        "model_config": dataclasses.asdict(model.config),
        "state_dict": {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    LocalStore(path.parent).write_with(path.name, lambda f: torch.save(payload, f))
    return path


def load_weights(path: str | os.PathLike) -> tuple[VDVAE, str | None]:
    """Build the model stored in `path` and return it with its preset name (if any)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a {FORMAT} file; for an official "
                         "*-model.th checkpoint use `vdvae import-official` first")
    model = VDVAE(ModelConfig(**payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    return model, payload["preset"]
