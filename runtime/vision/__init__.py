"""Images -> media latents -> cross-attention K/V: preprocessing, the vision graph, the catalog stores.

preprocess (decode, resize, crop, normalise) -> encoder (vision graph) -> store (per-item latents on disk)
-> media_kv (per-item cross-attention K/V, and a prompt's memory) -> catalog_encode (filling the stores).
"""

from runtime.vision.encoder import LATENT_DTYPE, VisionEncoder, vision_fingerprint
from runtime.vision.preprocess import ImageInput, decode_image, preprocess, preprocess_one
from runtime.vision.store import (
    ImageCatalog,
    ItemEncoder,
    ItemStore,
    LatentStore,
    default_cache_dir,
    usable_cache_dir,
)

__all__ = [
    "LATENT_DTYPE", "ImageCatalog", "ImageInput", "ItemEncoder", "ItemStore", "LatentStore", "VisionEncoder",
    "decode_image", "default_cache_dir", "preprocess", "preprocess_one", "usable_cache_dir", "vision_fingerprint",
]
