"""The paper's update rule and EMA on a DeepSpeed engine, at every ZeRO stage.

Official `training_step`: `grad_norm = clip_grad_norm_(params, grad_clip)`
(the norm before clipping, over the whole model); the optimizer steps and
the EMA moves only when no rank saw a NaN loss and `grad_norm <
skip_threshold`; the lr schedule advances either way.

Under ZeRO 1-3 the gradients are partitioned, and DeepSpeed computes this
same global norm inside `engine.step()`, clips with the same formula
(`gradient_clipping` = grad_clip) and skips the step, cleanly, when the norm
is not finite. `UpdateRule` wraps the optimizer's norm so that a norm at or
above the threshold reads as not finite to DeepSpeed, after recording the
true one. A NaN loss on any rank makes the reduced gradients, hence the
norm, NaN on every rank, so every rank skips together. DeepSpeed takes
every such skip for an fp16 overflow and lowers its dynamic loss scale; for
a finite norm over the threshold nothing overflowed, so the rule puts the
scale (and its hysteresis) back. At stage 0 the gradients are whole on
every rank and the rule is applied directly.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UpdateStats:
    grad_norm: float
    """Pre-clip global gradient norm (NaN when a rank's loss or gradient was NaN)."""
    skipped: bool


class UpdateRule:
    def __init__(self, engine, grad_clip: float, skip_threshold: float):
        self.engine, self.grad_clip, self.skip_threshold = engine, grad_clip, skip_threshold
        self.stage = engine.zero_optimization_stage()
        self._norm: float | None = None
        optimizer = engine.optimizer
        if self.stage == 0:
            if engine.gradient_clipping() != 0.0:
                raise ValueError("at ZeRO stage 0 the update rule clips; set DeepSpeed gradient_clipping to 0")
        else:
            if engine.gradient_clipping() != grad_clip:
                raise ValueError(f"DeepSpeed gradient_clipping is {engine.gradient_clipping()}, the run's "
                                 f"grad_clip {grad_clip}: they must agree (DeepSpeed clips under ZeRO)")
            name = "scaled_global_norm" if self.stage in (1, 2) else "_get_norm_groups"
            original = getattr(optimizer, name)

            def norm_with_skip(*args, **kwargs):
                result = original(*args, **kwargs)
                groups = result if isinstance(result, list) else [result]
                total = math.sqrt(sum(float(g) ** 2 for g in groups)) if all(float(g) >= 0 for g in groups) \
                    else math.nan  # DeepSpeed reports an inf/NaN group as -1
                self._norm = total / float(getattr(optimizer, "loss_scale", 1.0))
                if not self._norm < self.skip_threshold:  # also NaN
                    inf = torch.tensor(math.inf, device=groups[0].device if torch.is_tensor(groups[0]) else "cpu")
                    return [inf] if isinstance(result, list) else inf
                return result

            setattr(optimizer, name, norm_with_skip)

    def step(self) -> UpdateStats | None:
        """`engine.step()` under the rule; stats at a gradient-accumulation boundary, else None."""
        engine = self.engine
        if not engine.is_gradient_accumulation_boundary():
            engine.step()
            return None
        if self.stage == 0:
            params = [p for p in engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
            skip = not norm < self.skip_threshold
            if skip:
                for p in params:  # AdamW leaves a parameter without gradient, and its state, untouched
                    p.grad = None
            else:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, torch.tensor(norm))
            engine.step()
            return UpdateStats(norm, skip)
        self._norm = None
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        saved = {k: getattr(scaler, k) for k in _SCALER_STATE if hasattr(scaler, k)}
        engine.step()
        skipped = not engine.was_step_applied()
        norm = math.nan if self._norm is None else self._norm
        if skipped and math.isfinite(norm):  # over the threshold, not an overflow: keep the fp16 loss scale
            for k, v in saved.items():
                setattr(scaler, k, v)
        return UpdateStats(norm, skipped)


_SCALER_STATE = ("cur_scale", "cur_hysteresis", "last_overflow_iter")
"""What DeepSpeed's DynamicLossScaler changes on an overflow (its iteration count advances either way)."""


class EMA:
    """Exponential moving average of the weights, in fp32, updated only on taken steps.

    Sharded like the optimizer's fp32 master weights: under ZeRO-3 each rank
    averages its partition of every parameter, under ZeRO 1-2 the fragments
    of the master copy it owns, so no rank holds a full copy and the average
    is of the fp32 master even in bf16 training. At stage 0 the parameters
    are whole on every rank and so is the average. `starts[i]` is where this
    rank's piece of parameter i begins in its flattened values.
    """

    def __init__(self, engine, rate: float):
        import torch.distributed as dist

        self.engine, self.rate = engine, rate
        stage = engine.zero_optimization_stage()
        self.layout = "partition" if stage == 3 else "fragments" if stage in (1, 2) else "full"
        self.sharded = self.layout != "full"
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        params = list(engine.module.named_parameters())
        self.names = [n for n, _ in params]
        self.starts = [self._start(p) for _, p in params]
        self.shadow = [self._source(p).detach().float().clone() for _, p in params]

    def _start(self, p: torch.nn.Parameter) -> int:
        if self.layout == "partition":
            return self.rank * math.ceil(p.ds_numel / self.world)
        if self.layout == "fragments":
            mapping = getattr(p, "_hp_mapping", None)
            return mapping.lp_fragment_address.start if mapping is not None else 0
        return 0

    def _source(self, p: torch.nn.Parameter) -> torch.Tensor:
        if self.layout == "partition":
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p)
        if self.layout == "fragments":
            mapping = getattr(p, "_hp_mapping", None)  # this rank's fragment of the fp32 master, if any
            return mapping.get_hp_fragment() if mapping is not None else torch.empty(0)
        return p.data

    @torch.no_grad()
    def update(self) -> None:
        for shadow, p in zip(self.shadow, self.engine.module.parameters(), strict=True):
            if shadow.numel():
                shadow.mul_(self.rate).add_(self._source(p).float().view_as(shadow), alpha=1 - self.rate)

    def _averaged(self, i: int, p: torch.nn.Parameter) -> torch.Tensor:
        """The whole average of a ZeRO 1-2 parameter: the ranks' fragments summed into place."""
        import torch.distributed as dist

        flat = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        n = self.shadow[i].numel()
        flat[self.starts[i]:self.starts[i] + n] = self.shadow[i].view(-1)
        dist.all_reduce(flat)
        return flat

    @contextmanager
    def swapped(self):
        """Run the model with the averaged weights inside the block (evaluation, sampling)."""
        saved = []
        params = list(self.engine.module.parameters())
        with torch.no_grad():
            for i, p in enumerate(params):
                if self.layout == "partition":  # what the forward pass gathers: this rank's partition
                    target, values = p.ds_tensor.view(-1), self.shadow[i].view(-1)
                elif self.layout == "fragments":
                    target, values = p.data.view(-1), self._averaged(i, p)
                else:
                    target, values = p.data.view(-1), self.shadow[i].view(-1)
                n = values.numel()
                saved.append(target[:n].clone())
                target[:n].copy_(values)
        try:
            yield
        finally:
            with torch.no_grad():
                for backup, p in zip(saved, params, strict=True):
                    target = p.ds_tensor if self.layout == "partition" else p.data
                    target.view(-1)[:backup.numel()].copy_(backup)

    def state_dict(self) -> dict:
        return {"rate": self.rate, "layout": self.layout, "sharded": self.sharded, "names": self.names,
                "starts": self.starts, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or state.get("layout") != self.layout:
            raise ValueError("EMA state made for another model or ZeRO layout")
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            if shadow.shape != saved.shape:
                raise ValueError("EMA state made with another world size or partitioning")
            shadow.copy_(saved)

    def numel(self) -> int:
        return sum(s.numel() for s in self.shadow)
