"""The clip's picture (``<key>.jpg``): JPEG bytes -> a CLIP-normalised image array.

CLIP's own preprocessing (open_clip ``image_transform`` at evaluation): resize the shorter side to
``size`` (bicubic), centre-crop ``size x size``, RGB in [0, 1], then normalise by CLIP's channel means
and standard deviations. Deterministic, so both training and evaluation see the same pixels; only
which frame of a video's strip (``tiles``) is used differs (chosen by the loader).
"""

from __future__ import annotations

import io

import numpy as np

from clapscale.shards.writer import MAX_IMAGE_BYTES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def centre_square(im, size: int):
    """A PIL image -> its ``size x size`` centre crop after scaling the shorter side to ``size``
    (bicubic): CLIP's evaluation transform, and how make_shards stores video frames."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def decode_image(data: bytes, size: int, tile: int = 0, tiles: int = 1) -> np.ndarray:
    """JPEG bytes -> float32 ``(3, size, size)``, CLIP-normalised. ``ValueError`` for bytes that are
    not a decodable image or exceed ``MAX_IMAGE_BYTES``. With ``tiles`` > 1 the image is a strip of
    that many equal tiles side by side (a video's frames) and only tile ``tile`` is used."""
    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image of {len(data)} bytes exceeds {MAX_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            w, h = im.size
            if tiles > 1:
                if w % tiles:
                    raise ValueError(f"a strip of {tiles} frames must be a multiple of {tiles} wide, got {w}")
                im = im.crop((tile * (w // tiles), 0, (tile + 1) * (w // tiles), h))
            rgb = np.asarray(centre_square(im, size), dtype=np.float32) / 255.0
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"image does not decode ({exc})") from exc
    rgb = (rgb - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))
