"""FFHQ from the release's `images1024x1024/` (subfolders 00000/, 01000/, ...) or a flat folder.

ffhq1024: the original PNG bytes, never re-encoded, each checked to decode
as 1024x1024 RGB; files 00000-64999 train, 65000-69999 valid (the official
code evaluates its test bits/dim on the valid files).
ffhq256: each image resized to 256 px with antialiased bilinear filtering
and stored as PNG; valid = the last 7000 of `numpy.random.seed(5);
numpy.random.permutation(70000)`, the rest train, in permutation order.
A partial download shards what is there, each file into the split its
number gives it. Both refuse, before decoding, a file over the pixel budget
(`decode.MAX_PIXELS`). EXIF orientation: ffhq256 applies it (counted in
the manifest's conversions); ffhq1024 rejects a file whose orientation is
not 1, as its bytes are stored as they are and cannot be rotated.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .decode import exif_orientation, opened, read_as_8bit
from .source import CONVERSIONS, Rejected, SourceError, SplitPlan

NUM_IMAGES = 70_000
FIRST_VALID_1024 = 65_000
SPLIT_SEED_256, NUM_VALID_256 = 5, 7000
_NAME = re.compile(r"^(\d{5})\.png$")


def find_images(src: Path) -> dict[int, Path]:
    """Image number -> file, from a release layout (NNN00/NNNNN.png) or a flat folder."""
    src = Path(src)
    root = src / "images1024x1024" if (src / "images1024x1024").is_dir() else src
    files: dict[int, Path] = {}
    for path in [*root.glob("*.png"), *root.glob("[0-9][0-9][0-9][0-9][0-9]/*.png")]:
        match = _NAME.match(path.name)
        if match and int(match.group(1)) < NUM_IMAGES:
            files[int(match.group(1))] = path
    if not files:
        raise SourceError(
            f"{src} holds no FFHQ images: expected images1024x1024/ with subfolders 00000/, 01000/, "
            "... holding 00000.png ... 69999.png (the release layout), or a flat folder of those files")
    return dict(sorted(files.items()))


def _decode(path: Path, size: int, keep_bytes: bool) -> tuple[Image.Image, bytes, tuple[str, ...]]:
    """The file as a decoded 1024 px RGB PNG, its bytes, and the conversions made: EXIF
    orientation applied, or (`keep_bytes`: the bytes are stored, not the decoded image) rejected."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise Rejected(str(path), f"unreadable ({type(err).__name__}: {err})") from None
    with opened(data, name=str(path), formats=("PNG",)) as image:  # within the pixel budget
        if image.size != (size, size):
            raise Rejected(str(path), f"{image.size[0]}x{image.size[1]}, expected {size}x{size}")
        if image.mode != "RGB":
            raise Rejected(str(path), f"mode {image.mode}, expected RGB")
        if read_as_8bit(image):
            raise Rejected(str(path), "16-bit RGB PNG, expected 8 bits per channel")
        image.load()  # decodes the whole file: a truncated one fails here
        orientation = exif_orientation(image)
        if orientation == 1:
            return image, data, ()
        if keep_bytes:
            raise Rejected(str(path), f"EXIF orientation {orientation} (shown rotated or mirrored): ffhq1024 "
                                      "stores the original bytes as they are, so they cannot be rotated")
        return ImageOps.exif_transpose(image), data, ("exif_orientation",)


def _meta(number: int, path: Path) -> dict:
    return {"source": "ffhq", "index": number, "file": f"{number:05d}.png"}


def plan_1024(src: Path) -> dict[str, SplitPlan]:
    files = find_images(src)
    splits = {"train": [n for n in files if n < FIRST_VALID_1024],
              "valid": [n for n in files if n >= FIRST_VALID_1024]}

    def get(numbers):
        def item(i):
            image, data, _ = _decode(files[numbers[i]], 1024, keep_bytes=True)
            return image, None, _meta(numbers[i], files[numbers[i]]), data
        return item

    how = {"train": "files 00000-64999", "valid": "files 65000-69999 (also the test set)"}
    return {split: SplitPlan(len(numbers), how[split], 1024, get(numbers))
            for split, numbers in splits.items() if numbers}


def resize_256(image: np.ndarray | Image.Image) -> np.ndarray:
    """1024 -> 256 px, bilinear with antialiasing (PIL's filter support scales with the factor)."""
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    return np.asarray(image.resize((256, 256), Image.Resampling.BILINEAR, reducing_gap=None))


def split_256() -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) image numbers of the official ffhq-256 split, in permutation order."""
    perm = np.random.RandomState(SPLIT_SEED_256).permutation(NUM_IMAGES)
    return perm[:-NUM_VALID_256], perm[-NUM_VALID_256:]


def plan_256(src: Path) -> dict[str, SplitPlan]:
    files = find_images(src)
    train, valid = split_256()
    splits = {"train": [int(n) for n in train if n in files], "valid": [int(n) for n in valid if n in files]}

    def get(numbers):
        def item(i):
            image, _, conversions = _decode(files[numbers[i]], 1024, keep_bytes=False)
            meta = dict(_meta(numbers[i], files[numbers[i]]), **{CONVERSIONS: conversions})
            return resize_256(image), None, meta, None
        return item

    how = (f"numpy.random.seed({SPLIT_SEED_256}); permutation({NUM_IMAGES}): last {NUM_VALID_256} "
           "valid (also the test set), the rest train; bilinear antialiased resize to 256 px")
    return {split: SplitPlan(len(numbers), how, 256, get(numbers))
            for split, numbers in splits.items() if numbers}
