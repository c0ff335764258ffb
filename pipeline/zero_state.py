"""Whole fp32 weights, Adam moments and step counts into and out of a DeepSpeed engine, at any ZeRO stage.

`AdamState` is an optimizer's state, whole and world-free: by parameter
name the fp32 weights and Adam's moments (`exp_avg`, `exp_avg_sq`), and the
number of optimizer steps taken (Adam's bias correction). It is what
starting from weights (`init.py`), continuing an official run and resuming
on another number of ranks (`checkpoint.py`) have in common:
`load_adam_state` puts it into an engine right after `deepspeed.initialize`,
each rank taking its own share:

- stage 0: the parameters, and the optimizer's per-parameter state;
- stages 1-2: the (low-precision) parameters, whole on every rank, and this
  rank's fragment of each in the flat fp32 partition that DeepSpeed's ZeRO
  optimizer steps (`_hp_mapping`), the moments at the same places of that
  partition's optimizer state;
- stage 3: each parameter's partition (`ds_tensor`, the first
  `ceil(n / world)` values on rank 0, ...), its fp32 master and moments at
  the partition's place in the sub-group's flat buffers (`grad_position`).

`gather_adam_state` is the way back (a collective). `load_whole_ema` and
`gather_whole_ema` do the same for the EMA, sharded like the fp32 master.

DeepSpeed internals used (pinned in pyproject.toml): a ZeRO 1-2 parameter's
`_hp_mapping` (`lp_fragment_address`, `hp_fragment_address`,
`param_group_index`) and the optimizer's `single_partition_of_fp32_groups`;
stage 3's `fp32_partitioned_groups_flat`, `grad_position`, `get_param_id`,
`_get_param_partition_rank`, a parameter's `ds_tensor` and `ds_numel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

# DeepSpeed is imported where an engine's state is gathered, not here: the run config's checks before
# any process group read start files into an AdamState, and must not wait seconds for deepspeed.

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class AdamState:
    """An Adam(W) state, whole: fp32 tensors by parameter name, and the optimizer steps taken."""

    weights: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor] | None = None
    """None (with `exp_avg_sq`): a fresh optimizer, its moments zero until its first step."""
    exp_avg_sq: dict[str, torch.Tensor] | None = None
    step: int = 0

    @property
    def fresh(self) -> bool:
        return self.exp_avg is None


def check_fits(state: AdamState, model: torch.nn.Module, where: str) -> None:
    """Refuse a state whose names or shapes are not the model's parameters', listing what differs."""
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    problems = []
    for kind, tensors in (("weights", state.weights), ("exp_avg", state.exp_avg), ("exp_avg_sq", state.exp_avg_sq)):
        if tensors is None:
            continue
        missing, extra = [n for n in shapes if n not in tensors], [n for n in tensors if n not in shapes]
        wrong = [f"{n}: {tuple(tensors[n].shape)} vs model {shapes[n]}" for n in shapes
                 if n in tensors and tuple(tensors[n].shape) != shapes[n]]
        for label, names in (("missing", missing), ("unexpected", extra), ("of the wrong shape", wrong)):
            if names:
                listed = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
                problems.append(f"{kind}: {len(names)} {label} ({listed})")
    if problems:
        raise ValueError(f"{where} does not fit this model: " + "; ".join(problems))


# -- into the engine -----------------------------------------------------------------------------


def _base_optimizer(engine):
    """The torch (or DeepSpeed fused) Adam that steps: ZeRO's inner optimizer, or the engine's own."""
    stage = engine.zero_optimization_stage()
    optimizer = engine.optimizer
    if stage == 0:
        return optimizer
    if type(optimizer).__name__ not in ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3"):
        raise ValueError(f"cannot place optimizer state into DeepSpeed's {type(optimizer).__name__} "
                         "(ZeRO's own optimizers only)")
    if getattr(optimizer, "swap_optimizer", False):
        raise ValueError("cannot place optimizer state into a ZeRO-3 optimizer swapped to NVMe")
    return optimizer.optimizer


def _step_value(base, device: torch.device, step: int):
    """`step` as the optimizer keeps it: torch's Adam(W) a float32 tensor (on the device only when
    capturable or fused), DeepSpeed's fused Adam an int."""
    if type(base).__module__.startswith("torch.optim"):
        on_device = base.defaults.get("capturable") or base.defaults.get("fused")
        return torch.tensor(float(step), dtype=torch.float32, device=device if on_device else "cpu")
    return int(step)


