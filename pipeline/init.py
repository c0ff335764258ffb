"""A new run's state from files: `init=` weights, `init_ema=`, and `init_official=` (continuing an official run).

`init=PATH`: one of our weights files (`vdvae export`'s `model.pt`,
`vdvae import-official`'s output), an exported run's folder (its `model.pt`,
and `model-ema.pt` as the EMA), or an official `*-model.th`. The optimizer
starts fresh, at step 0, with the preset's warmup; the EMA starts equal to
the weights (as the official code does) unless `init_ema=PATH` (or the
exported folder) gives it.

`init_official=PREFIX` continues an official run from its four files:
`PREFIX-model.th`, `-model-ema.th`, `-opt.th`, `-log.jsonl`. The official
optimizer is apex's FusedAdam over `vae.parameters()` in order, and the
model file lists the parameters in that same order (a state dict is the
modules' own parameters first, depth first, as `parameters()` is), so
entry i of `-opt.th` is the i-th key of `-model.th`. Its moments and its
step count (per parameter, or per group in newer apex) become ours; the
iteration is the largest `step` of the log's `type: train_loss` lines, as
the official `restore_log` takes it, and the run goes on from there: the lr
schedule (no new warmup, see the README), step numbers, TensorBoard axes
and checkpoint names. The data stream starts a new epoch 0.

`check_start` reads every file (memory-mapped: the tensors' bytes are not
read) and refuses, naming the file and the mismatch, a file of another
architecture (the listing of `model.official`), a missing file, an `-opt.th`
entry missing or of the wrong shape, or a log without a training line; the
run config's `validate_run` calls it before any process group. Every file is
read with `torch.load(weights_only=True)`: nothing in it can run code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from model import CheckpointMismatchError, ModelConfig
from model.official import check_official_state_dict, from_official_names, to_official_names

from .weights import FORMAT, UnsafeFileError, safe_load
from .zero_state import MOMENTS, AdamState, load_adam_state, load_whole_ema

OFFICIAL_SUFFIXES = ("-model.th", "-model-ema.th", "-opt.th", "-log.jsonl")


class StartError(ValueError):
    """A start file that cannot be used; raised before any process group."""


class StartSettings(Protocol):
    """What a start needs of the run config (`pipeline.config.RunConfig` is one)."""

    init: str
    init_ema: str
    init_official: str

    def model_config(self) -> ModelConfig: ...


@dataclass
class Started:
    """A new run's state, read from its files."""

    adam: AdamState
    ema: dict[str, torch.Tensor]
    step: int
    """The step the run continues from (0, or an official run's iteration)."""
    source: str


# -- reading files ---------------------------------------------------------------------------------


def _load(path: Path, mmap: bool):
    if not path.exists():
        raise StartError(f"{path} does not exist")
    try:
        return safe_load(path, mmap=mmap)
    except UnsafeFileError as err:
        raise StartError(str(err)) from None


def _weights_file(path: Path, model: ModelConfig, mmap: bool) -> dict[str, torch.Tensor]:
    """Our weights file or an official state dict, as our names -> tensors, checked against the model."""
    payload = _load(path, mmap)
    if isinstance(payload, Mapping) and payload.get("format") == FORMAT:
        state_dict = payload["state_dict"]
    elif isinstance(payload, Mapping) and all(isinstance(k, str) for k in payload) and \
            all(torch.is_tensor(v) for v in payload.values()):
        state_dict = payload
    else:
        raise StartError(f"{path} is neither one of our weights files ({FORMAT}) nor an official state dict "
                         "(parameter name -> tensor)")
    try:
        official = check_official_state_dict(to_official_names(state_dict), model)
    except CheckpointMismatchError as err:
        raise StartError(f"{path}: {err}") from None
    return dict(from_official_names(official))


