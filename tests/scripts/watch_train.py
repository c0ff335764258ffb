"""Run `vdvae train` in this process with its collectives and host reads watched; write what was seen.

    python tests/scripts/watch_train.py REPORT.json train --preset ... key=value ...

Every torch.distributed collective is wrapped: the devices of its tensors and whether it ran on the
default group or another (the gloo control group) are recorded. Every way of reading a tensor's
value back to the host (`item`, `float`, `bool`, `int`, `tolist`, `numpy`, `cpu`, `.to("cpu")`) is
wrapped too: one made by this project's code inside `Trainer.run`, outside the trainer's logging,
evaluation, sampling and checkpointing and outside the update rule's step, is recorded with its stack
(on a GPU each would make the step wait for the device; DeepSpeed's own reads are DeepSpeed's). tests/test_gpu_ready.py reads the report.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Where a host read is part of the design (see pipeline/train.py): the trainer's periodic work, and the
# update rule, whose skip decision is made on the gradient norm on the host.
ALLOWED = {"_log_window", "_any_signalled", "read", "_evaluate", "_write_samples", "save", "resume", "__init__", "step"}
ALLOWED_FILES = ("pipeline/train.py", "pipeline/update.py", "pipeline/checkpoint.py")

collectives: list[dict] = []
host_reads: list[dict] = []
state = {"in_run": False, "step": 0}


def _ours_and_not_allowed() -> bool:
    """Whether the innermost caller outside torch is this project's code (not DeepSpeed's, whose
    ZeRO-3 hooks read back values of their own), in no frame where reading back is by design."""
    frames = traceback.extract_stack()[:-2]
    for frame in frames:
        if frame.filename.endswith(ALLOWED_FILES) and frame.name in ALLOWED:
            return False
    for frame in reversed(frames):
        if "/torch/" in frame.filename:
            continue
        return frame.filename.startswith(str(ROOT)) and "/site-packages/" not in frame.filename \
            and not frame.filename.endswith("watch_train.py")
    return False


def _watch_read(name: str, original):
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        if state["in_run"] and _ours_and_not_allowed() and not (name == "to" and not _to_cpu(self, args, kwargs)):
            stack = [f"{f.filename.split('/site-packages/')[-1].replace(str(ROOT) + '/', '')}:{f.lineno} {f.name}"
                     for f in traceback.extract_stack()[:-1]][-8:]
            host_reads.append({"call": name, "step": state["step"], "stack": stack})
        return original(self, *args, **kwargs)
    return wrapper


def _to_cpu(tensor, args, kwargs) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    return tensor.device.type != "cpu" and target is not None and torch.device(target).type == "cpu" \
        if isinstance(target, (str, torch.device)) else False


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _watch_collective(name: str, original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        group = kwargs.get("group")
        devices = sorted({str(t.device) for t in _tensors(list(args) + list(kwargs.values()))})
        collectives.append({"name": name, "devices": devices, "default_group": group in (None, dist.group.WORLD),
                            "step": state["step"], "in_run": state["in_run"]})
        return original(*args, **kwargs)
    return wrapper


def main() -> int:
    report, argv = Path(sys.argv[1]), sys.argv[2:]
    for name in ("item", "__float__", "__bool__", "__int__", "tolist", "numpy", "cpu", "to"):
        setattr(torch.Tensor, name, _watch_read(name, getattr(torch.Tensor, name)))
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                 "reduce_scatter_tensor", "reduce", "all_to_all_single", "gather", "scatter"):
        setattr(dist, name, _watch_collective(name, getattr(dist, name)))

    from launch.cli import main as cli_main
    from pipeline import train as train_module

    trainer_run, train_step = train_module.Trainer.run, train_module.Trainer.train_step

    def run(self, *args, **kwargs):
        state["in_run"] = True
        try:
            return trainer_run(self, *args, **kwargs)
        finally:
            state["in_run"] = False
            report.write_text(json.dumps({"device": str(self.device), "collectives": collectives,
                                          "host_reads": host_reads, "steps": self.step}))

    def step(self, batch):
        state["step"] = self.step + 1
        return train_step(self, batch)

    train_module.Trainer.run, train_module.Trainer.train_step = run, step
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
