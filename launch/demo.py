"""`vdvae demo`: the whole system on one machine, on real photographs, in a few minutes.

1. A small dataset laid out like the FFHQ release (`thumbnails128x128/00000/00000.png`, 1000 files
   per subfolder), cut from the photographs that ship inside scikit-image and scikit-learn.
2. `vdvae prep folder` shards it into webdataset tars with a manifest, in a local folder.
3. `vdvae train` on 2 local DeepSpeed processes (ZeRO-2, gloo; bf16 where the machine computes it in
   hardware, else fp32) streams the shards into a small 32 px VDVAE: TensorBoard logs, checkpoints,
   a sample grid PNG.
Every step is the production code path; only the storage (a folder, not S3) and the launcher (two
local processes, `local.py`, not srun) differ.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import skimage
from PIL import Image
from sklearn.datasets import load_sample_images

from data_prep.prep import prep
from model import ModelConfig, get_preset
from pipeline.checkpoint import latest_tag
from pipeline.runtime import bf16_is_native

from .local import train_locally

# A 32 px VDVAE with cifar10's normalisation and every kind of block the
# paper's presets use, small enough to train for a few minutes on two cores.
DEMO_MODEL = ModelConfig(
    image_size=32,
    width=64,
    enc_blocks="32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x1",
    dec_blocks="1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2",
    num_mixtures=5,
    input_shift=get_preset("cifar10").model.input_shift,
    input_scale=get_preset("cifar10").model.input_scale,
)
THUMB = 128  # FFHQ's thumbnails128x128 side
# The colour photographs bundled in scikit-image's package data (no download).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")


def photographs() -> list[np.ndarray]:
    """The RGB photographs shipped inside scikit-image and scikit-learn, as uint8 HWC arrays."""
    folder = Path(skimage.__file__).parent / "data"
    photos = [np.asarray(Image.open(folder / name).convert("RGB")) for name in SKIMAGE_PHOTOS
              if (folder / name).is_file()]
    photos += list(load_sample_images().images)
    return photos


def make_ffhq_like(root: Path, count: int, seed: int = 0) -> Path:
    """`count` 128 px crops (random position, scale and flip) in the FFHQ release layout under
    root/thumbnails128x128; kept when already complete. Returns that folder."""
    folder = root / "thumbnails128x128"
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{count} {seed}":
        return folder
    if root.exists():
        shutil.rmtree(root)  # a partial or different earlier build: ours, so start it again
    photos = photographs()
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 5, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((THUMB, THUMB), Image.Resampling.BILINEAR,
                                                                     reducing_gap=None)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        sub = folder / f"{i // 1000 * 1000:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        crop.save(sub / f"{i:05d}.png")
    done.write_text(f"{count} {seed}")
    return folder


def run_demo(out_dir: Path, steps: int = 1500, images: int = 4000, world: int = 2) -> int:
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    print(f"demo 1/3: {images} photographs-crops in the FFHQ release layout", flush=True)
    src = make_ffhq_like(out_dir / "photos", images)
    print(f"  {src} ({time.perf_counter() - start:.0f} s)")

    print("demo 2/3: vdvae prep folder -> webdataset shards and manifests", flush=True)
    data = out_dir / "data"
    manifests = prep("folder", src, str(data), samples_per_shard=1000, resolution=DEMO_MODEL.image_size,
                     num_valid=images // 10, progress=True)
    for split, manifest in (manifests or {}).items():
        print(f"  {data}/{split}: {manifest['num_samples']} images in {len(manifest['shards'])} shards")

    run = out_dir / "run"
    model_json = out_dir / "model.json"
    model_json.write_text(json.dumps(asdict(DEMO_MODEL), indent=1))
    # bf16 only where it is native: emulated (an AVX2-only CPU) it is several times slower than fp32
    precision = "bf16" if bf16_is_native() else "fp32"
    settings = ["--preset", "cifar10", "--data", str(data), "--run-dir", str(run), f"model_json={model_json}",
                "zero_stage=2", f"precision={precision}", "batch_per_gpu=8", "lr=1e-3", "warmup_iters=20",
                "ema_rate=0.99", "workers=1", f"max_steps={steps}", "log_every=50", f"eval_every={steps}",
                f"sample_every={steps}", f"checkpoint_every={max(steps // 2, 1)}", "keep_checkpoints=2"]
    print(f"demo 3/3: vdvae train on {world} local DeepSpeed processes (ZeRO-2, {precision}), {steps} steps",
          flush=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    status = train_locally(settings, world, out_dir / "logs")
    if status != 0:
        print(f"demo: training failed (exit status {status}); the ranks' output is in {out_dir}/logs/",
              file=sys.stderr)
        return status

    grids = sorted((run / "samples").glob("*-samples.png"))
    latest = latest_tag(run)
    print(f"\ndemo: done in {time.perf_counter() - start:.0f} s")
    print(f"  samples:     {grids[-1] if grids else '-'}")
    print(f"  checkpoint:  {run}/checkpoints/{latest}")
    print(f"  logs:        {run}/log.jsonl, {run}/tensorboard/")
    print("next:")
    print(f"  tensorboard --logdir {run}/tensorboard          # the curves, samples and reconstructions")
    print(f"  vdvae sample {run} --out samples.png --temperatures 1.0,0.8")
    print(f"  vdvae eval {run} --data {data} --split valid")
    print(f"  vdvae export --run-dir {run} --out exported/")
    print("  vdvae submit train --help                       # the same on a Slurm cluster, data on S3")
    return 0
