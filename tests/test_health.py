"""Alarms: a skip streak and a run of NaN losses are reported when they start and end; past the limit
the job checkpoints and stops with a status the batch script does not requeue."""

import json
import math

from test_train import data, launch, records  # noqa: F401 (data: the module's prepared-dataset fixture)

from pipeline.health import STREAK_REPORTED_AFTER, STUCK_EXIT_CODE, Alarms


def _alarms(limit: int) -> Alarms:
    return Alarms(max_consecutive_skips=limit, skip_threshold=400.0, grad_clip=200.0, lr=2e-4)


def test_isolated_skips_are_quiet_and_a_streak_is_reported_when_it_starts_and_ends():
    alarms = _alarms(100)
    said = []
    for step in range(1, 4):  # an isolated skip, then taken steps
        messages, stop = alarms.update(step, skipped=step == 2, nan_loss=False, grad_norm=500.0)
        said += messages
        assert stop is None
    assert said == []
    for step in range(4, 4 + STREAK_REPORTED_AFTER):
        messages, stop = alarms.update(step, skipped=True, nan_loss=False, grad_norm=450.0 + step)
        said += messages
    assert len(said) == 1 and "10 updates skipped in a row" in said[0] and "not below skip_threshold 400" in said[0]
    messages, _ = alarms.update(20, skipped=False, nan_loss=False, grad_norm=10.0)
    assert messages == ["step 20: the skip streak ended after 10 skipped updates"]


def test_past_the_limit_the_stop_names_the_cause_and_the_settings():
    alarms = _alarms(3)
    stops = [alarms.update(s, skipped=True, nan_loss=False, grad_norm=900.0)[1] for s in (1, 2, 3)]
    assert stops[:2] == [None, None] and "3 consecutive updates skipped" in stops[2]
    assert "raise skip_threshold (now 400)" in stops[2] and "lower lr (now 0.0002)" in stops[2]
    nan = _alarms(3)
    said = []
    for s in (1, 2, 3):
        messages, stop = nan.update(s, skipped=True, nan_loss=True, grad_norm=math.nan)
        said += messages
    assert "NaN loss" in said[0] and "the loss has been NaN for 3 steps" in stop and "grad_clip" in stop
    assert nan.update(4, skipped=False, nan_loss=False, grad_norm=1.0)[0] == [
        "step 4: the run of 3 NaN losses ended", "step 4: the skip streak ended after 3 skipped updates"]


def test_a_skip_streak_on_two_ranks_checkpoints_and_stops_without_requeue(data, tmp_path, free_port):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    procs = launch(data, run, free_port, "zero_stage=2", "skip_threshold=1e-9", "max_consecutive_skips=3",
                   "max_steps=50", "checkpoint_every=100", wait=False)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [STUCK_EXIT_CODE] * 2, outs[0][1][-3000:]
    assert "stopped at step 3: 3 consecutive updates skipped" in outs[0][0] + outs[0][1]
    assert (run / "checkpoints" / "latest").read_text() == "global_step3"
    alarms = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "alarm" in r]
    assert alarms and "skip_threshold" in alarms[-1]["alarm"] and alarms[-1]["step"] == 3
    assert [r["step"] for r in records(run)] == [1, 2, 3]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert "alarms/text_summary" in events.Tags()["tensors"]
