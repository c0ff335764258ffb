"""Our weights file: a VDVAE state dict with the config that builds it.

One `torch.save` dict, loadable with `torch.load(weights_only=True)` and
without DeepSpeed: {"format", "preset", "model_config", "state_dict"}.
Written to a temporary file and renamed, so a crash never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from pathlib import Path

import torch

from data_prep.storage import LocalStore
from model import VDVAE, ModelConfig, load_official

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


class NotOurWeightsError(ValueError):
    """A torch file that is not one of our weights files (an official checkpoint, say)."""


class UnsafeFileError(ValueError):
    """A file that `torch.load(weights_only=True)` refuses: it would run code, or is not a torch file."""


def safe_load(path: str | os.PathLike, allowed: list | tuple = (), map_location="cpu", mmap: bool = False):
    """`torch.load` that cannot run code: tensors, plain containers and the `allowed` classes only.

    `mmap`: map the file's tensors rather than read them (a file of the zip format torch has written
    since 1.6; others are read whole): only what is used is read. A file that does not load that
    way raises UnsafeFileError naming it and why.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            if mmap and zipfile.is_zipfile(path):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeFileError(f"{os.fspath(path)} cannot be loaded safely ({why[:300]}); it is not a file this "
                              "program wrote, or it was altered. Nothing in it was run.") from None


def load_weights(path: str | os.PathLike) -> tuple[VDVAE, str | None]:
    """Build the model stored in `path` and return it with its preset name (if any)."""
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise NotOurWeightsError(f"{os.fspath(path)} is not a {FORMAT} file; for an official "
                         "*-model.th checkpoint use `vdvae import-official` first")
    model = VDVAE(ModelConfig(**payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    return model, payload["preset"]


def load_official_file(path: str | os.PathLike, preset: str) -> VDVAE:
    """An official *-model.th / *-model-ema.th as our VDVAE, read safely (tensors only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {os.fspath(path)!r}")
    return load_official(safe_load(path), preset)
