"""PyTorch reference of UniMP (export-time only; the runtime never imports torch)."""

from export.modeling.config import LMConfig, PerceiverConfig, UniMPConfig, VisionConfig
from export.modeling.model import UniMP

__all__ = ["LMConfig", "PerceiverConfig", "UniMP", "UniMPConfig", "VisionConfig"]
