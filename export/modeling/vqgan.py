"""VQGAN (taming-transformers' ``VQModel``) in plain PyTorch, with its state-dict names.

Written from the architecture description of "Taming Transformers for High-Resolution Image Synthesis"
(Esser et al.): a convolutional encoder and decoder built from

* ``ResnetBlock``: GroupNorm -> swish -> 3x3 conv -> GroupNorm -> swish -> dropout -> 3x3 conv, plus the
  input (through a 1x1 ``nin_shortcut`` conv when the width changes);
* ``AttnBlock``: single-head self-attention over the feature map (1x1 convs ``q``, ``k``, ``v``,
  ``proj_out``, scale 1/sqrt(C)) with a residual;
* ``Downsample``: zero padding on the right and bottom only, then a stride-2 3x3 conv;
* ``Upsample``: nearest-neighbour x2, then a 3x3 conv;

``quant_conv`` (z_channels -> embed_dim) and ``post_quant_conv`` (embed_dim -> z_channels) around the
``quantize`` vector quantizer, whose codebook is ``quantize.embedding`` (n_embed x embed_dim). A pixel
grid (N, 3, R, R) in [-1, 1] becomes (R / f)^2 code indices, f = 2^(len(ch_mult) - 1), row-major.

State-dict keys match taming's ``VQModel`` (``encoder.down.0.block.0.norm1.weight``, ...,
``quantize.embedding.weight``), so ``load_vqgan`` reads a ``model.ckpt`` (its ``state_dict``; the
training-only ``loss.*`` tensors are ignored). ``IMAGENET_F16_1024`` is the configuration of taming's
``vqgan_imagenet_f16_1024``; ``demo_vqgan_config`` is the same architecture at a fraction of the width
(GroupNorm with 8 groups instead of 32, the one knob taming does not expose), for seeded demo weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_FILE = "model.ckpt"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class VQGANConfig:
    """taming's ``ddconfig`` plus ``embed_dim`` / ``n_embed`` (``double_z`` is always False for VQGAN)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    num_groups: int = 32
    """GroupNorm groups (taming hard-codes 32)."""

    @property
    def factor(self) -> int:
        """Pixels per code along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        """Codes along each side."""
        return self.resolution // self.factor

    @property
    def num_codes(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ch_mult"] = list(self.ch_mult)
        data["attn_resolutions"] = list(self.attn_resolutions)
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> VQGANConfig:
        """From this class's ``to_dict`` or from taming's yaml ``model.params`` (``ddconfig`` nested)."""
        if "model" in data:
            data = data["model"].get("params", data["model"])
        flat = dict(data.get("ddconfig", {}))
        flat.update({k: v for k, v in data.items() if k != "ddconfig"})
        if flat.get("double_z"):
            raise ValueError("ddconfig.double_z is true: that is a KL autoencoder, not a VQGAN")
        known = {f for f in VQGANConfig.__dataclass_fields__}
        kwargs: dict[str, Any] = {k: v for k, v in flat.items() if k in known}
        for key in ("ch_mult", "attn_resolutions"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        return VQGANConfig(**kwargs)


IMAGENET_F16_1024 = VQGANConfig()
"""taming-transformers' ``vqgan_imagenet_f16_1024`` (256x256 pixels -> 16x16 codes out of 1024)."""


