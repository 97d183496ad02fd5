"""Admission cost of GenerateImage on the VQGAN path: its 256 code tokens, not the denoising steps."""

from __future__ import annotations

from runtime.server.admission import request_cost
from runtime.server.config import LimitsConfig
from runtime.server.protos import personalization_pb2 as ppb


def test_vqgan_generate_image_costs_its_code_tokens() -> None:
    limits = LimitsConfig()
    vq = ppb.GenerateImageRequest(query="hat", steps=4, image_model=ppb.IMAGE_MODEL_VQGAN).SerializeToString()
    diffusion = ppb.GenerateImageRequest(query="hat", steps=4, image_model=ppb.IMAGE_MODEL_DIFFUSION).SerializeToString()
    assert request_cost("GenerateImage", vq, limits) == 256
    assert request_cost("GenerateImage", diffusion, limits) == 4
