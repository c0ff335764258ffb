"""`vdvae demo`, shortened: FFHQ-layout photographs -> vdvae prep -> 2 DeepSpeed processes -> outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from pipeline.runtime import bf16_is_native

ROOT = Path(__file__).resolve().parents[1]


STEPS = 6  # two checkpoints (every STEPS // 2), then the samples


def test_demo_builds_shards_trains_and_leaves_logs_samples_and_a_checkpoint(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "launch.cli", "demo", "--out", str(out), "--steps", str(STEPS), "--images", "300"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])

    photos = sorted((out / "photos" / "thumbnails128x128").rglob("*.png"))
    assert [p.relative_to(out / "photos").as_posix() for p in photos[:2]] == [
        "thumbnails128x128/00000/00000.png", "thumbnails128x128/00000/00001.png"]
    assert len(photos) == 300 and Image.open(photos[0]).size == (128, 128)
    manifests = {s: json.loads((out / "data" / s / "manifest.json").read_text()) for s in ("train", "valid")}
    assert manifests["train"]["num_samples"] == 270 and manifests["valid"]["num_samples"] == 30
    assert manifests["train"]["resolution"] == 32

    run = out / "run"
    steps = [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "train/elbo" in r]
    assert steps and max(steps) == STEPS
    config = json.loads((run / "config.json").read_text())
    assert config["zero_stage"] == 2
    assert config["precision"] == ("bf16" if bf16_is_native() else "fp32")  # bf16 only where it is native
    assert f"(ZeRO-2, {config['precision']})" in done.stdout
    assert (run / "checkpoints" / "latest").read_text() == f"global_step{STEPS}"
    (grid,) = (run / "samples").glob("*-samples.png")
    assert grid.name == f"step{STEPS:08d}-samples.png"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for text in (str(grid), f"{run}/checkpoints/global_step{STEPS}", f"tensorboard --logdir {run}/tensorboard"):
        assert text in done.stdout, done.stdout[-2000:]

    # a rerun reuses the dataset and finds the run finished
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert photos[0].stat().st_mtime == sorted((out / "photos").rglob("*.png"))[0].stat().st_mtime