def _adam_slot(base, tensor: torch.Tensor, step: int) -> dict:
    """The optimizer state of `tensor` (a parameter, or a flat fp32 partition), its moments zero
    where it has none yet (no step taken), its step count set to `step`."""
    slot = base.state[tensor]
    for key in MOMENTS:
        if key not in slot:
            slot[key] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
    if torch.is_tensor(slot.get("step")):
        slot["step"].fill_(float(step))
    else:
        slot["step"] = _step_value(base, tensor.device, step)
    return slot


def _padded_piece(full: torch.Tensor, size: int, index: int) -> torch.Tensor:
    """Piece `index` of `size` values of a flat tensor, zeros beyond its end (ZeRO-3's padding)."""
    piece = torch.zeros(size, dtype=torch.float32)
    values = full[index * size:(index + 1) * size]
    piece[:values.numel()] = values
    return piece


@torch.no_grad()
def load_adam_state(engine, state: AdamState) -> None:
    """Put a whole state into the engine, every rank its share (not a collective). A fresh state
    (no moments) sets the weights and leaves the optimizer as it is: it starts at its first step."""
    check_fits(state, engine.module, "the state to load")
    stage, base = engine.zero_optimization_stage(), _base_optimizer(engine)
    zero = engine.optimizer
    for name, p in engine.module.named_parameters():
        full = state.weights[name].detach().reshape(-1).float().cpu()
        moments = {} if state.fresh else {key: getattr(state, key)[name].detach().reshape(-1).float().cpu()
                                          for key in MOMENTS}
        if stage == 0:
            p.data.copy_(full.view_as(p))
            if moments:
                slot = _adam_slot(base, p, state.step)
                for key, values in moments.items():
                    slot[key].copy_(values.view_as(p))
        elif stage in (1, 2):
            p.data.copy_(full.view_as(p))  # the low-precision parameters are whole on every rank
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # none of this parameter lies in this rank's partition
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            flat = zero.single_partition_of_fp32_groups[mapping.param_group_index]
            flat.narrow(0, hp.start, hp.numel).copy_(full.narrow(0, lp.start, lp.numel))
            if moments:
                slot = _adam_slot(base, flat, state.step)
                for key, values in moments.items():
                    slot[key].narrow(0, hp.start, hp.numel).copy_(values.narrow(0, lp.start, lp.numel))
        else:
            size, index = p.ds_tensor.ds_numel, zero._get_param_partition_rank(p)
            p.ds_tensor.data.copy_(_padded_piece(full, size, index).view_as(p.ds_tensor))
            if p.data.numel() == p.ds_numel:  # a parameter kept whole (persistent), too
                p.data.copy_(full.view_as(p.data))
            group, offset, count = zero.grad_position[zero.get_param_id(p)]
            flat = zero.fp32_partitioned_groups_flat[group]  # (the partition itself when shared: engine.py)
            flat.narrow(0, offset, count).copy_(_padded_piece(full, size, index)[:count])
            if moments:
                slot = _adam_slot(base, flat, state.step)
                for key, values in moments.items():
                    slot[key].narrow(0, offset, count).copy_(_padded_piece(values, size, index)[:count])


# -- out of the engine ---------------------------------------------------------------------------


def _steps(base) -> list[int]:
    return [int(float(slot["step"])) for slot in base.state.values() if "step" in slot]


