"""One rank of a `vdvae train` job, watched; run under N ranks by tests/probe.py (gloo, CPU).

Usage: PROBE_OUT=OUT train_probe.py --preset ... --data ... --run-dir ... key=value ...

Trains as `pipeline.train.train` does, and rank 0 writes into OUT:
- start.pt: the whole state right after the start (a resume, a start from weights, or none):
  weights, Adam moments, every optimizer-state entry's step count on every rank, the EMA, the step;
- saved<step>.pt: the same at each checkpoint the run saves;
- keys.json: for each step, its global batch: every rank's sample keys, in rank order.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch.commands.train import run_config, train_arguments  # noqa: E402
from pipeline.config import validate_run  # noqa: E402
from pipeline.distributed import detect_ranks  # noqa: E402
from pipeline.train import Trainer  # noqa: E402
from pipeline.zero_state import gather_adam_state, gather_whole_ema  # noqa: E402

parser = argparse.ArgumentParser()
train_arguments(parser)
out = Path(os.environ["PROBE_OUT"])
config = run_config(parser.parse_args())
validate_run(config, detect_ranks().world, on_gpu=False)
trainer = Trainer(config)


def dump(name: str) -> None:
    adam, steps = gather_adam_state(trainer.engine)  # (collectives: every rank)
    ema = gather_whole_ema(trainer.ema)
    if trainer.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"step": trainer.step, "weights": adam.weights, "exp_avg": adam.exp_avg,
                    "exp_avg_sq": adam.exp_avg_sq, "steps": steps, "ema": ema}, out / name)


dump("start.pt")
keys: list[list[str]] = []
train_step, save = trainer.train_step, trainer.checkpointer.save


def watched_step(batch):
    keys.append(list(batch.keys))
    return train_step(batch)


def watched_save(step: int, counters: dict):
    folder = save(step, counters)
    dump(f"saved{step}.pt")
    return folder


trainer.train_step, trainer.checkpointer.save = watched_step, watched_save
done = False
try:
    trainer.run()
    everyone = [None] * trainer.world
    dist.all_gather_object(everyone, keys)
    if trainer.rank == 0:
        (out / "keys.json").write_text(json.dumps([[k for mine in everyone for k in mine[i]]
                                                   for i in range(len(keys))]))
    done = True
finally:
    trainer.close(together=done)
