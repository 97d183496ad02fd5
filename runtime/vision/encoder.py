"""The vision graph: preprocessed pixels -> media latents (batched), and the fingerprint of its output."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence

import numpy as np

from runtime.backends.base import Session
from runtime.manifest import Manifest, ManifestError
from runtime.vision.preprocess import ImageInput, preprocess, preprocess_one

log = logging.getLogger(__name__)

LATENT_DTYPE = np.float32

class VisionEncoder:
    """The vision graph (CLIP patch tokens -> Perceiver resampler): pixels -> media latents.

    Tensor names, sizes and normalisation come from the manifest. Thread-safe (the session is).
    """

    def __init__(self, session: Session, manifest: Manifest, max_batch: int | None = None) -> None:
        names = manifest.names
        if names.pixel_values not in session.input_names:
            raise ManifestError(f"vision graph has no input {names.pixel_values!r} (has {session.input_names})")
        if names.media_latents not in session.output_names:
            raise ManifestError(f"vision graph has no output {names.media_latents!r} (has {session.output_names})")
        self._session = session
        self._input = names.pixel_values
        self._output = names.media_latents
        self.image_size = manifest.vision.image_size
        self.num_latents = manifest.vision.num_latents
        self.width = manifest.vision.width
        self.mean = tuple(manifest.vision.mean)
        self.std = tuple(manifest.vision.std)
        entry = manifest.graphs.get("vision")
        self._input_dtype = np.dtype(entry.input(self._input).dtype) if entry is not None else np.dtype(np.float32)
        if max_batch is None:  # the largest batch the graph was profiled for, if any
            profile = entry.profiles.get(self._input, {}) if entry is not None else {}
            max_batch = int(profile["max"][0]) if "max" in profile else 16
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self.calls = 0
        """Session runs so far."""
        self.images_encoded = 0

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one image's output: (num_latents, width)."""
        return (self.num_latents, self.width)

    dtype = LATENT_DTYPE

    def preprocess_one(self, image: ImageInput) -> np.ndarray:
        """One image -> (3, S, S) float32 with this model's size and normalisation."""
        return preprocess_one(image, self.image_size, self.mean, self.std)

    def preprocess(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(N,) images -> (N, 3, S, S) float32 with this model's size and normalisation."""
        return preprocess(images, self.image_size, self.mean, self.std)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) pixels -> (N, num_latents, width) float32, in chunks of at most ``max_batch`` images."""
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"pixels must have shape (N, 3, {s}, {s}), got {pixels.shape}")
        n = pixels.shape[0]
        out = np.empty((n, self.num_latents, self.width), dtype=LATENT_DTYPE)  # (N, n_lat, D)
        for start in range(0, n, self.max_batch):
            chunk = np.ascontiguousarray(pixels[start : start + self.max_batch], dtype=self._input_dtype)
            latents = self._session.run({self._input: chunk}, [self._output])[self._output]
            out[start : start + len(chunk)] = latents
            with self._lock:
                self.calls += 1
                self.images_encoded += len(chunk)
        return out

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Encoded images -> (N, num_latents, width); bad bytes raise InvalidRequest(field="image")."""
        return self.encode(self.preprocess(images))


def vision_fingerprint(manifest: Manifest) -> str:
    """Identifies everything that determines an image's latents: the vision graph and its preprocessing."""
    entry = manifest.graphs.get("vision")
    v = manifest.vision
    key = {
        "graph_sha256": entry.sha256 if entry is not None else "",
        "graph_file": entry.file if entry is not None else "",
        "precision": entry.precision if entry is not None else "",
        "image_size": v.image_size,
        "mean": list(v.mean),
        "std": list(v.std),
        "num_latents": v.num_latents,
        "width": v.width,
        "dtype": np.dtype(LATENT_DTYPE).name,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
