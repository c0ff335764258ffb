"""A new run from weights (`init=`, `init_ema=`) and the continuation of an official run (`init_official=`).

The start files are checked in this process, before any process group (`validate_run`); the runs
are watched `vdvae train` jobs (tests/probe.py) compared with the same training in plain PyTorch.
The 2-rank continuations at ZeRO 2 and 3 ride on tests/test_resize.py's jobs.
"""

import json
import pickle
import shutil
from dataclasses import replace

import pytest
import torch

from conftest import TINY
from model import VDVAE
from pipeline.config import ConfigError, validate_run
from pipeline.init import StartError
from pipeline.weights import save_weights
from probe import config_of, max_difference, official_run, plain_pytorch, prepared_data, probe, same


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_data(tmp_path_factory.mktemp("init-data"))


@pytest.fixture(scope="module")
def official(data, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("official") / "tiny-iter-7"
    return prefix, official_run(prefix, data)


def _check(data, tmp_path, *settings):
    validate_run(config_of(data, *settings, run_dir=tmp_path), 1, on_gpu=False)


def _copy(prefix, into) -> str:
    into.mkdir(exist_ok=True)
    for path in prefix.parent.glob(prefix.name + "-*"):
        shutil.copy(path, into / path.name)
    return str(into / prefix.name)


def test_start_files_that_disagree_fail_before_any_process_group(data, official, tmp_path):
    """Checked by validate_run in this process; each message names the file and what differs."""
    prefix, _ = official
    _check(data, tmp_path / "ok", f"init_official={prefix}")  # the whole set fits
    # a missing file
    other = _copy(prefix, tmp_path / "no-log")
    (tmp_path / "no-log" / f"{prefix.name}-log.jsonl").unlink()
    with pytest.raises(StartError, match=r"tiny-iter-7-log\.jsonl does not exist"):
        _check(data, tmp_path / "r1", f"init_official={other}")
    # another architecture (the files of a wider model): the listing of load_official
    wide = tmp_path / "wide" / "wide-iter-7"
    wide.parent.mkdir()
    official_run(wide, data, model_config=replace(TINY, width=8))
    with pytest.raises(StartError, match=r"wide-iter-7-model\.th: checkpoint does not fit .* wrong shapes: "
                                         r"encoder\.in_conv\.weight: file \(8, 3, 3, 3\) vs model \(16, 3, 3, 3\)"):
        _check(data, tmp_path / "r2", f"init_official={wide}")
    # an -opt.th entry missing
    other = _copy(prefix, tmp_path / "no-entry")
    opt = torch.load(f"{other}-opt.th", weights_only=True)
    del opt["state"][5]
    torch.save(opt, f"{other}-opt.th")
    with pytest.raises(StartError, match=r"tiny-iter-7-opt\.th does not fit .*no exp_avg / exp_avg_sq for "
                                         r"parameter 5 \(encoder\.enc_blocks\.0\.c2\.bias\)"):
        _check(data, tmp_path / "r3", f"init_official={other}")
    # step counts that ZeRO cannot keep, and a log of no training
    other = _copy(prefix, tmp_path / "steps")
    opt = torch.load(f"{other}-opt.th", weights_only=True)
    opt["state"][0]["step"] = torch.tensor(9.0)
    torch.save(opt, f"{other}-opt.th")
    with pytest.raises(StartError, match=r"-opt\.th: the parameters' step counts differ \(\[3, 9\]\)"):
        _check(data, tmp_path / "r4", f"init_official={other}")
    other = _copy(prefix, tmp_path / "log")
    (tmp_path / "log" / f"{prefix.name}-log.jsonl").write_text(json.dumps({"type": "eval_loss", "step": 3}) + "\n")
    with pytest.raises(StartError, match=r"-log\.jsonl has no line of type train_loss"):
        _check(data, tmp_path / "r5", f"init_official={other}")
    # init=: a file of another architecture, a file that is no weights, a file that would run code
    wrong = save_weights(VDVAE(replace(TINY, zdim=2)), tmp_path / "zdim2.pt")
    with pytest.raises(StartError, match=r"zdim2\.pt: checkpoint does not fit .* wrong shapes"):
        _check(data, tmp_path / "r6", f"init={wrong}")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(StartError, match=r"list\.pt is neither one of our weights files"):
        _check(data, tmp_path / "r7", f"init={tmp_path / 'list.pt'}")

    class Runs:
        def __reduce__(self):
            return (print, ("ran",))
    (tmp_path / "evil.th").write_bytes(pickle.dumps({"x": Runs()}))
    with pytest.raises(StartError, match=r"evil\.th cannot be loaded safely"):
        _check(data, tmp_path / "r8", f"init={tmp_path / 'evil.th'}")
    with pytest.raises(StartError, match=r"nothere\.pt does not exist"):
        _check(data, tmp_path / "r9", f"init={tmp_path / 'nothere.pt'}", f"init_ema={prefix}-model-ema.th")
    with pytest.raises(ConfigError, match="init_ema needs init"):
        config_of(data, f"init_ema={prefix}-model-ema.th")
    with pytest.raises(ConfigError, match="init_official brings its own weights"):
        config_of(data, f"init_official={prefix}", f"init={prefix}-model.th")


def test_continuing_an_official_run_on_one_rank_is_plain_pytorch_exactly(data, official, tmp_path):
    """fp32, ZeRO 0: the next steps' losses, weights, moments and EMA are those of the same AdamW
    continued in plain PyTorch, exactly; steps, TensorBoard and checkpoint names go on from 7."""
    prefix, start = official
    job = probe(data, tmp_path / "run", tmp_path / "out", 1, f"init_official={prefix}", "zero_stage=0",
                "max_steps=10")
    first = job.start
    assert first["step"] == 7 and set(first["steps"]) == {3}
    for key in ("weights", "exp_avg", "exp_avg_sq", "ema"):
        assert same(first[key], start[key]), key
    reference = plain_pytorch(data, start, world=1, steps=3, keep=(10,))
    assert job.losses == reference.losses  # steps 8, 9, 10
    saved = job.saved(10)
    for key in ("weights", "exp_avg", "exp_avg_sq", "ema"):
        assert same(saved[key], reference.states[10][key]), (key, max_difference(saved[key], reference.states[10][key]))
    assert set(saved["steps"]) == {6} and (tmp_path / "run" / "checkpoints" / "latest").read_text() == "global_step10"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/elbo")] == [8, 9, 10]
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([2e-3] * 3)  # no new warmup


def test_continuing_an_official_run_at_zero1_on_two_ranks(data, tmp_path):
    """apex's per-group step count; 2 ranks: plain PyTorch to fp32 reduction tolerance."""
    prefix = tmp_path / "grouped-iter-5"
    start = official_run(prefix, data, iteration=5, adam_steps=4, per_group_step=True)
    job = probe(data, tmp_path / "run", tmp_path / "out", 2, f"init_official={prefix}", "zero_stage=1", "max_steps=8")
    first = job.start
    assert first["step"] == 5 and set(first["steps"]) == {4} and len(first["steps"]) == 2  # one per partition
    for key in ("weights", "exp_avg", "exp_avg_sq", "ema"):
        assert same(first[key], start[key]), key
    reference = plain_pytorch(data, start, world=2, steps=3, keep=(8,))
    assert job.losses == pytest.approx(reference.losses, rel=1e-5)
    saved = job.saved(8)
    assert set(saved["steps"]) == {7}
    for key, tolerance in (("weights", 1e-5), ("exp_avg", 1e-6), ("exp_avg_sq", 1e-8), ("ema", 1e-5)):
        assert max_difference(saved[key], reference.states[8][key]) < tolerance, key


def test_starting_from_an_exported_run_at_zero3(data, tmp_path):
    """init=FOLDER (`vdvae export`'s): its model.pt, its model-ema.pt as the EMA; a fresh optimizer at
    step 0 with the warmup; ZeRO-3 partitions."""
    torch.manual_seed(3)
    model, ema = VDVAE(TINY), VDVAE(TINY)
    save_weights(model, tmp_path / "export" / "model.pt", preset="cifar10")
    save_weights(ema, tmp_path / "export" / "model-ema.pt", preset="cifar10")
    job = probe(data, tmp_path / "run", tmp_path / "out", 1, f"init={tmp_path / 'export'}", "zero_stage=3",
                "max_steps=3")
    first = job.start
    assert first["step"] == 0 and first["exp_avg"] is None and first["steps"] == []
    assert same(first["weights"], model.state_dict()) and same(first["ema"], ema.state_dict())
    start = {"weights": dict(model.state_dict()), "ema": dict(ema.state_dict()), "step": 0}
    reference = plain_pytorch(data, start, world=1, steps=3, keep=(3,))
    assert job.losses == pytest.approx(reference.losses, rel=1e-5)
    assert max_difference(job.saved(3)["weights"], reference.states[3]["weights"]) < 1e-5
