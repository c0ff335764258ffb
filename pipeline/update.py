"""The paper's update rule on a DeepSpeed engine, at every ZeRO stage (the EMA is `ema.py`).

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


# DeepSpeed internals this rule relies on (pinned in pyproject.toml): the ZeRO optimizers'
# `scaled_global_norm` (stages 1-2) and `_get_norm_groups` (stage 3), `loss_scaler` and its fields.
_SCALER_STATE = ("cur_scale", "cur_hysteresis", "last_overflow_iter")
"""What DeepSpeed's DynamicLossScaler changes on an overflow (its iteration count advances either way)."""
