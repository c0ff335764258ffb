"""Latent usage: per-resolution rates, active groups, the cumulative curve, the heatmap; in TensorBoard
from a real training run; `vdvae analyze` on a saved weights file."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator
from test_train import data, launch  # noqa: F401  (data: the prepared-dataset fixture)

from conftest import TINY
from launch.cli import main
from model import VDVAE
from pipeline.evaluate import evaluate
from pipeline.latents import (ACTIVE_NATS_PER_IMAGE, SEPARATOR, LatentUsage, RateWindow, cumulative_fraction,
                              group_resolutions, heatmap_columns, usage_heatmap)
from pipeline.stream import ShardStream
from pipeline.weights import save_weights

# TINY: dec_blocks "1x1,4m1,4x1,8m4,8x1": groups at 1, 4, 4, 8, 8 px; 8*8*3 = 192 dims per image
DIMS = 192


def test_groups_take_their_decoder_blocks_resolutions():
    assert group_resolutions(TINY) == [1, 4, 4, 8, 8]
    assert len(group_resolutions(TINY)) == TINY.num_latent_groups


def test_rate_per_resolution_is_the_sum_over_its_groups():
    rates = np.array([0.5, 0.25, 0.125, 1.0, 2.0]) / DIMS
    usage = LatentUsage.of(rates, TINY)
    by_res = usage.rate_by_resolution()
    assert list(by_res) == [1, 4, 8]
    assert by_res == pytest.approx({1: 0.5 / DIMS, 4: 0.375 / DIMS, 8: 3.0 / DIMS})
    assert sum(by_res.values()) == pytest.approx(rates.sum())  # the resolutions add up to the rate
    assert usage.scalars("latents") == pytest.approx({"latents/rate_1px": 0.5 / DIMS, "latents/rate_4px": 0.375 / DIMS,
                                                      "latents/rate_8px": 3.0 / DIMS, "latents/active_groups": 5.0})
    assert set(usage.scalars("eval_latents")) == {"eval_latents/rate_1px", "eval_latents/rate_4px",
                                                  "eval_latents/rate_8px", "eval_latents/active_groups"}


def test_active_groups_count_kl_above_the_threshold_in_nats_per_image():
    assert ACTIVE_NATS_PER_IMAGE == 0.01
    # nats per image: 0 (collapsed), just under, just over, well over, tiny
    per_image = np.array([0.0, 0.009, 0.011, 40.0, 1e-6])
    usage = LatentUsage.of(per_image / DIMS, TINY)
    assert usage.kl_per_image == pytest.approx(per_image)
    assert usage.active.tolist() == [False, False, True, True, False]
    assert usage.active_groups == 2
    assert usage.scalars()["latents/active_groups"] == 2
    assert LatentUsage.of(per_image / DIMS, TINY, threshold=1.0).active_groups == 1
    with pytest.raises(ValueError, match="5 latent groups"):
        LatentUsage.of(np.ones(4), TINY)


def test_cumulative_fraction_of_the_first_k_groups():
    assert cumulative_fraction([1.0, 3.0, 0.0, 4.0]) == pytest.approx([0.125, 0.5, 0.5, 1.0])
    assert cumulative_fraction([0.0, 0.0]).tolist() == [0.0, 0.0]  # a collapsed model: no NaN
    usage = LatentUsage.of(np.array([2.0, 0.0, 1.0, 1.0, 0.0]), TINY)
    assert usage.cumulative_fraction == pytest.approx([0.5, 0.5, 0.75, 1.0, 1.0])


def test_heatmap_has_a_cell_per_group_coloured_by_kl_and_marks_resolutions():
    resolutions = group_resolutions(TINY)
    kl = np.array([1e-4, 0.5, 5.0, 50.0, 500.0])  # nats per image, rising
    image = usage_heatmap(kl, resolutions)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    _, groups, separators = heatmap_columns(resolutions)
    assert len(groups) == 5 and len(separators) == 2  # between 1|4 px and 4|8 px
    assert image.shape[1] >= groups[-1][1] and image.shape[0] >= 40
    # separators: full columns of the separator colour between the resolutions' cells
    assert groups[0][1] == separators[0][0] and separators[0][1] == groups[1][0]
    assert groups[2][1] == separators[1][0] and separators[1][1] == groups[3][0]
    bar_row = 20  # inside the bar (below the labels)
    for x0, x1 in separators:
        assert (image[bar_row, x0:x1] == SEPARATOR).all()
    # no separator inside a resolution: groups 1 and 2 (both 4 px) touch
    assert groups[1][1] == groups[2][0]
    # colours differ with the KL (log scale): a cell per group, all distinct
    centres = [tuple(image[bar_row, (x0 + x1) // 2]) for x0, x1 in groups]
    assert len(set(centres)) == 5
    # labels: dark pixels above the bar, over each resolution's cells
    label_rows = image[:12]
    for x0, x1 in (groups[1][0], groups[2][1]), (groups[3][0], groups[4][1]):
        assert (label_rows[:, x0:x1] < 100).all(axis=2).any()
    # a model with many groups (cifar10's 43) still gives one cell per group
    many = [1] * 3 + [4] * 10 + [8] * 12 + [16] * 10 + [32] * 8
    image = usage_heatmap(np.ones(len(many)), many)
    assert len(heatmap_columns(many)[1]) == 43 and image.shape[1] >= heatmap_columns(many)[1][-1][1]


def test_rate_window_means_over_steps_and_skips_nan_steps():
    window = RateWindow()
    assert window.take() is None
    window.add(torch.tensor([1.0, 2.0, 3.0]))
    window.add(torch.tensor([3.0, float("nan"), 5.0]))
    assert window.take() == pytest.approx([2.0, 2.0, 4.0])
    assert window.take() is None  # a new window


def test_evaluate_per_group_leaves_the_elbo_as_it_was_and_matches_the_model(data):  # noqa: F811
    torch.manual_seed(0)
    model = VDVAE(TINY)
    cpu = torch.device("cpu")

    def stream(batch):
        return ShardStream(f"{data['data']}/valid", batch, train=False, workers=0)

    for batch in (4, 3):  # 3: the last batch has a masked row
        plain = evaluate(model, stream(batch), cpu, seed=5)
        grouped = evaluate(model, stream(batch), cpu, seed=5, per_group=True)
        assert plain.per_group_rate is None and grouped.elbo == plain.elbo and grouped.images == plain.images == 8
        assert len(grouped.per_group_rate) == TINY.num_latent_groups and all(r >= 0 for r in grouped.per_group_rate)
        assert not model.decoder._forward_hooks  # the hook is gone
    # all rows valid: the mean of the model's own batch-mean per-group rates, over the same noise
    expected = []
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(5)
        for b in stream(4):
            expected.append(model(b.images).per_group_rate.double())
    grouped = evaluate(model, stream(4), cpu, seed=5, per_group=True)
    assert grouped.per_group_rate == pytest.approx(torch.stack(expected).mean(0).tolist(), rel=1e-6)


def test_training_logs_latent_usage_to_tensorboard(data, tmp_path, free_port):  # noqa: F811
    run = tmp_path / "run"
    launch(data, run, free_port, "zero_stage=2", "max_steps=4", "log_every=2", "checkpoint_every=100",
           "eval_every=4", "sample_every=100", world=1)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0, IMAGES: 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    resolutions = sorted(set(group_resolutions(TINY)))
    for prefix in ("latents", "eval_latents"):
        assert {f"{prefix}/rate_{res}px" for res in resolutions} | {f"{prefix}/active_groups"} <= scalars
    assert [e.step for e in events.Scalars("latents/active_groups")] == [2, 4]
    assert [e.step for e in events.Scalars("eval_latents/active_groups")] == [4]
    for step in (0, 1):  # the resolutions' rates add up to train/rate (the same window means)
        total = sum(events.Scalars(f"latents/rate_{res}px")[step].value for res in resolutions)
        assert total == pytest.approx(events.Scalars("train/rate")[step].value, rel=1e-4)
        assert 0 <= events.Scalars("latents/active_groups")[step].value <= TINY.num_latent_groups
    assert {"latents/usage", "eval_latents/usage"} <= set(events.Tags()["images"])
    (usage,) = events.Images("eval_latents/usage")
    assert usage.step == 4
    assert [e.step for e in events.Images("latents/usage")] == [2, 4]
    picture = events.Images("latents/usage")[-1]
    decoded = np.asarray(Image.open(io.BytesIO(picture.encoded_image_string)))
    assert decoded.shape == (picture.height, picture.width, 3)
    assert decoded.shape == usage_heatmap(np.ones(5), group_resolutions(TINY)).shape
    record = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("latents/rate_8px" in r for r in record) and any("eval_latents/rate_8px" in r for r in record)


def test_analyze_writes_the_plot_and_consistent_numbers(data, tmp_path, capsys):  # noqa: F811
    torch.manual_seed(0)
    weights = save_weights(VDVAE(TINY), tmp_path / "tiny.pt")
    out = tmp_path / "analysis"
    assert main(["analyze", str(weights), "--data", data["data"], "--split", "valid", "--batches", "1",
                 "--batch", "4", "--workers", "0", "--out", str(out)]) == 0
    assert "latent groups active" in capsys.readouterr().out
    plot = np.asarray(Image.open(out / "cumulative_information.png"))
    assert plot.ndim == 3 and plot.shape[2] == 3 and plot.shape[0] > 100
    report = json.loads((out / "latents.json").read_text())
    assert report["images"] == 4 and report["batches"] == 1 and report["num_groups"] == TINY.num_latent_groups
    groups = report["groups"]
    assert [g["resolution"] for g in groups] == group_resolutions(TINY)
    for g in groups:
        assert g["kl_nats_per_image"] == pytest.approx(g["kl_nats_per_dim"] * DIMS)
        assert g["active"] == (g["kl_nats_per_image"] > report["active_threshold_nats_per_image"])
    assert report["active_groups"] == sum(g["active"] for g in groups)
    for name, res in report["resolutions"].items():
        mine = [g for g in groups if g["resolution"] == res["resolution"]]
        assert name == f"{res['resolution']}px" and res["groups"] == len(mine)
        assert res["rate_nats_per_dim"] == pytest.approx(sum(g["kl_nats_per_dim"] for g in mine))
        assert res["kl_nats_per_image"] == pytest.approx(sum(g["kl_nats_per_image"] for g in mine))
    rates = np.array([g["kl_nats_per_dim"] for g in groups])
    assert report["total_rate_nats_per_dim"] == pytest.approx(rates.sum())
    assert report["cumulative_fraction"] == pytest.approx(np.cumsum(rates) / rates.sum())
    assert [g["cumulative_fraction"] for g in groups] == report["cumulative_fraction"]
    # the per-group KLs are the model's own: their sum is the rate of the same images and noise
    model = VDVAE(TINY)
    model.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    batch = next(iter(ShardStream(f"{data['data']}/valid", 4, train=False, workers=0)))
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        terms = model(batch.images)
    assert terms.per_group_rate.numpy() == pytest.approx(rates, rel=1e-5)
    assert report["elbo_nats_per_dim"] == pytest.approx(float(terms.elbo), rel=1e-5)
