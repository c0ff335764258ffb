"""A run resumed on another number of ranks, at ZeRO 0, 2 and 3: 2 ranks -> 1 and 1 -> 2.

One chain of watched `vdvae train` jobs per stage (tests/probe.py) serves every test here, in one
run folder: A, 2 ranks x 4 from a start file (ZeRO 0: `init=` weights with `init_ema=`; ZeRO 2, 3:
`init_official=`, so A is also the 2-rank continuation of an official run) for 3 steps; B, 1 rank
x 8 (the global batch kept) for 10 steps from A's checkpoint; C, 2 ranks x 4 for 10 more from B's.
The global batch halved: at ZeRO 3, D, 1 rank x 4 from a copy of A's checkpoint; at ZeRO 0, E, 2
ranks x 2 from a copy of B's. B and C are given the start file too, as a requeued job would be:
the checkpoint wins. The uninterrupted run is the same job on 2 ranks in plain PyTorch, rank by
rank (`plain_pytorch`, A's equal to fp32 reduction tolerance), and the stream's global batches.
"""

import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import TINY
from model import VDVAE, official_state_dict
from pipeline.weights import save_weights
from probe import (Probe, Reference, global_batches, max_difference, official_run, plain_pytorch, prepared_data,
                   probe, same)

A, B, C = 3, 13, 23  # the steps (after the start's) at which A, B and C end
HALVED_STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_data(tmp_path_factory.mktemp("resize-data"))


@pytest.fixture(scope="module")
def starts(data, tmp_path_factory):
    """Start files: an official run, and our weights file with an official-layout EMA file."""
    tmp = tmp_path_factory.mktemp("starts")
    official = official_run(tmp / "tiny-iter-7", data)
    torch.manual_seed(4)
    model, ema = VDVAE(TINY), VDVAE(TINY)
    save_weights(model, tmp / "weights.pt")
    torch.save(official_state_dict(ema), tmp / "ema-model-ema.th")
    return {"official": ([f"init_official={tmp / 'tiny-iter-7'}"], official),
            "weights": ([f"init={tmp / 'weights.pt'}", f"init_ema={tmp / 'ema-model-ema.th'}"],
                        {"weights": model.state_dict(), "ema": ema.state_dict(), "step": 0})}


@dataclass
class Chain:
    stage: int
    first: int
    """The start's step (the steps of A are first + 1, ...)."""
    jobs: dict[str, Probe]
    halved: tuple[str, int, str] | None
    """(the job, its batch_per_gpu x ranks, the job it resumed from) of the halved global batch."""
    reference: Reference
    start: dict
    global_batches: list[list[str]]
    """The uninterrupted run's, from its stream."""


@pytest.fixture(scope="module", params=[0, 2, 3], ids=lambda stage: f"zero{stage}")
def chain(request, data, starts, tmp_path_factory) -> Chain:
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"chain-zero{stage}")
    settings, start = starts["weights" if stage == 0 else "official"]
    first, run = start["step"], tmp / "run"
    common = (f"zero_stage={stage}", *settings)
    jobs = {"A": probe(data, run, tmp / "A", 2, *common, f"max_steps={first + A}")}
    if stage in (2, 3):
        shutil.copytree(run, tmp / "run-D")
    jobs["B"] = probe(data, run, tmp / "B", 1, *common, "batch_per_gpu=8", f"max_steps={first + B}")
    if stage == 0:
        shutil.copytree(run, tmp / "run-E")
    jobs["C"] = probe(data, run, tmp / "C", 2, *common, f"max_steps={first + C}")
    halved = None
    if stage in (2, 3):  # 2 ranks x 4 -> 1 rank x 4
        jobs["D"] = probe(data, tmp / "run-D", tmp / "D", 1, *common, f"max_steps={first + A + HALVED_STEPS}")
        halved = ("D", 4, "A")
    if stage == 0:  # 1 rank x 8 -> 2 ranks x 2
        jobs["E"] = probe(data, tmp / "run-E", tmp / "E", 2, *common, "batch_per_gpu=2",
                          f"max_steps={first + B + HALVED_STEPS}")
        halved = ("E", 4, "B")
    reference = plain_pytorch(data, start, world=2, steps=C, keep=(first + A,))
    return Chain(stage, first, jobs, halved, reference, start, global_batches(data, C))


def test_the_state_right_after_a_resume_is_the_saved_one_exactly(chain):
    """Weights, Adam moments, step counts and EMA, whole, as the job that saved them had them."""
    jobs, first = chain.jobs, chain.first
    resumes = [("A", first + A, "B"), ("B", first + B, "C")]
    if chain.halved:
        resumes.append((chain.halved[2], first + (A if chain.halved[2] == "A" else B), chain.halved[0]))
    for saver, step, resumer in resumes:
        saved, resumed = jobs[saver].saved(step), jobs[resumer].start
        assert resumed["step"] == step
        for key in ("weights", "exp_avg", "exp_avg_sq", "ema"):
            assert same(saved[key], resumed[key]), (saver, resumer, key)
        assert len(set(saved["steps"])) == 1 and set(resumed["steps"]) == set(saved["steps"]), (saver, resumer)
        assert set(saved["steps"]) == {step - first + chain.start.get("adam_step", 0)}  # no update was skipped


