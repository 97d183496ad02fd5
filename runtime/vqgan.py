"""The VQGAN image-code path: pixels <-> 16x16 code grids, and the catalog's codes cache.

``VQGANCodec`` runs the exported ``vqgan_encoder`` (pixels in [-1, 1] -> code indices) and
``vqgan_decoder`` (code indices -> pixels) graphs; tensor names and sizes come from the manifest entries
(see ``export/vqgan.py``). Images are stretch-resized (bicubic, no crop) to the VQGAN's resolution and
mapped to [-1, 1]; decoded pixels go back to 8-bit with ``round(255 * clip(x / 2 + 0.5, 0, 1))``.

``CodeStore`` is a ``LatentStore`` over ``CodeEncoder``: every catalog image's codes are computed once
(by ``unimp catalog encode``, or in the background after start-up, or on first use), memory-mapped from ``codes-*.npy`` shards
beside the latents, fingerprinted by the encoder graph, and invalidated with the catalog image.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.backends.base import Session
from runtime.manifest import GraphEntry, Manifest, ManifestError
from runtime.vision import ImageInput, LatentStore, decode_image

ENCODER_KEY, DECODER_KEY = "vqgan_encoder", "vqgan_decoder"
CODE_DTYPE = np.int64


@dataclass(frozen=True)
class VQGANSettings:
    resolution: int
    """Pixels per side of the VQGAN's images (256 for f16 / 1024)."""
    grid: int
    """Codes per side (16): a code image is grid * grid codes, row-major."""
    n_embed: int
    """Codebook size (1024): codes are 0..n_embed-1."""

    @property
    def num_codes(self) -> int:
        return self.grid * self.grid

    @staticmethod
    def from_entry(entry: GraphEntry) -> VQGANSettings:
        try:
            return VQGANSettings(int(entry.extra["resolution"]), int(entry.extra["grid"]), int(entry.extra["n_embed"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"the vqgan_decoder graph's settings are incomplete: {exc!r}") from exc


def _role(entry: GraphEntry, role: str) -> str:
    name = entry.extra.get("roles", {}).get(role)
    if not isinstance(name, str):
        raise ManifestError(f"graph {entry.file} names no tensor for the role {role!r}")
    return name


def _max_batch(entry: GraphEntry, name: str, default: int = 8) -> int:
    profile = entry.profiles.get(name, {})
    return int(profile["max"][0]) if "max" in profile else default


def to_unit_range(image: ImageInput, resolution: int) -> np.ndarray:
    """One image -> (3, R, R) float32 in [-1, 1]: RGB, bicubic stretch-resize to R x R."""
    rgb = decode_image(image).resize((resolution, resolution), Image.Resampling.BICUBIC)
    x = np.asarray(rgb, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)  # (R, R, 3)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def to_png(pixels: np.ndarray) -> bytes:
    """(3, H, W) in [-1, 1] -> PNG bytes."""
    rgb = np.round(255.0 * np.clip(pixels / 2.0 + 0.5, 0.0, 1.0)).astype(np.uint8).transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class VQGANCodec:
    """The two VQGAN graphs; thread-safe (the sessions are)."""

    def __init__(self, encoder: Session, decoder: Session, manifest: Manifest) -> None:
        enc, dec = manifest.graphs[ENCODER_KEY], manifest.graphs[DECODER_KEY]
        self.settings = VQGANSettings.from_entry(dec)
        self._encoder, self._decoder = encoder, decoder
        self._enc_in, self._enc_out = _role(enc, "pixels"), _role(enc, "codes")
        self._dec_in, self._dec_out = _role(dec, "codes"), _role(dec, "pixels")
        for session, names, graph in ((encoder, (self._enc_in, self._enc_out), enc), (decoder, (self._dec_in, self._dec_out), dec)):
            if names[0] not in session.input_names or names[1] not in session.output_names:
                raise ManifestError(f"graph {graph.file} lacks the tensors {names} its manifest entry names")
        self.encode_batch = _max_batch(enc, self._enc_in)
        self.decode_batch = _max_batch(dec, self._dec_in)
        self.fingerprint = hashlib.sha256(
            json.dumps({"sha256": enc.sha256, "file": enc.file, "resolution": self.settings.resolution,
                        "grid": self.settings.grid}, sort_keys=True).encode()
        ).hexdigest()
        self._lock = threading.Lock()
        self.images_encoded = 0

    @property
    def resolution(self) -> int:
        return self.settings.resolution

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, R, R) in [-1, 1] -> (N, grid * grid) int64 codes."""
        r = self.resolution
        if pixels.ndim != 4 or pixels.shape[1:] != (3, r, r):
            raise ValueError(f"pixels must have shape (N, 3, {r}, {r}), got {pixels.shape}")
        out = np.empty((len(pixels), self.settings.num_codes), CODE_DTYPE)
        for start in range(0, len(pixels), self.encode_batch):
            chunk = np.ascontiguousarray(pixels[start : start + self.encode_batch], dtype=np.float32)
            out[start : start + len(chunk)] = self._encoder.run({self._enc_in: chunk}, [self._enc_out])[self._enc_out]
            with self._lock:
                self.images_encoded += len(chunk)
        return out

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Encoded images -> (N, grid * grid) codes; bad bytes raise InvalidRequest(field="image")."""
        r = self.resolution
        pixels = np.stack([to_unit_range(i, r) for i in images]) if images else np.empty((0, 3, r, r), np.float32)
        return self.encode(pixels)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(N, grid * grid) codes in 0..n_embed-1 -> (N, 3, R, R) float32 pixels, nominally in [-1, 1]."""
        codes = np.asarray(codes, dtype=CODE_DTYPE)
        s = self.settings
        if codes.ndim != 2 or codes.shape[1] != s.num_codes:
            raise ValueError(f"codes must have shape (N, {s.num_codes}), got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= s.n_embed):
            raise ValueError(f"codes must be in 0..{s.n_embed - 1}")
        outs = [
            self._decoder.run({self._dec_in: codes[i : i + self.decode_batch]}, [self._dec_out])[self._dec_out]
            for i in range(0, len(codes), self.decode_batch)
        ]
        return np.concatenate(outs) if outs else np.empty((0, 3, s.resolution, s.resolution), np.float32)


class CodeEncoder:
    """The codec as a store encoder (``runtime.vision.ItemEncoder``): one image -> (grid * grid,) codes."""

    dtype = CODE_DTYPE

    def __init__(self, codec: VQGANCodec) -> None:
        self.codec = codec

    @property
    def item_shape(self) -> tuple[int, ...]:
        return (self.codec.settings.num_codes,)

    @property
    def max_batch(self) -> int:
        return self.codec.encode_batch

    @property
    def image_size(self) -> int:
        return self.codec.resolution

    def preprocess_one(self, image: ImageInput) -> np.ndarray:
        return to_unit_range(image, self.codec.resolution)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.codec.encode(pixels)

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        return self.codec.encode_images(images)


class CodeStore(LatentStore):
    """Every catalog image's VQGAN codes, memory-mapped (``codes-*.npy`` shards); see LatentStore."""

    SHARD_PREFIX = "codes-"
    KIND = "vqgan_codes"


def default_codes_dir(latent_dir: Path) -> Path:
    """The codes cache beside a latent cache directory: ``<latents>-vqgan-codes``."""
    latent_dir = Path(latent_dir)
    return latent_dir.with_name(f"{latent_dir.name}-vqgan-codes")
