"""The clip's picture (``<key>.jpg``): JPEG bytes -> a CLIP-normalised image array.

CLIP's own preprocessing (open_clip ``image_transform`` at evaluation): resize the shorter side to
``size`` (bicubic), centre-crop ``size x size``, RGB in [0, 1], then normalise by CLIP's channel means
and standard deviations. Deterministic, so both training and evaluation see the same pixels; only
which frame of a video's strip (``tiles``) is used differs (chosen by the loader).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from clapscale.shards.writer import MAX_IMAGE_BYTES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePlan:
    """Where a clip's ``size x size`` picture comes from in its stored JPEG (pixel units): the tile
    ``box`` (left, top, width, height), the tile scaled so its shorter side is ``size`` (``resized``:
    width, height; bicubic), and the centre crop's top-left corner in that (``crop``). One plan for
    both loaders: PIL executes it in the webdataset backend, DALI's decoder in the DALI backend."""

    box: tuple[int, int, int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]

    def source_window(self, size: int) -> tuple[float, float, float, float]:
        """The centre crop in the tile's own pixels (x0, y0, x1, y1; fractional): scaling just this
        window to ``size x size`` samples the same points as scaling the tile and then cropping."""
        sx, sy = self.box[2] / self.resized[0], self.box[3] / self.resized[1]
        x, y = self.crop
        return x * sx, y * sy, (x + size) * sx, (y + size) * sy

    def scales(self, size: int) -> bool:
        """False where the tile is already ``size x size`` (nothing to scale or crop)."""
        return self.box[2:] != (size, size)


def square_plan(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized (w, h), crop (left, top)) of CLIP's evaluation transform for a ``width x height`` image."""
    scale = size / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    return (w, h), ((w - size) // 2, (h - size) // 2)


def plan_image(width: int, height: int, size: int, tile: int = 0, tiles: int = 1) -> ImagePlan:
    """The plan for tile ``tile`` of a strip of ``tiles`` equal tiles side by side (a video's frames;
    1: the whole image). ``ValueError`` for a strip whose width is not a multiple of ``tiles``."""
    if width % tiles:
        raise ValueError(f"a strip of {tiles} frames must be a multiple of {tiles} wide, got {width}")
    tw = width // tiles
    resized, crop = square_plan(tw, height, size)
    return ImagePlan((tile * tw, 0, tw, height), resized, crop)


def image_size_of(data: bytes) -> tuple[int, int]:
    """(width, height) of an image from its header alone (nothing decoded). ``ValueError`` for
    bytes over ``MAX_IMAGE_BYTES`` or that are not an image."""
    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image of {len(data)} bytes exceeds {MAX_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"image does not decode ({exc})") from exc


def centre_square(im, size: int):
    """A PIL image -> its ``size x size`` centre crop after scaling the shorter side to ``size``
    (bicubic): CLIP's evaluation transform, and how make_shards stores video frames."""
    from PIL import Image

    (w, h), (left, top) = square_plan(*im.size, size)
    im = im.resize((w, h), Image.Resampling.BICUBIC)
    return im.crop((left, top, left + size, top + size))


def normalise(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB in [0, 1] -> CLIP-normalised float32 ``(3, H, W)``."""
    rgb = (rgb - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)


def decode_image(data: bytes, size: int, tile: int = 0, tiles: int = 1) -> np.ndarray:
    """JPEG bytes -> float32 ``(3, size, size)``, CLIP-normalised. ``ValueError`` for bytes that are
    not a decodable image or exceed ``MAX_IMAGE_BYTES``. With ``tiles`` > 1 the image is a strip of
    that many equal tiles side by side (a video's frames) and only tile ``tile`` is used."""
    from PIL import Image

    plan = plan_image(*image_size_of(data), size, tile, tiles)
    try:
        with Image.open(io.BytesIO(data)) as im:
            left, top, w, h = plan.box
            im = im.convert("RGB").crop((left, top, left + w, top + h)).resize(plan.resized, Image.Resampling.BICUBIC)
            left, top = plan.crop
            rgb = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"image does not decode ({exc})") from exc
    return normalise(rgb)
