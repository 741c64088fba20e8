"""The clip's picture (``<key>.jpg``): JPEG bytes -> a CLIP-normalised image array.

CLIP's own preprocessing (open_clip ``image_transform`` at evaluation): resize the shorter side to
``size`` (bicubic), centre-crop ``size x size``, RGB in [0, 1], then normalise by CLIP's channel means
and standard deviations. Deterministic, so both training and evaluation see the same pixels; only
which frame of a video's strip (``tiles``) is used differs (chosen by the loader).
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from clapscale.shards.writer import MAX_IMAGE_BYTES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePlan:
    """Where a clip's ``size x size`` picture comes from in its stored JPEG: the tile ``box`` (left,
    top, width, height, in pixels) to which CLIP's evaluation transform applies (shorter side scaled
    to ``size``, bicubic, then the centre crop). One plan for both loaders: PIL executes it in the
    webdataset backend, DALI's decoder in the DALI backend."""

    box: tuple[int, int, int, int]
    size: int

    def window(self) -> tuple[float, float, float, float]:
        """The centre crop in the tile's own pixels (x0, y0, x1, y1; fractional): scaling just this
        window to ``size x size`` samples the same points as scaling the tile and then cropping."""
        w, h = self.box[2:]
        (rw, rh), (x, y) = square_plan(w, h, self.size)
        sx, sy = w / rw, h / rh
        return x * sx, y * sy, (x + self.size) * sx, (y + self.size) * sy

    @property
    def scales(self) -> bool:
        """False where the tile is already ``size x size`` (nothing to scale or crop)."""
        return self.box[2:] != (self.size, self.size)


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
    return ImagePlan((tile * tw, 0, tw, height), size)


@contextmanager
def _opened(data: bytes):
    """The PIL image of ``data``; ``ValueError`` for bytes over ``MAX_IMAGE_BYTES`` or that are not
    (or, once decoding starts in the body, turn out not to be) a decodable image."""
    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image of {len(data)} bytes exceeds {MAX_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            yield im
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"image does not decode ({exc})") from exc


def image_size_of(data: bytes) -> tuple[int, int]:
    """(width, height) of an image from its header alone (nothing decoded); ``ValueError`` as ``_opened``."""
    with _opened(data) as im:
        return im.size


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
    with _opened(data) as im:
        left, top, w, h = plan_image(*im.size, size, tile, tiles).box
        rgb = np.asarray(centre_square(im.convert("RGB").crop((left, top, left + w, top + h)), size),
                         dtype=np.float32) / 255.0
    return normalise(rgb)
