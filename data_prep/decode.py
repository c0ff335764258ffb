"""Decoding a user's image file into 8-bit RGB: what every reader of image files shares.

The rules, each a choice a user can check in the manifest's `conversions`
counts (a sample is counted once per rule that changed it):

- Pixel budget: an image whose header declares more than `MAX_PIXELS`
  pixels is rejected before any pixel is decoded (PIL's own decompression
  bomb warning is silenced, as such an image is rejected here, and its
  error becomes the same rejection).
- EXIF orientation (`exif_orientation`): applied, so the sample is what an
  image viewer shows (`PIL.ImageOps.exif_transpose`).
- 16-bit samples (`16bit_scaled`): scaled to 8 bits by keeping the high
  byte, `v >> 8` (0..65535 -> 0..255; never clipped). PIL already reads
  16-bit RGB(A) and gray+alpha PNGs that way, so every 16-bit input gets
  the same mapping. Modes I and F are taken as 16-bit samples (the mode PIL
  gives 16-bit files); values outside 0..65535 have no known scale and are
  rejected.
- Alpha (`alpha_dropped`): dropped, keeping the colour stored under it
  (what `convert("RGB")` always did), counted whenever an alpha channel is
  removed, opaque or not. Compositing would invent a background colour
  that differs between viewers.
- Other modes are converted with PIL's `convert("RGB")`: palette
  (`palette`), L (`grayscale`), 1 (`bilevel`), CMYK (`cmyk`), YCbCr
  (`ycbcr`), LAB (`lab`), HSV (`hsv`). Embedded colour (ICC) profiles are
  not applied.
- Only the formats a reader names are decoded: a file whose content is
  another format (an EPS named .png, which PIL would hand to Ghostscript)
  is rejected before decoding.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .source import Rejected

# Budget of pixels decoded per image: 64 MiP (67,108,864 pixels, e.g. 8192x8192), below PIL's
# decompression-bomb warning (89,478,485) and far above what the datasets need (FFHQ 1024x1024 is
# 1 MP; a 50 MP camera photo passes). Decoding one image at the budget, converted and resized,
# peaks at about 0.3 GB (measured: 8192x8192 16-bit gray, RGBA and gray+alpha PNGs), up to 0.6 GB
# for the 32-bit modes (I, F): bounded per worker process, so that several workers fit on a
# machine, where a small crafted file declaring a huge size would otherwise cost gigabytes each.
MAX_PIXELS = 64 * 2**20

IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP")
"""The formats decoded from a folder of images (MPO: the multi-picture JPEG many phones write)."""

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_RGB_CONVERSIONS = {
    "1": ("bilevel",), "L": ("grayscale",), "LA": ("grayscale", "alpha_dropped"),
    "La": ("grayscale", "alpha_dropped"), "P": ("palette",), "PA": ("palette", "alpha_dropped"),
    "RGBA": ("alpha_dropped",), "RGBa": ("alpha_dropped",), "RGBX": (), "CMYK": ("cmyk",),
    "YCbCr": ("ycbcr",), "LAB": ("lab",), "HSV": ("hsv",),
}


def over_budget(width: int, height: int, max_pixels: int) -> str:
    return (f"{width}x{height} = {width * height:,} pixels, over the budget of {max_pixels:,} pixels "
            "per image: refused before decoding")


@contextmanager
def opened(source: str | os.PathLike | bytes, *, name: str | None = None,
           formats: tuple[str, ...] = IMAGE_FORMATS, max_pixels: int = MAX_PIXELS) -> Iterator[Image.Image]:
    """The image, opened lazily (its header read, no pixel decoded), once its format is one of
    `formats` and its size within `max_pixels`. Anything that goes wrong, in here or in the body
    (a truncated file fails when decoded), becomes `Rejected` naming `name` (default: the path)."""
    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    with warnings.catch_warnings():
        # PIL warns from 89 MP, below the check here: the check rejects such an image, naming its size
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as fp, \
                    Image.open(fp) as image:
                if image.format not in formats:
                    raise Rejected(name, f"not a {' or '.join(formats)} file ({image.format})")
                if image.width * image.height > max_pixels:
                    raise Rejected(name, over_budget(image.width, image.height, max_pixels))
                yield image
        except Rejected:
            raise
        except Image.DecompressionBombError as err:  # over twice PIL's limit: raised by Image.open
            raise Rejected(name, f"over the budget of {max_pixels:,} pixels per image: refused before "
                                 f"decoding ({err})") from None
        except Exception as err:
            raise Rejected(name, f"unreadable ({type(err).__name__}: {err})") from None


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF (or XMP) orientation, 1 to 8; 1 (as stored) when absent or invalid."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if orientation in range(1, 9) else 1


def read_as_8bit(image: Image.Image) -> bool:
    """Whether PIL reads the (not yet decoded) file's 16-bit samples into an 8-bit mode, keeping
    their high bytes: 16-bit RGB, RGBA and gray+alpha PNGs."""
    return image.format == "PNG" and bool(image.tile) and ";16" in str(image.tile[0][3]) \
        and image.mode not in _SIXTEEN_BIT  # tile: (codec, extents, offset, rawmode)


def decode_rgb(image: Image.Image, *, name: str) -> tuple[Image.Image, tuple[str, ...]]:
    """Decode an `opened` image to 8-bit RGB, EXIF orientation applied; with the conversions made."""
    sixteen_bit_png = read_as_8bit(image)
    image.load()
    conversions = []
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
        conversions.append("exif_orientation")
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        image = Image.fromarray(_high_byte(np.asarray(image), image.mode, name))  # mode L
        conversions.append("16bit_scaled")
    elif sixteen_bit_png:  # 16-bit RGB(A) or gray+alpha: PIL has kept the high bytes already
        conversions.append("16bit_scaled")
    if image.mode != "RGB":
        conversions += _RGB_CONVERSIONS.get(image.mode, (f"mode_{image.mode}",))
        if image.mode == "P" and "transparency" in image.info:  # a palette entry stands for transparent
            conversions.append("alpha_dropped")
        image = (image.convert("LA") if image.mode == "La" else image).convert("RGB")  # no La -> RGB in PIL
    return image, tuple(conversions)


def _high_byte(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    """16-bit samples (held as 16-bit, 32-bit int or float) -> uint8, `v >> 8`, without a full-size
    temporary (numpy casts into `out` in small buffers)."""
    if mode in ("I", "F"):
        low, high = values.min(), values.max()
        if not (0 <= low and high <= 65535):  # also NaN
            raise Rejected(name, f"mode {mode} values {low}..{high} outside 0..65535: no known scale to 8 bits")
    out = np.empty(values.shape, np.uint8)
    if values.dtype.kind == "f":
        np.floor_divide(values, 256, out=out, casting="unsafe")
    else:
        np.right_shift(values, 8, out=out, casting="unsafe")
    return out


def open_rgb(source: str | os.PathLike | bytes, *, name: str | None = None,
             formats: tuple[str, ...] = IMAGE_FORMATS,
             max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, tuple[str, ...]]:
    """An image file (a path, or its bytes) as an 8-bit RGB PIL image, and the names of the
    conversions made (see the module's docstring). Raises `Rejected` for a bad file."""
    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    with opened(source, name=name, formats=formats, max_pixels=max_pixels) as image:
        return decode_rgb(image, name=name)