def _official_optimizer(path: Path, shapes: dict[str, tuple[int, ...]], mmap: bool) -> tuple[dict, dict, int]:
    """(exp_avg, exp_avg_sq, step) of an official `-opt.th`: entry i is parameter i of `shapes` (in
    the model file's order)."""
    state_dict = _load(path, mmap)
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping) \
            or not isinstance(state_dict.get("param_groups"), list):
        raise StartError(f"{path} is not an optimizer state dict (state, param_groups)")
    groups = state_dict["param_groups"]
    ids = [i for group in groups for i in group.get("params", ())]
    names = list(shapes)
    if len(ids) != len(names):
        raise StartError(f"{path} holds the state of {len(ids)} parameters, the model has {len(names)}: it is "
                         "not the optimizer of this model")
    moments, steps, problems = {key: {} for key in MOMENTS}, set(), []
    for index, (i, name) in enumerate(zip(ids, names, strict=True)):
        slot = state_dict["state"].get(i)
        if not isinstance(slot, Mapping) or any(key not in slot for key in MOMENTS):
            problems.append(f"no {' / '.join(MOMENTS)} for parameter {index} ({name})")
            continue
        for key in MOMENTS:
            if tuple(slot[key].shape) != shapes[name]:
                problems.append(f"{key} of parameter {index} ({name}) is {tuple(slot[key].shape)}, the "
                                f"parameter {shapes[name]}")
            moments[key][name] = slot[key]
        if "step" in slot:
            steps.add(int(float(slot["step"])))
    if problems:
        listed = "; ".join(problems[:4]) + (f"; ... ({len(problems) - 4} more)" if len(problems) > 4 else "")
        raise StartError(f"{path} does not fit the model file's parameters: {listed}")
    if not steps:  # apex's FusedAdam of recent versions: one step count per group
        steps = {int(float(group["step"])) for group in groups if "step" in group}
    if len(steps) != 1:
        raise StartError(f"{path}: " + (f"the parameters' step counts differ ({sorted(steps)[:4]}), and ZeRO keeps "
                                        "one step count per partition" if steps else "no step count in it"))
    return moments["exp_avg"], moments["exp_avg_sq"], steps.pop()


def _official_iteration(path: Path) -> int:
    """The largest `step` of the log's `type: train_loss` lines (the official `restore_log`)."""
    if not path.exists():
        raise StartError(f"{path} does not exist")
    steps = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # (a line cut short by the run's end)
        if isinstance(record, dict) and record.get("type") == "train_loss" and isinstance(record.get("step"), int):
            steps.append(record["step"])
    if not steps:
        raise StartError(f"{path} has no line of type train_loss with a step: not the log of an official run")
    return max(steps)


def official_files(prefix: str) -> list[Path]:
    return [Path(prefix + suffix) for suffix in OFFICIAL_SUFFIXES]


def _read(settings: StartSettings, mmap: bool) -> Started | None:
    model = settings.model_config()
    if settings.init_official:
        files = official_files(settings.init_official)
        missing = [str(p) for p in files if not p.exists()]
        if missing:
            raise StartError(f"init_official={settings.init_official}: {', '.join(missing)} "
                             f"{'does' if len(missing) == 1 else 'do'} not exist (an official run is "
                             f"PREFIX{', PREFIX'.join(OFFICIAL_SUFFIXES)})")
        model_file, ema_file, opt_file, log_file = files
        weights = _weights_file(model_file, model, mmap)  # (in the file's order)
        ema = _weights_file(ema_file, model, mmap)
        # entry i of the optimizer is the i-th parameter of the model file
        order = {name: tuple(tensor.shape) for name, tensor in weights.items()}
        exp_avg, exp_avg_sq, adam_step = _official_optimizer(opt_file, order, mmap)
        step = _official_iteration(log_file)
        return Started(AdamState(weights, exp_avg, exp_avg_sq, adam_step), ema, step,
                       f"the official run {settings.init_official} at iteration {step} ({adam_step} Adam steps)")
    if not settings.init:
        return None
    path = Path(settings.init)
    ema_path = Path(settings.init_ema) if settings.init_ema else None
    if path.is_dir():  # an exported run: its weights, and its EMA unless init_ema gives one
        if not (path / "model.pt").is_file():
            raise StartError(f"init={path} is a folder without model.pt: not one that `vdvae export` wrote")
        ema_path = ema_path or (path / "model-ema.pt" if (path / "model-ema.pt").is_file() else None)
        path = path / "model.pt"
    weights = _weights_file(path, model, mmap)
    ema = _weights_file(ema_path, model, mmap) if ema_path else weights
    return Started(AdamState(weights), ema, 0, f"{path}" + (f" (EMA {ema_path})" if ema_path else ""))


def check_start(settings: StartSettings) -> None:
    """Read every start file's structure and refuse what does not fit (StartError naming the file)."""
    _read(settings, mmap=True)


def start_from(settings: StartSettings, engine, ema, rank: int) -> int:
    """Put a new run's state into the engine and the EMA (every rank its share); the step it starts at
    (0 without a start file)."""
    started = _read(settings, mmap=True)
    if started is None:
        return 0
    load_adam_state(engine, started.adam)
    load_whole_ema(ema, started.ema)
    if rank == 0:
        print(f"started from {started.source}", flush=True)
    return started.step
