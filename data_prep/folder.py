"""Any folder of images (a custom dataset): center-cropped to a square and resized.

Files: *.png, *.jpg, *.jpeg, *.webp, *.bmp anywhere below the folder, sorted
by path. valid = the last `num_valid` of a `RandomState(0)` permutation,
the rest train. Each image is center-cropped to its shorter side and
resized with antialiased bilinear filtering, then stored as PNG. Files are
decoded by `decode.open_rgb`: the pixel budget, EXIF orientation applied,
16-bit scaled to 8 bits, alpha dropped, other modes converted to RGB, each
conversion counted in the manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .decode import IMAGE_FORMATS, MAX_PIXELS, open_rgb
from .source import CONVERSIONS, SourceError, SplitPlan

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
SPLIT_SEED = 0


def center_crop_resize(image: Image.Image, size: int) -> np.ndarray:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


def plan(src: Path, resolution: int, num_valid: int) -> dict[str, SplitPlan]:
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"source {src} is not a folder")
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise SourceError(f"{src} holds no images ({', '.join(sorted(EXTENSIONS))})")
    if not 0 <= num_valid < len(files):
        raise SourceError(f"--num-valid {num_valid}: must be below the {len(files)} images found")
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(files))
    splits = {"train": sorted(perm[:len(files) - num_valid].tolist()),
              "valid": perm[len(files) - num_valid:].tolist()}

    def get(indices):
        def item(i):
            path = files[indices[i]]
            image, conversions = open_rgb(path, formats=IMAGE_FORMATS, max_pixels=MAX_PIXELS)
            return center_crop_resize(image, resolution), None, {
                "source": "folder", "file": str(path.relative_to(src)), "index": int(indices[i]),
                CONVERSIONS: conversions}, None
        return item

    how = (f"{len(files)} images sorted by path; RandomState({SPLIT_SEED}) permutation: last "
           f"{num_valid} valid; EXIF orientation applied, 16-bit scaled to 8 (v >> 8), alpha dropped, "
           f"at most {MAX_PIXELS} pixels; center crop, bilinear antialiased resize to {resolution} px")
    return {split: SplitPlan(len(ids), how, resolution, get(ids)) for split, ids in splits.items() if ids}
