"""Import of the released openai/vdvae checkpoints (`*-model.th`, `*-model-ema.th`).

Our parameter names are the official ones but for the final gain and bias,
which the output head owns here (`decoder.out_net.gain`, official
`decoder.gain`): under ZeRO-3 a parameter may only be used inside the
forward of the module that owns it. This module renames, strips the DDP
`module.` prefix, and checks a released state dict first, explaining any
mismatch (which keys, which shapes, which preset the file seems to be for)
before touching the model.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Mapping

import torch

from .presets import PRESETS, ModelConfig, get_preset
from .vdvae import VDVAE

_MAX_LISTED = 8

# ours -> official
_RENAMES = {"decoder.out_net.gain": "decoder.gain", "decoder.out_net.bias": "decoder.bias"}
_RENAMES_BACK = {v: k for k, v in _RENAMES.items()}


def to_official_names(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((_RENAMES.get(k, k), v) for k, v in state_dict.items())


def from_official_names(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((_RENAMES_BACK.get(k, k), v) for k, v in state_dict.items())


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the requested preset."""


@functools.lru_cache(maxsize=None)  # (a preset's model takes a second to build, even on the meta device)
def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = VDVAE(config)
    return {k: tuple(v.shape) for k, v in to_official_names(model.state_dict()).items()}


def _clean(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise CheckpointMismatchError(
            f"expected a state dict (parameter name -> tensor), got {type(state_dict).__name__}")
    out = OrderedDict()
    for key, value in state_dict.items():
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _problems(state_dict: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> list[str]:
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
             for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected keys: {_listing(extra)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes: {_listing(wrong)}")
    return problems


def check_official_state_dict(state_dict: Mapping[str, torch.Tensor], preset: str | ModelConfig,
                              ) -> "OrderedDict[str, torch.Tensor]":
    """Return the cleaned state dict, or raise `CheckpointMismatchError` saying what differs."""
    state_dict = _clean(state_dict)
    config = get_preset(preset).model if isinstance(preset, str) else preset
    name = preset if isinstance(preset, str) else "the given config"
    problems = _problems(state_dict, _expected_shapes(config))
    if not problems:
        return state_dict
    hint = ""
    for other, p in PRESETS.items():
        if p.model != config and not _problems(state_dict, _expected_shapes(p.model)):
            hint = f" The file matches preset {other!r}: pass that preset instead."
            break
    raise CheckpointMismatchError(
        f"checkpoint does not fit {name}: " + "; ".join(problems) + "." + hint)


def load_official(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
                  preset: str | ModelConfig) -> VDVAE:
    """A `VDVAE` of `preset` holding the weights of an official `*-model.th`/`*-model-ema.th`."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        if not os.path.isfile(path_or_state_dict):
            raise FileNotFoundError(f"no checkpoint file at {os.fspath(path_or_state_dict)!r}")
        state_dict = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    else:
        state_dict = path_or_state_dict
    state_dict = check_official_state_dict(state_dict, preset)
    config = get_preset(preset).model if isinstance(preset, str) else preset
    model = VDVAE(config)
    model.load_state_dict({k: v.float() for k, v in from_official_names(state_dict).items()})
    return model


def official_state_dict(model: VDVAE) -> "OrderedDict[str, torch.Tensor]":
    """The model's weights as an official-layout state dict (fp32, CPU), loadable by openai/vdvae."""
    return OrderedDict((k, v.detach().float().cpu().clone())
                       for k, v in to_official_names(model.state_dict()).items())
