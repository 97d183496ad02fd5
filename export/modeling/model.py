"""The UniMP reference model: vision tower -> Perceiver -> GPT-NeoX with gated cross-attention."""

from __future__ import annotations

import torch
from torch import nn

from export.modeling.config import UniMPConfig
from export.modeling.lm import KV, FlamingoLM
from export.modeling.vision import PerceiverResampler, VisionTower


class UniMP(nn.Module):
    def __init__(self, cfg: UniMPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.perceiver = PerceiverResampler(cfg.vision.width, cfg.perceiver)
        self.lm = FlamingoLM(cfg.lm, cfg.vision.width, cfg.perceiver.num_latents)

    @property
    def num_latents(self) -> int:
        return self.cfg.perceiver.num_latents

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels -> (N, num_latents, Dv) media latents."""
        return self.perceiver(self.vision(pixels))

    def empty_past(self, batch: int) -> list[KV]:
        c = self.cfg.lm
        z = torch.zeros(batch, c.num_attention_heads, 0, c.head_dim)
        return [(z, z) for _ in range(c.num_hidden_layers)]

    def sequence_memory(self, latents: list[torch.Tensor]) -> list[KV]:
        """Per-row media latents (each (M_b, n, Dv), M_b may be 0) -> batched memory per block, (B, h, M*n, dh).

        Rows with fewer images are padded with zero images that no token's text_time can select.
        """
        m = max(1, max(lat.shape[0] for lat in latents))
        n, dv = self.num_latents, self.cfg.vision.width
        padded = torch.zeros(len(latents), m, n, dv)
        for b, lat in enumerate(latents):
            padded[b, : lat.shape[0]] = lat
        flat = self.lm.media_memory(padded.reshape(-1, n, dv))  # per block (B*M, h, n, dh)
        out = []
        for k, v in flat:
            h, dh = k.shape[1], k.shape[3]
            k = k.reshape(len(latents), m, h, n, dh).transpose(1, 2).reshape(len(latents), h, m * n, dh)
            v = v.reshape(len(latents), m, h, n, dh).transpose(1, 2).reshape(len(latents), h, m * n, dh)
            out.append((k, v))
        return out

    def full_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        latents: list[torch.Tensor],
        image_token_id: int,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full-recompute reference: logits (B, T, V) for a (left-padded) batch, no cache.

        text_time is the inclusive cumulative count of ``<image>`` tokens (OpenFlamingo's media_locations.cumsum).
        position_ids default to the padding-aware ``cumsum(mask) - 1`` used by generation.
        """
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        text_time = (input_ids == image_token_id).long().cumsum(-1)
        memory = self.sequence_memory(latents)
        hidden, _ = self.lm(input_ids, position_ids, attention_mask, text_time, self.empty_past(input_ids.shape[0]), memory)
        return self.lm.logits(hidden)