def demo_vqgan_config() -> VQGANConfig:
    """The seeded demo: the f16 / 1024-code layout at 1/16 of the width, one residual block per level."""
    return replace(IMAGENET_F16_1024, ch=8, num_res_blocks=1, z_channels=32, embed_dim=32, num_groups=8)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return skip + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).reshape(b, c, hh * ww)  # (B, C, HW)
        v = self.v(h).reshape(b, c, hh * ww)  # (B, C, HW)
        weights = torch.softmax(torch.bmm(q, k) / math.sqrt(c), dim=2)  # (B, HW_q, HW_k)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: ``block`` (ResnetBlocks), ``attn`` (one AttnBlock per block, or none) and an
    optional ``downsample`` / ``upsample``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.downsample: nn.Module | None = None
        self.upsample: nn.Module | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, c: VQGANConfig) -> None:
        super().__init__()
        g = c.num_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, 1, 1)
        res = c.resolution
        mults = (1, *c.ch_mult)
        self.down = nn.ModuleList()
        width = c.ch
        for level, mult in enumerate(c.ch_mult):
            stage = _Level()
            width, out = c.ch * mults[level], c.ch * mult
            for _ in range(c.num_res_blocks):
                stage.block.append(ResnetBlock(width, out, g, c.dropout))
                width = out
                if res in c.attn_resolutions:
                    stage.attn.append(AttnBlock(width, g))
            if level != len(c.ch_mult) - 1:
                stage.downsample = Downsample(width)
                res //= 2
            self.down.append(stage)
        self.mid = _Mid(width, g, c.dropout)
        self.norm_out = _norm(width, g)
        self.conv_out = nn.Conv2d(width, c.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VQGANConfig) -> None:
        super().__init__()
        g = c.num_groups
        width = c.ch * c.ch_mult[-1]
        res = c.grid
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, 1, 1)
        self.mid = _Mid(width, g, c.dropout)
        levels: list[_Level] = []
        for level in reversed(range(len(c.ch_mult))):
            stage = _Level()
            out = c.ch * c.ch_mult[level]
            for _ in range(c.num_res_blocks + 1):
                stage.block.append(ResnetBlock(width, out, g, c.dropout))
                width = out
                if res in c.attn_resolutions:
                    stage.attn.append(AttnBlock(width, g))
            if level != 0:
                stage.upsample = Upsample(width)
                res *= 2
            levels.insert(0, stage)  # up[0] is the full-resolution level, as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width, g)
        self.conv_out = nn.Conv2d(width, c.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest codebook entry by squared L2 distance (ties to the lowest index)."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) -> (N, h*w, n_embed): |z|^2 + |e|^2 - 2 z.e, positions row-major."""
        flat = z.flatten(2).transpose(1, 2)  # (N, hw, D)
        e = self.embedding.weight  # (K, D)
        return (flat * flat).sum(-1, keepdim=True) + (e * e).sum(-1) - 2.0 * flat @ e.t()

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) -> (N, h*w) int64."""
        return torch.argmin(self.distances(z), dim=-1)

    def lookup(self, indices: torch.Tensor, grid: int) -> torch.Tensor:
        """(N, grid*grid) int64 -> (N, D, grid, grid)."""
        z = self.embedding(indices)  # (N, hw, D)
        return z.transpose(1, 2).reshape(indices.shape[0], -1, grid, grid)


class VQModel(nn.Module):
    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)

    def pre_quant(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) in [-1, 1] -> (N, embed_dim, R/f, R/f), before quantization."""
        return self.quant_conv(self.encoder(pixels))

    def encode_indices(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) in [-1, 1] -> (N, (R/f)^2) int64 code indices, row-major."""
        return self.quantize.indices(self.pre_quant(pixels))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(N, grid^2) int64 -> (N, 3, R, R), nominally in [-1, 1] (not clamped)."""
        z = self.quantize.lookup(indices, self.cfg.grid)
        return self.decoder(self.post_quant_conv(z))


# -- checkpoints ----------------------------------------------------------------------------------


@dataclass
class LoadedVQGAN:
    model: VQModel
    source: dict[str, Any] = field(default_factory=dict)


class VQGANCheckpointError(RuntimeError):
    """The VQGAN checkpoint is missing, unreadable or does not match its configuration."""


def _config_for(directory: Path) -> VQGANConfig:
    """``config.json`` (this module's or taming's layout), else taming's ``*.yaml``, else the f16/1024 config."""
    if (directory / CONFIG_FILE).is_file():
        return VQGANConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")))
    for path in sorted(directory.glob("*.yaml")):
        import yaml

        return VQGANConfig.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))
    return IMAGENET_F16_1024


def load_vqgan(path: Path) -> LoadedVQGAN:
    """A directory with ``model.ckpt`` (and optionally its config), or the ``.ckpt`` file itself.

    Keys outside the VQModel (``loss.*``: discriminator and LPIPS) are dropped; a missing or
    mis-shaped VQModel tensor raises VQGANCheckpointError naming it.
    """
    path = Path(path)
    ckpt = path / CHECKPOINT_FILE if path.is_dir() else path
    if not ckpt.is_file():
        raise VQGANCheckpointError(f"{ckpt} not found: expected a VQGAN directory with {CHECKPOINT_FILE}")
    cfg = _config_for(ckpt.parent)
    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpicklable Lightning object, a truncated file
        raise VQGANCheckpointError(f"{ckpt} could not be read as a tensor checkpoint: {exc}") from exc
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise VQGANCheckpointError(f"{ckpt} holds no state_dict")
    model = VQModel(cfg)
    expected = model.state_dict()
    wanted = {k: v for k, v in state.items() if k in expected}
    missing = sorted(set(expected) - set(wanted))
    if missing:
        raise VQGANCheckpointError(
            f"{ckpt} lacks {len(missing)} VQModel tensors (first: {missing[0]}); is the config {cfg} right?"
        )
    for key, value in wanted.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise VQGANCheckpointError(
                f"{ckpt}: {key} has shape {tuple(value.shape)}, the config gives {tuple(expected[key].shape)}"
            )
    model.load_state_dict(wanted, strict=True)
    model.eval()
    return LoadedVQGAN(model, {"checkpoint": ckpt.name, "config": cfg.to_dict(),
                               "ignored_keys": len(state) - len(wanted)})


def build_demo_vqgan(directory: Path, seed: int = 0, cfg: VQGANConfig | None = None) -> Path:
    """Write a seeded VQGAN (``model.ckpt`` with a ``state_dict``, ``config.json``) to ``directory``.

    Random weights would decode every code to nearly the same grey; the codebook is spread instead
    (unit-variance entries) so that different codes give visibly different pixels.
    """
    cfg = cfg or demo_vqgan_config()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = VQModel(cfg)
        nn.init.normal_(model.quantize.embedding.weight)
    torch.save({"state_dict": model.state_dict()}, directory / CHECKPOINT_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    return directory