@torch.no_grad()
def gather_adam_state(engine) -> tuple[AdamState, list[int]]:
    """The engine's state, whole, on every rank (a collective under ZeRO 1-3), and the step count of
    every optimizer-state entry on every rank. Moments are None before the optimizer's first step."""
    from deepspeed.utils import safe_get_full_fp32_param  # (here, not at the top: see the note there)

    stage, base = engine.zero_optimization_stage(), _base_optimizer(engine)
    zero = engine.optimizer
    named = list(engine.module.named_parameters())
    has_state = bool(base.state)
    weights, moments = {}, {key: {} for key in MOMENTS}
    for name, p in named:
        shape = p.ds_shape if stage == 3 else p.shape
        weights[name] = (p.detach().float().clone() if stage == 0 else safe_get_full_fp32_param(p).float()
                         .reshape(shape).cpu().clone())
        for key in MOMENTS if has_state else ():
            if stage == 0:
                moments[key][name] = base.state[p][key].detach().float().clone()
                continue
            n = math.prod(shape)
            if stage == 3:
                size, index = p.ds_tensor.ds_numel, zero._get_param_partition_rank(p)
                group, offset, count = zero.grad_position[zero.get_param_id(p)]
                flat = zero.fp32_partitioned_groups_flat[group]
                buffer = torch.zeros(size * dist.get_world_size(), dtype=torch.float32, device=flat.device)
                buffer[index * size:index * size + count] = base.state[flat][key].narrow(0, offset, count)
            else:
                buffer = torch.zeros(n, dtype=torch.float32, device=p.device)
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is not None:
                    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                    flat = zero.single_partition_of_fp32_groups[mapping.param_group_index]
                    buffer[lp.start:lp.start + lp.numel] = base.state[flat][key].narrow(0, hp.start, hp.numel)
            dist.all_reduce(buffer)  # each value lies on exactly one rank
            moments[key][name] = buffer[:n].reshape(shape).cpu()
    steps = _steps(base)
    if stage > 0:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, steps)
        steps = [s for mine in everyone for s in mine]
    state = AdamState(weights, moments["exp_avg"] if has_state else None,
                      moments["exp_avg_sq"] if has_state else None, max(steps, default=0))
    return state, steps


# -- the EMA, sharded like the fp32 master ---------------------------------------------------------


@torch.no_grad()
def load_whole_ema(ema, whole: dict[str, torch.Tensor]) -> None:
    """Set the EMA (`pipeline.ema.EMA`) from whole tensors by name: each rank its piece of each."""
    missing = [name for name in ema.names if name not in whole]
    if missing:
        raise ValueError(f"the EMA to load lacks {len(missing)} parameters ({', '.join(missing[:4])})")
    for shadow, start, name in zip(ema.shadow, ema.starts, ema.names, strict=True):
        flat = whole[name].detach().reshape(-1).float().cpu()
        piece = torch.zeros(shadow.numel())
        values = flat[start:start + shadow.numel()]
        piece[:values.numel()] = values  # (ZeRO-3's padding beyond the end stays zero)
        shadow.copy_(piece.view_as(shadow))


@torch.no_grad()
def gather_whole_ema(ema) -> dict[str, torch.Tensor]:
    """The EMA, whole, by name, on every rank (a collective when it is sharded)."""
    params = dict(ema.engine.module.named_parameters())
    whole = {}
    for shadow, start, name in zip(ema.shadow, ema.starts, ema.names, strict=True):
        p = params[name]
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
        if not ema.sharded:
            whole[name] = shadow.detach().reshape(shape).cpu().clone()
            continue
        n = math.prod(shape)
        flat = torch.zeros(n, dtype=torch.float32, device=shadow.device)
        k = max(0, min(shadow.numel(), n - start))
        flat[start:start + k] = shadow.reshape(-1)[:k]
        dist.all_reduce(flat)  # the ranks' pieces are disjoint
        whole[name] = flat.reshape(shape).cpu()
    return whole
