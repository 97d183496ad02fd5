"""Typed configuration of the UniMP reference model (vision tower, resampler, language model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """An open_clip ``VisionTransformer``; OpenFlamingo keeps its patch tokens (CLS dropped)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    quick_gelu: bool = True
    """OpenAI CLIP weights use QuickGELU; open_clip's non-OpenAI models use exact GELU."""
    ln_post_on_tokens: bool = True
    """open_clip >= 2.23 applies ``ln_post`` to the patch tokens it returns; older releases did not."""

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class PerceiverConfig:
    """OpenFlamingo's resampler (its constructor fixes everything but ``dim``)."""

    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 64
    ff_mult: int = 4


@dataclass(frozen=True)
class LMConfig:
    """GPT-NeoX (Hugging Face ``GPTNeoXConfig`` field names) plus the gated cross-attention layout."""

    vocab_size: int = 50432
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_size: int = 10240
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = False
    hidden_act: str = "gelu"
    attention_bias: bool = True
    cross_attn_every_n_layers: int = 2
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def xattn_layers(self) -> list[int]:
        """Decoder layers preceded by a gated cross-attention block: (i + 1) % n == 0."""
        n = self.cross_attn_every_n_layers
        return [i for i in range(self.num_hidden_layers) if (i + 1) % n == 0]


@dataclass(frozen=True)
class UniMPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    only_attend_immediate_media: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> UniMPConfig:
        return UniMPConfig(
            vision=VisionConfig(**data["vision"]),
            perceiver=PerceiverConfig(**data["perceiver"]),
            lm=LMConfig(**data["lm"]),
            only_attend_immediate_media=data.get("only_attend_immediate_media", True),
        )


def tiny_config(vocab_size: int) -> UniMPConfig:
    """Test-sized model: seconds to build, export and run."""
    return UniMPConfig(
        vision=VisionConfig(patch_size=32, width=64, layers=2, heads=2, quick_gelu=False),
        lm=LMConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=1024,
        ),
    )


def small_config(vocab_size: int) -> UniMPConfig:
    """Benchmark-sized model (~200-250M parameters): ViT-B/16-sized vision, 12-layer 768-wide GPT-NeoX."""
    return UniMPConfig(
        vision=VisionConfig(patch_size=16, width=768, layers=12, heads=12, quick_gelu=True),
        lm=LMConfig(
            vocab_size=vocab_size,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=2048,
        ),
    )
