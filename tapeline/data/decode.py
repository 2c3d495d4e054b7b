"""Encoded images (PNG, JPEG, ...) to uint8 arrays of one shape, with Pillow: what `--dataset images` and
`--dataset parquet` share.

Every image of a dataset must come out the same shape, (height, width, channels). Channels
are kept as the file has them (1 grey, 2 grey and alpha, 3 RGB, 4 RGBA; a palette or a
1-bit image becomes RGB(A) or grey) unless `--channels` converts every image to 1 or 3.
Sizes must agree unless `--image-size HxW` resizes every image to that height and width
(bilinear, Pillow's, with its antialiasing when shrinking; the aspect ratio is not kept).
The first image decoded sets the shape; another that differs is one line naming both.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from tapeline.errors import ConfigError

IMAGE_SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"
CHANNELS = (1, 3)  # what --channels converts to
CONVERT_TO = {1: "L", 3: "RGB"}
KEPT = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # modes taken as they are: their channel counts
WIDENED = {"1": "L", "La": "LA", "RGBa": "RGBA", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


class SourceError(ConfigError):
    """A dataset's source cannot be used: bad input, one line naming the file; nothing was trained."""


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """`--image-size`'s "HxW" as (height, width); None without it."""
    if text is None:
        return None
    if not re.match(IMAGE_SIZE_PATTERN, text):
        raise SourceError(f"image_size {text!r} must be HEIGHTxWIDTH in pixels, like 32x32")
    height, width = text.split("x")
    return int(height), int(width)


class Decoder:
    """Decodes a dataset's images one by one, each to a uint8 array (height, width, channels) of the one shape."""

    def __init__(self, image_size: str | None = None, channels: int | None = None):
        self.size = parse_image_size(image_size)
        self.channels = channels
        self.first: tuple[str, tuple[int, ...]] | None = None  # the first image's name and shape: the others must match

    def decode(self, data: bytes | Path, name: str) -> np.ndarray:
        """The image in `data` (encoded bytes, or a file) as an array; SourceError naming `name` when it is not one."""
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
                image.load()
                array = self._convert(image, name)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # Pillow raises all of these
            raise SourceError(f"{name}: cannot decode it as an image ({str(error) or type(error).__name__})") from None
        return self._checked(array, name)

    def convert(self, array: np.ndarray, name: str) -> np.ndarray:
        """An image already decoded (a tensor of height, width[, channels] uint8), resized and converted as decoded ones are."""
        if array.dtype != np.uint8:
            raise SourceError(f"{name}: {array.dtype} pixels; images must be uint8")
        if array.ndim not in (2, 3):
            raise SourceError(f"{name}: a tensor of shape {list(array.shape)}; images are height x width [x channels]")
        if array.ndim == 2:
            array = array[..., None]
        if self.size is None and self.channels in (None, array.shape[2]):
            return self._checked(array, name)
        return self._checked(self._convert(Image.fromarray(array[..., 0] if array.shape[2] == 1 else array), name), name)

    def _convert(self, image: Image.Image, name: str) -> np.ndarray:
        if image.mode not in KEPT and image.mode not in WIDENED and image.mode != "P":
            raise SourceError(f"{name}: {image.mode} pixels (16-bit or floating point); images must have 8-bit channels")
        if self.channels is not None:
            image = image.convert(CONVERT_TO[self.channels])
        elif image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode in WIDENED:
            image = image.convert(WIDENED[image.mode])
        if self.size is not None and image.size != self.size[::-1]:
            image = image.resize(self.size[::-1], Image.Resampling.BILINEAR)  # Pillow's sizes are (width, height)
        array = np.asarray(image, dtype=np.uint8)
        return array[..., None] if array.ndim == 2 else array

    def _checked(self, array: np.ndarray, name: str) -> np.ndarray:
        if self.first is None:
            self.first = (name, array.shape)
            return array
        first, shape = self.first
        if array.shape[2] != shape[2]:
            raise SourceError(f"{name} has {array.shape[2]} channels, but {first} has {shape[2]}: make them one with --channels 1 or --channels 3")
        if array.shape != shape:
            raise SourceError(
                f"{name} is {array.shape[0]}x{array.shape[1]} pixels (height x width), but {first} is {shape[0]}x{shape[1]}: "
                "resize them all with --image-size HxW"
            )
        return array