def test_the_start_on_two_ranks_is_plain_pytorch_to_fp32_tolerance(chain):
    """A: the next steps' losses and the weights, moments and EMA after them (ZeRO 2 and 3: an
    official run continued; ZeRO 0: a start from weights, the EMA from its own file)."""
    a, first = chain.jobs["A"], chain.first
    start = a.start
    assert start["step"] == first and same(start["weights"], chain.start["weights"])
    assert same(start["ema"], chain.start["ema"])
    if "exp_avg" in chain.start:
        assert same(start["exp_avg"], chain.start["exp_avg"]) and same(start["exp_avg_sq"], chain.start["exp_avg_sq"])
    else:
        assert start["exp_avg"] is None and start["steps"] == []  # a fresh optimizer
    steps = range(first + 1, first + A + 1)  # (the run folder's log goes on with B's and C's steps)
    losses = {s: a.losses[s] for s in steps}
    assert losses == pytest.approx({s: chain.reference.losses[s] for s in steps}, rel=1e-5)
    saved, expected = a.saved(first + A), chain.reference.states[first + A]
    for key, tolerance in (("weights", 1e-5), ("exp_avg", 1e-6), ("exp_avg_sq", 1e-8), ("ema", 1e-5)):
        assert max_difference(saved[key], expected[key]) < tolerance, key


def test_with_the_global_batch_kept_every_global_batch_is_the_uninterrupted_runs(chain):
    """The samples of each step, 2 ranks x 4, then 1 x 8, then 2 x 4: the stream's global batches."""
    got = [sorted(batch) for name in "ABC" for batch in chain.jobs[name].keys]
    assert got == [sorted(batch) for batch in chain.global_batches]
    assert [sorted(chain.reference.keys[s]) for s in sorted(chain.reference.keys)] == got


def test_the_mean_loss_of_the_next_10_steps_is_within_1_percent_of_the_uninterrupted_runs(chain):
    first = chain.first
    for name, lo, hi in (("B", A, B), ("C", B, C)):
        losses = chain.jobs[name].losses
        steps = range(first + lo + 1, first + hi + 1)
        ours, theirs = np.mean([losses[s] for s in steps]), np.mean([chain.reference.losses[s] for s in steps])
        assert abs(ours - theirs) < 0.01 * abs(theirs), (name, ours, theirs)


def test_with_the_global_batch_halved_every_sample_of_the_epoch_is_seen_once(chain):
    """From the cursor on, the rest of the epoch in global batches of 4, each sample once, none seen
    before in the epoch; then the next epoch."""
    name, size, source = chain.halved  # ZeRO 2 and 3: 2 -> 1 ranks; ZeRO 0: 1 -> 2
    before_steps = A if source == "A" else B
    epoch_steps = 64 // 8  # the global batches of 8 of an epoch of 64 samples
    done = before_steps % epoch_steps  # steps of the current epoch before the change
    earlier = [batch for job in ("A", "B")[: 1 if source == "A" else 2] for batch in chain.jobs[job].keys]
    seen = {k for batch in earlier[before_steps - done:before_steps] for k in batch}
    after = chain.jobs[name].keys
    left = (64 - 8 * done) // size
    rest = [k for batch in after[:left] for k in batch]
    assert all(len(batch) == size for batch in after)
    assert len(rest) == len(set(rest)) == 64 - 8 * done and not seen & set(rest)
    assert len(seen | set(rest)) == 64
    next_epoch = [k for batch in after[left:] for k in batch]
    assert len(next_epoch) == len(set(next_epoch)) > 0


@pytest.mark.parametrize("stage", [1])  # (ZeRO-3 bf16 reads as fp32 does: the fp32 partitions beside the bf16)
def test_a_bf16_run_resumes_on_another_world_size_with_its_state_exact(data, tmp_path, stage):
    """precision=bf16 at ZeRO-1, DeepSpeed's BF16_Optimizer and its `bf16_` files: 2 ranks x 4 for
    2 steps, then 1 rank x 8. The fp32 weights, moments, step counts and EMA right after the resume
    are the saved ones, and it trains on."""
    run = tmp_path / "run"
    common = (f"zero_stage={stage}", "precision=bf16")
    saver = probe(data, run, tmp_path / "A", 2, *common, "max_steps=2")
    resumer = probe(data, run, tmp_path / "B", 1, *common, "batch_per_gpu=8", "max_steps=3")
    written = {p.name for p in (run / "checkpoints" / "global_step2").iterdir()}
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in written  # the bf16 runs' file names
    saved, resumed = saver.saved(2), resumer.start
    assert resumed["step"] == 2 and set(resumed["steps"]) == set(saved["steps"]) == {2}
    for key in ("weights", "exp_avg", "exp_avg_sq", "ema"):
        assert same(saved[key], resumed[key]), key
    assert max(resumer.losses) == 3 and np.isfinite(resumer.losses[3])
