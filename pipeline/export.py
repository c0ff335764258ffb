"""A run's weights outside training: `vdvae export`, and the model that eval and sample load.

Export writes `model.pt` and `model-ema.pt` (our weights format,
`weights.py`) and `<preset>-model.th` / `<preset>-model-ema.th` (the
official key layout). The checkpoint's layout and its safe reading are
`checkpoint.py`'s.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from data_prep.storage import LocalStore
from model import VDVAE, official_state_dict

from .checkpoint import consolidate
from .weights import NotOurWeightsError, load_official_file, load_weights, save_weights


def export(run_dir: str | os.PathLike, out: str | os.PathLike, tag: str | None = None) -> list[Path]:
    """Write the four files into `out`; their paths."""
    config, tag, model_sd, ema_sd = consolidate(run_dir, tag)
    out = Path(out)
    written = []
    for suffix, state in (("", model_sd), ("-ema", ema_sd)):
        model = VDVAE(config.model_config())
        model.load_state_dict(state)
        written.append(save_weights(model, out / f"model{suffix}.pt", preset=config.preset))
        official = official_state_dict(model)
        name = f"{config.preset}-model{suffix}.th"
        LocalStore(out).write_with(name, lambda f, official=official: torch.save(official, f))
        written.append(out / name)
    return written


def load_model(source: str | os.PathLike, preset: str | None = None, weights: str = "ema") -> tuple[VDVAE, str | None]:
    """A VDVAE from a run folder (its latest checkpoint; EMA weights unless weights="model"), one of
    our weights files, or an official *-model.th (needs `preset`); with its preset name."""
    path = Path(source)
    if path.is_dir():
        config, tag, model_sd, ema_sd = consolidate(path)
        model = VDVAE(config.model_config())
        model.load_state_dict(ema_sd if weights == "ema" else model_sd)
        print(f"{source}: {tag}, {weights} weights", file=sys.stderr)
        return model, config.preset
    if not path.is_file():
        raise FileNotFoundError(f"{source}: not a run folder, weights file or official checkpoint")
    try:
        return load_weights(path)
    except NotOurWeightsError:
        if preset is None:
            raise ValueError(f"{source} is not one of our weights files; for an official checkpoint "
                             "give its --preset") from None
        return load_official_file(path, preset), preset
