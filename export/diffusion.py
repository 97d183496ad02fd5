"""Latent diffusion (Stable Diffusion 1.x/2.x layout) -> three validated ONNX graphs + a tokenizer.json.

Source: a diffusers-format directory (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), loaded from local files only. ``build_demo_diffusion`` writes a seeded tiny one.

Graphs (files under ``<out>/diffusion/``; tensor names come from the specs below and reach the runtime
through the manifest):

* ``text_encoder``: input_ids (B, L) int64 -> last_hidden_state (B, L, D). L is the text max length
  (77 for SD; the tokenizer pads and truncates to it).
* ``unet``: sample (N, C, h, w), timestep (1,) float32, encoder_hidden_states (N, L, D) -> noise_pred
  (N, C, h, w). N = 2B under classifier-free guidance (uncond rows first). Traced at a latent size the
  UNet's down/up path does not divide, so each upsampler resizes to its skip tensor's shape and one
  graph serves every latent size (even and odd), not only multiples of 2^(levels - 1).
* ``vae_decoder``: latents (N, C, h, w), already divided by the VAE scaling factor -> image
  (N, 3, 8h, 8w) in [-1, 1] (the factor is 2^(levels - 1) of the VAE).

What the runtime needs besides tensors goes into ``GraphEntry.extra`` (one place, no side files):

* every entry: ``roles`` (role -> tensor name: the runtime hard-codes no tensor name) and ``validation``.
* ``text_encoder.extra["tokenizer"]``: file, sha256, bos_id, eos_id, pad_id, max_length. The runtime
  encodes without special tokens, truncates to max_length - 2, adds bos/eos and pads with pad_id,
  which is what CLIP's tokenizer does with ``padding="max_length", truncation=True``.
* ``unet.extra``: scheduler_config (the diffusers dict), latent_channels, vae_scale_factor (pixels per
  latent), vae_scaling_factor, vae_shift_factor, image_size {min, opt, max, multiple} (pixels),
  max_batch (images per request), text_max_length, text_hidden_size.

``export_diffusion`` returns ``DiffusionExport(graphs, meta, files)``: graphs keyed "text_encoder",
"unet", "vae_decoder"; meta, a short summary for ``Manifest.diffusion``; files, {path: sha256} of the
non-graph files (tokenizer.json, external weight files) for ``Manifest.files``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import onnx
import torch
from torch import nn
from tqdm import tqdm

from export.graphs import OPSET, export_graph, graph_entry, validate_graph
from export.specs import GraphSpec, Shapes
from runtime.manifest import GraphEntry, Manifest, TensorSpec, sha256_file

log = logging.getLogger(__name__)

SUBDIR = "diffusion"
TOKENIZER_FILE = f"{SUBDIR}/tokenizer.json"
KEYS = ("text_encoder", "unet", "vae_decoder")

# Demo vocabulary: words of retail image prompts (the demo tokenizer is trained on these locally).
_DEMO_WORDS = (
    "a an the of with and in on for photo picture product image studio shot white background "
    "red blue green black white brown beige grey pink yellow orange purple gold silver "
    "leather cotton wool denim silk linen suede canvas metal wooden ceramic glass plastic "
    "shoe shoes boot boots sneaker sneakers sandal bag backpack hat cap jacket coat dress shirt "
    "t-shirt sweater jeans skirt watch lamp chair table sofa mug cup camera phone headphones "
    "vintage modern classic sporty elegant casual minimalist retro cozy summer winter kitchen "
    "garden outdoor running hiking office travel kids women men style fashion new best quality"
)
_DEMO_SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<|unk|>")


class DiffusionExport(NamedTuple):
    graphs: dict[str, GraphEntry]
    """"text_encoder", "unet", "vae_decoder" -> entries (settings in extra; see the module docstring)."""
    meta: dict[str, Any]
    """Summary for Manifest.diffusion (scheduler class, image sizes, source)."""
    files: dict[str, str]
    """Non-graph files (relative to the artifacts root) -> sha256: tokenizer.json, external weights."""


class DiffusionExportError(RuntimeError):
    """The source directory is unusable or a graph failed validation."""


# -- demo model -----------------------------------------------------------------------------------


def _demo_tokenizer(max_length: int) -> Any:
    """A WordLevel tokenizer trained locally, with CLIP's special tokens and post-processing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    bos, eos, unk = _DEMO_SPECIAL
    tok = Tokenizer(models.WordLevel(unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [_DEMO_WORDS, ", . ! ? - ' & /"]
    tok.train_from_iterator(
        corpus, trainers.WordLevelTrainer(vocab_size=4096, special_tokens=list(_DEMO_SPECIAL))
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
    )
    tok.enable_truncation(max_length)
    return tok


def build_demo_diffusion(directory: Path, seed: int = 0) -> Path:
    """Write a seeded tiny Stable-Diffusion-layout directory (random weights; nothing is downloaded).

    Text encoder: CLIP, 2 layers x 32 wide, 16 tokens. UNet: 2 levels (32, 64), cross-attention 32, native
    8x8 latents. VAE: 4 levels (8 px per latent, so 64x64 images), 4 latent channels. Scheduler: DDIM
    with Stable Diffusion 1.x betas. Tokenizer: a WordLevel vocabulary trained here, CLIP special tokens.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    max_length = 16

    tok = _demo_tokenizer(max_length)
    tok_dir = directory / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    bos, eos, unk = _DEMO_SPECIAL
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": eos,  # CLIP (SD 1.x) pads with <|endoftext|>
        "model_max_length": max_length,
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")

    # one fork per component so each one's weights depend only on the seed, not on build order
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder: Any = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=tok.get_vocab_size(),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=max_length,
                projection_dim=32,
                bos_token_id=tok.token_to_id(bos),
                eos_token_id=tok.token_to_id(eos),
                pad_token_id=tok.token_to_id(eos),
            )
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        unet: Any = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed + 2)
        vae: Any = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        )
    scheduler: Any = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    text_encoder.save_pretrained(directory / "text_encoder")
    unet.save_pretrained(directory / "unet")
    vae.save_pretrained(directory / "vae")
    scheduler.save_pretrained(directory / "scheduler")
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    log.info("wrote the tiny demo diffusion model to %s", directory)
    return directory


# -- loading --------------------------------------------------------------------------------------


class _Source(NamedTuple):
    text_encoder: Any
    """transformers CLIPTextModel (Any: its config attributes are dynamic)."""
    unet: Any
    """diffusers UNet2DConditionModel."""
    vae: Any
    """diffusers AutoencoderKL."""
    tokenizer: Any
    """transformers tokenizer (its backend is a ``tokenizers.Tokenizer``)."""
    scheduler_config: dict[str, Any]


def _load_source(source_dir: Path) -> _Source:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    source_dir = Path(source_dir)
    missing = [
        d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (source_dir / d).is_dir()
    ]
    if missing:
        raise DiffusionExportError(
            f"{source_dir} is not a diffusers Stable Diffusion directory: missing {', '.join(missing)}/"
        )
    # local files only: an export never reaches a model hub
    text_encoder = CLIPTextModel.from_pretrained(source_dir / "text_encoder", local_files_only=True).eval()
    # low_cpu_mem_usage=False: the default path wants accelerate, and only warns without it
    unet = UNet2DConditionModel.from_pretrained(
        source_dir / "unet", local_files_only=True, low_cpu_mem_usage=False
    ).eval()
    vae = AutoencoderKL.from_pretrained(
        source_dir / "vae", local_files_only=True, low_cpu_mem_usage=False
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(source_dir / "tokenizer", local_files_only=True)
    if (
        unet.config.get("time_cond_proj_dim") is not None
        or unet.config.get("addition_embed_type") is not None
    ):
        raise DiffusionExportError(
            "only SD 1.x/2.x UNets are supported (no time_cond_proj / added conditions)"
        )
    config = json.loads((source_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return _Source(text_encoder, unet, vae, tokenizer, config)


# -- specs ----------------------------------------------------------------------------------------


class _TextEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state  # (B, L, D)


class _UNet(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet: Any = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        # timestep (1,) is broadcast over the N rows inside the UNet
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae: Any = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]  # (N, 3, 8h, 8w)


class _Dims(NamedTuple):
    """Everything the specs derive from the loaded model, resolved once."""

    text_length: int
    text_hidden: int
    vocab_size: int
    latent_channels: int
    vae_scale_factor: int
    unet_up_factor: int
    image_min: int
    image_opt: int
    image_max: int
    max_batch: int


def _dims(src: _Source, max_batch: int) -> _Dims:
    te, unet, vae = src.text_encoder.config, src.unet.config, src.vae.config
    length = int(te.max_position_embeddings)
    model_max = getattr(src.tokenizer, "model_max_length", length)
    if isinstance(model_max, int) and 0 < model_max < length:
        length = model_max
    vae_factor = 2 ** (len(vae.block_out_channels) - 1)
    size = unet.sample_size
    latent = int(size[0] if isinstance(size, (list, tuple)) else size)
    opt = latent * vae_factor
    # pixels; at least 2 latents per side (1-sized dims specialise traced graphs)
    lo = max(2 * vae_factor, (opt // 2) // vae_factor * vae_factor)
    return _Dims(
        text_length=length,
        text_hidden=int(te.hidden_size),
        vocab_size=int(te.vocab_size),
        latent_channels=int(unet.in_channels),
        vae_scale_factor=vae_factor,
        unet_up_factor=2 ** (len(unet.block_out_channels) - 1),
        image_min=lo,
        image_opt=opt,
        image_max=opt * 2,
        max_batch=max_batch,
    )


def _profile(shape: list[int | str], lo: Shapes, opt: Shapes, hi: Shapes) -> dict[str, list[int]]:
    def concrete(dims: Shapes) -> list[int]:
        return [d if isinstance(d, int) else dims[d] for d in shape]

    return {"min": concrete(lo), "opt": concrete(opt), "max": concrete(hi)}


def _generator(dims: Shapes) -> torch.Generator:
    return torch.Generator().manual_seed(
        sum((i + 1) * 7919 * v for i, v in enumerate(dims.values())) % (2**31)
    )


def text_encoder_spec(src: _Source, d: _Dims) -> GraphSpec:
    ids = TensorSpec("input_ids", "int64", ["batch", d.text_length])
    hidden = TensorSpec("last_hidden_state", "float32", ["batch", d.text_length, d.text_hidden])

    def sample(dims: Shapes) -> dict[str, torch.Tensor]:
        return {
            ids.name: torch.randint(
                0, d.vocab_size, (dims["batch"], d.text_length), generator=_generator(dims)
            )
        }

    lo, opt, hi = {"batch": 1}, {"batch": 2}, {"batch": 2 * d.max_batch}
    return GraphSpec(
        "text_encoder", _TextEncoder(src.text_encoder), [ids], [hidden], sample, {"batch": 2},
        [{"batch": 3}, {"batch": 1}], profiles={ids.name: _profile(ids.shape, lo, opt, hi)}, atol=1e-4, rtol=1e-3,
    )  # fmt: skip


def _latent_dims(d: _Dims, pixels: int) -> int:
    return pixels // d.vae_scale_factor


def _odd_latent(d: _Dims) -> tuple[int, int]:
    """Trace size: the UNet's up factor must not divide it (see the module docstring), non-square."""
    h = _latent_dims(d, d.image_opt) + 1
    w = _latent_dims(d, d.image_opt) - 1
    while d.unet_up_factor > 1 and (h % d.unet_up_factor == 0 or w % d.unet_up_factor == 0):
        h, w = h + 1, w - 1
    return h, w


def unet_spec(src: _Source, d: _Dims) -> GraphSpec:
    c, length, width = d.latent_channels, d.text_length, d.text_hidden
    sample_in = TensorSpec("sample", "float32", ["batch", c, "latent_height", "latent_width"])
    timestep = TensorSpec("timestep", "float32", [1])
    context = TensorSpec("encoder_hidden_states", "float32", ["batch", length, width])
    noise = TensorSpec("noise_pred", "float32", ["batch", c, "latent_height", "latent_width"])

    def sample(dims: Shapes) -> dict[str, torch.Tensor]:
        g = _generator(dims)
        b, h, w = dims["batch"], dims["latent_height"], dims["latent_width"]
        return {
            sample_in.name: torch.randn(b, c, h, w, generator=g),
            timestep.name: torch.tensor([float(dims["timestep"])]),
            context.name: torch.randn(b, length, width, generator=g),
        }

    lat_lo, lat_opt, lat_hi = (_latent_dims(d, p) for p in (d.image_min, d.image_opt, d.image_max))
    lo = {"batch": 1, "latent_height": lat_lo, "latent_width": lat_lo}
    opt = {"batch": 2, "latent_height": lat_opt, "latent_width": lat_opt}
    hi = {"batch": 2 * d.max_batch, "latent_height": lat_hi, "latent_width": lat_hi}
    h, w = _odd_latent(d)
    checks = [
        {"batch": 4, "latent_height": lat_opt, "latent_width": lat_opt, "timestep": 437},
        {"batch": 1, "latent_height": lat_lo + 1, "latent_width": lat_lo, "timestep": 21},
    ]
    profiles = {
        sample_in.name: _profile(sample_in.shape, lo, opt, hi),
        timestep.name: {"min": [1], "opt": [1], "max": [1]},
        context.name: _profile(context.shape, lo, opt, hi),
    }
    return GraphSpec(
        "unet", _UNet(src.unet), [sample_in, timestep, context], [noise], sample,
        {"batch": 2, "latent_height": h, "latent_width": w, "timestep": 981}, checks,
        profiles=profiles, atol=1e-4, rtol=1e-3,
    )  # fmt: skip


def vae_decoder_spec(src: _Source, d: _Dims) -> GraphSpec:
    c = d.latent_channels
    latents = TensorSpec("latents", "float32", ["batch", c, "latent_height", "latent_width"])
    image = TensorSpec("image", "float32", ["batch", 3, "image_height", "image_width"])
    scale = float(src.vae.config.scaling_factor)

    def sample(dims: Shapes) -> dict[str, torch.Tensor]:
        b, h, w = dims["batch"], dims["latent_height"], dims["latent_width"]
        # what the runtime feeds: unit-variance latents divided by the scaling factor
        return {latents.name: torch.randn(b, c, h, w, generator=_generator(dims)) / scale}

    lat_lo, lat_opt, lat_hi = (_latent_dims(d, p) for p in (d.image_min, d.image_opt, d.image_max))
    lo = {"batch": 1, "latent_height": lat_lo, "latent_width": lat_lo}
    opt = {"batch": 1, "latent_height": lat_opt, "latent_width": lat_opt}
    hi = {"batch": d.max_batch, "latent_height": lat_hi, "latent_width": lat_hi}
    h, w = _odd_latent(d)
    checks = [
        {"batch": 1, "latent_height": lat_opt, "latent_width": lat_opt},
        {"batch": 3, "latent_height": lat_lo, "latent_width": lat_lo + 1},
    ]
    return GraphSpec(
        "vae_decoder", _VaeDecoder(src.vae), [latents], [image], sample,
        {"batch": 2, "latent_height": h, "latent_width": w}, checks,
        profiles={latents.name: _profile(latents.shape, lo, opt, hi)}, atol=1e-3, rtol=1e-3,
    )  # fmt: skip


def diffusion_specs(src: _Source, max_batch: int = 4) -> list[GraphSpec]:
    d = _dims(src, max_batch)
    return [text_encoder_spec(src, d), unet_spec(src, d), vae_decoder_spec(src, d)]


# -- export ---------------------------------------------------------------------------------------


def _export_to(spec: GraphSpec, root: Path, rel: str) -> list[str]:
    """Export ``spec`` to ``root/rel``; returns extra files written next to it (external weights).

    The legacy exporter spills graphs over 2 GB into one file per tensor beside the graph; exporting
    into a scratch directory and re-saving keeps the artifacts to ``<name>.onnx`` + ``<name>.onnx.data``.
    """
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}-") as scratch:
        tmp = Path(scratch) / target.name
        export_graph(spec, tmp)
        proto = onnx.load(str(tmp), load_external_data=False)
        external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
        if not external:
            shutil.move(str(tmp), target)
            return []
        data_name = f"{target.name}.data"
        (target.parent / data_name).unlink(missing_ok=True)
        full = onnx.load(str(tmp), load_external_data=True)
        onnx.save_model(full, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)  # fmt: skip
        return [str(Path(rel).parent / data_name)] if (target.parent / data_name).is_file() else []


def export_tokenizer(tokenizer: Any, root: Path, rel: str, max_length: int) -> dict[str, Any]:
    """Save a transformers tokenizer's ``tokenizers`` backend to ``root/rel`` for the torch-free runtime.

    Padding and truncation are switched off in the saved file: the runtime pads and truncates itself
    from the ids returned here (CLIP pads with <|endoftext|> in SD 1.x and with "!" in SD 2.x).
    Returns the ``text_encoder.extra["tokenizer"]`` record.
    """
    backend = type(tokenizer.backend_tokenizer).from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(path))
    eos = tokenizer.eos_token_id
    if tokenizer.bos_token_id is None or eos is None:
        raise DiffusionExportError("the tokenizer has no bos/eos token: not a CLIP tokenizer")
    return {
        "file": rel,
        "sha256": sha256_file(path),
        "bos_id": int(tokenizer.bos_token_id),
        "eos_id": int(eos),
        "pad_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos),
        "max_length": int(max_length),
    }


