"""Exponential moving average of the weights, sharded as ZeRO shards the fp32 master.

DeepSpeed internals used (pinned in pyproject.toml): a ZeRO-3 parameter's
`ds_numel` and `ds_tensor` (its partition), a ZeRO 1-2 parameter's
`_hp_mapping` (where this rank's fragment of the fp32 master lies).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_fp32_param


class EMA:
    """Exponential moving average of the weights, in fp32, updated only on taken steps.

    Sharded like the optimizer's fp32 master weights: under ZeRO-3 each rank
    averages its partition of every parameter, under ZeRO 1-2 the fragments
    of the master copy it owns, so no rank holds a full copy and the average
    is of the fp32 master even in bf16 training. At stage 0 the parameters
    are whole on every rank and so is the average. `starts[i]` is where this
    rank's piece of parameter i begins in its flattened values.
    """

    def __init__(self, engine, rate: float, rank: int = 0, world: int = 1):
        self.engine, self.rate = engine, rate
        stage = engine.zero_optimization_stage()
        self.layout = "partition" if stage == 3 else "fragments" if stage in (1, 2) else "full"
        self.sharded = self.layout != "full"
        self.rank, self.world = rank, world
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
            return safe_get_local_fp32_param(p)
        if self.layout == "fragments":
            mapping = getattr(p, "_hp_mapping", None)  # this rank's fragment of the fp32 master, if any
            return mapping.get_hp_fragment() if mapping is not None else torch.empty(0)
        return p.data

    @torch.no_grad()
    def update(self) -> None:
        """shadow = rate * shadow + (1 - rate) * weights, for every parameter in two foreach kernels
        (one launch each on a GPU, not two per parameter); the same arithmetic as per tensor."""
        pairs = [(shadow, self._source(p).float().view_as(shadow))
                 for shadow, p in zip(self.shadow, self.engine.module.parameters(), strict=True) if shadow.numel()]
        if pairs:
            shadows, sources = map(list, zip(*pairs, strict=True))
            torch._foreach_mul_(shadows, self.rate)
            torch._foreach_add_(shadows, sources, alpha=1 - self.rate)

    def _averaged(self, i: int, p: torch.nn.Parameter) -> torch.Tensor:
        """The whole average of a ZeRO 1-2 parameter: the ranks' fragments summed into place."""
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
