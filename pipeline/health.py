"""Run health: alarms for the quiet ways a VDVAE run goes wrong.

A skip streak: the paper's rule skips an update whose gradient norm is not
below `skip_threshold`. In a healthy run skips are isolated (the official
runs skip a few updates per thousand); a long streak means the model's
gradient norms now sit above the threshold, and the job looks alive while
it learns nothing (openai/vdvae issue 25). A run of NaN losses: the
weights or the data have gone bad. Each is reported loudly when it starts
and when it ends; past `max_consecutive_skips` the job checkpoints and
stops with STUCK_EXIT_CODE, which the batch script does not requeue (a
requeue would only repeat it), naming the cause and the settings to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STUCK_EXIT_CODE = 86
"""Exit status of a run stopped by an alarm: not a preemption, so the batch script does not requeue it."""
STREAK_REPORTED_AFTER = 10
"""Consecutive skips before a streak is reported as started (isolated skips are normal)."""


class Stuck(Exception):
    """Raised (on every rank together) after the checkpoint of a run stopped by an alarm."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


@dataclass
class Alarms:
    """Tracks the skip streak and the run of NaN losses; `update` returns what to report."""

    max_consecutive_skips: int
    skip_threshold: float
    grad_clip: float
    lr: float
    skips: int = 0
    nans: int = 0
    norms: list[float] = field(default_factory=list)
    """The gradient norms of the current streak (for the message)."""

    def update(self, step: int, skipped: bool, nan_loss: bool, grad_norm: float) -> tuple[list[str], str | None]:
        """(messages to report now, the reason to stop or None) after `step`."""
        messages = []
        if nan_loss and self.nans == 0:
            messages.append(f"step {step}: NaN loss on a rank: the update is skipped; NaN losses in a row are "
                            "counted until a finite loss returns")
        elif not nan_loss and self.nans:
            messages.append(f"step {step}: the run of {self.nans} NaN losses ended")
        self.nans = self.nans + 1 if nan_loss else 0
        if skipped:
            self.skips += 1
            self.norms.append(grad_norm)
            if self.skips == min(STREAK_REPORTED_AFTER, self.max_consecutive_skips or STREAK_REPORTED_AFTER):
                messages.append(f"step {step}: {self.skips} updates skipped in a row ({self._why()}); the job "
                                f"stops after {self.max_consecutive_skips} (max_consecutive_skips)"
                                if self.max_consecutive_skips else
                                f"step {step}: {self.skips} updates skipped in a row ({self._why()})")
        else:
            if self.skips >= min(STREAK_REPORTED_AFTER, self.max_consecutive_skips or STREAK_REPORTED_AFTER):
                messages.append(f"step {step}: the skip streak ended after {self.skips} skipped updates")
            self.skips, self.norms = 0, []
        if self.max_consecutive_skips and self.skips >= self.max_consecutive_skips:
            return messages, self._stop_message(step)
        return messages, None

    def _why(self) -> str:
        finite = [n for n in self.norms if math.isfinite(n)]
        if self.nans or not finite:
            return "NaN losses or gradients"
        return f"gradient norms {min(finite):.4g}-{max(finite):.4g}, not below skip_threshold {self.skip_threshold:g}"

    def _stop_message(self, step: int) -> str:
        if self.nans >= self.skips:
            fix = (f"the loss has been NaN for {self.nans} steps: lower lr (now {self.lr:g}) or grad_clip (now "
                   f"{self.grad_clip:g}), use bf16 or fp32 instead of fp16, or resume from an earlier checkpoint")
        else:
            fix = (f"raise skip_threshold (now {self.skip_threshold:g}) above the norms the model has now, or lower "
                   f"lr (now {self.lr:g}); grad_clip (now {self.grad_clip:g}) clips the updates that are taken")
        return (f"stopped at step {step}: {self.skips} consecutive updates skipped ({self._why()}), "
                f"max_consecutive_skips={self.max_consecutive_skips}. To go on: {fix}; then start the same run "
                "again with those settings (it resumes from this checkpoint)")
