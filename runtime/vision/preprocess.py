"""UniMP image preprocessing: decode (size- and format-checked), resize, centre-crop, normalise."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.types import InvalidRequest

log = logging.getLogger(__name__)

ImageInput = bytes | Image.Image


def decode_image(data: ImageInput) -> Image.Image:
    """Decode encoded bytes (PNG, JPEG, ...) into an RGB image; bad bytes raise InvalidRequest(field="image")."""
    if isinstance(data, Image.Image):
        return data if data.mode == "RGB" else data.convert("RGB")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidRequest(f"image must be encoded bytes or a PIL image, not {type(data).__name__}", field="image")
    if len(data) == 0:
        raise InvalidRequest("image is empty", field="image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"image could not be decoded: {exc}", field="image") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data inside a known format
        raise InvalidRequest(f"image is corrupt or truncated: {exc}", field="image") from exc


def preprocess_one(image: ImageInput, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """One image -> (3, size, size) float32; see ``preprocess``."""
    rgb = decode_image(image)
    # stretch to exactly size x size (no crop, aspect ratio not kept), as Resize((s, s), BICUBIC) does on PIL
    resized = rgb.resize((size, size), Image.Resampling.BICUBIC)
    x: np.ndarray = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # (S, S, 3) in [0, 1]
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)


def preprocess(
    images: Sequence[ImageInput], size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """UniMP preprocessing: RGB, bicubic stretch-resize to ``size`` x ``size``, /255, CLIP normalisation.

    Returns (N, 3, size, size) float32. Undecodable bytes raise InvalidRequest(field="image").
    """
    out = np.empty((len(images), 3, size, size), dtype=np.float32)  # (N, 3, S, S)
    for i, image in enumerate(images):
        out[i] = preprocess_one(image, size, mean, std)
    return out


# -- encoder ---------------------------------------------------------------------------------------