def _extra_common(spec: GraphSpec, report: Mapping[str, Any]) -> dict[str, Any]:
    roles = {s.name: s.name for s in [*spec.inputs, *spec.outputs]}
    return {"roles": roles, "validation": dict(report)}


def export_diffusion(
    source_dir: Path, out_dir: Path, progress: bool = True, *, max_batch: int = 4
) -> DiffusionExport:
    """Export the text encoder, UNet and VAE decoder of ``source_dir`` under ``out_dir/diffusion/``.

    Every graph is validated on ONNX Runtime against PyTorch (several shapes, the spec's tolerance)
    before its entry is returned; a failure raises ValueError naming the graph. ``max_batch`` is the
    most images one request may generate (the UNet's bound is twice that, for guidance).
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    steps = tqdm(total=2 + 2 * len(KEYS), desc="diffusion", unit="step", disable=not progress)
    steps.set_postfix_str("loading")
    src = _load_source(source_dir)
    d = _dims(src, max_batch)
    specs = diffusion_specs(src, max_batch)
    steps.update()

    graphs: dict[str, GraphEntry] = {}
    files: dict[str, str] = {}
    reports: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for spec in specs:
            rel = f"{SUBDIR}/{spec.name}.onnx"
            steps.set_postfix_str(f"exporting {spec.name}")
            t0 = time.perf_counter()
            for extra_file in _export_to(spec, out_dir, rel):
                files[extra_file] = sha256_file(out_dir / extra_file)
            steps.update()
            steps.set_postfix_str(f"validating {spec.name}")
            report = validate_graph(spec, out_dir / rel)
            report["export_s"] = round(time.perf_counter() - t0, 2)
            reports[spec.name] = report
            log.info("%s: exported and validated (max abs error %.2g)", spec.name, report["max_abs_error"])
            graphs[spec.name] = replace(graph_entry(spec, out_dir, rel), extra=_extra_common(spec, report))
            steps.update()

    steps.set_postfix_str("tokenizer")
    tokenizer_info = export_tokenizer(src.tokenizer, out_dir, TOKENIZER_FILE, d.text_length)
    files[TOKENIZER_FILE] = tokenizer_info["sha256"]
    graphs["text_encoder"].extra["tokenizer"] = tokenizer_info
    vae_cfg = src.vae.config
    settings = {
        "scheduler_config": src.scheduler_config,
        "latent_channels": d.latent_channels,
        "vae_scale_factor": d.vae_scale_factor,
        "vae_scaling_factor": float(vae_cfg.scaling_factor),
        "vae_shift_factor": float(vae_cfg.get("shift_factor") or 0.0),
        "image_size": {
            "min": d.image_min,
            "opt": d.image_opt,
            "max": d.image_max,
            "multiple": d.vae_scale_factor,
        },
        "max_batch": d.max_batch,
        "text_max_length": d.text_length,
        "text_hidden_size": d.text_hidden,
    }
    graphs["unet"].extra.update(settings)
    steps.update()
    steps.set_postfix_str("done")
    steps.close()
    meta = {
        "source": str(source_dir.name),
        "scheduler": src.scheduler_config.get("_class_name", ""),
        "prediction_type": src.scheduler_config.get("prediction_type", "epsilon"),
        "image_size": settings["image_size"],
        "opset": OPSET,
        "validation": reports,
    }
    return DiffusionExport(graphs, meta, files)


def validate_diffusion(directory: Path, manifest: Manifest, source_dir: Path) -> dict[str, dict[str, Any]]:
    """Re-validate the exported diffusion graphs in ``directory`` against PyTorch rebuilt from ``source_dir``."""
    src = _load_source(Path(source_dir))
    unet_extra = manifest.graphs["unet"].extra if "unet" in manifest.graphs else {}
    specs = diffusion_specs(src, int(unet_extra.get("max_batch", 4)))
    result: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for spec in specs:
            entry = manifest.graphs.get(spec.name)
            if entry is None:
                raise DiffusionExportError(f"the manifest has no {spec.name} graph")
            result[spec.name] = validate_graph(spec, Path(directory) / entry.file)
    return result
