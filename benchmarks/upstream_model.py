"""The upstream UniMP model (PyPI ``open-flamingo`` 2.0.1 + ``open_clip_torch``) built from one of our checkpoints.

The baselines compare the runtime with the code the paper ran. That code is OpenFlamingo, so the baseline
is OpenFlamingo's own ``Flamingo`` made by its own factory, holding exactly the weights our reference model
loads from a checkpoint directory:

1. the vision tower is registered with open_clip as a model config (from ``unimp.json``'s ``vision``
   section), as the released ``ViT-L-14`` is known to open_clip by name;
2. ``open_flamingo.create_model_and_transforms`` builds the Flamingo from that name and the Hugging Face
   GPT-NeoX directory ``<checkpoint>/lm`` (local files only), adding ``<|endofchunk|>``, ``<image>``,
   ``<PAD>``;
3. the embeddings are resized to UniMP's vocabulary (as UniMP does after adding its tokens), and every
   tensor of the reference model's state dict is loaded under its upstream name (``load_state_dict``,
   strict), the mapping being the loader's own (``export.checkpoints.map_flamingo_key``) read backwards;
4. a logits spot check (one interleaved sequence with two images and UniMP tokens) proves that the two
   models compute the same function, within ``SPOT_CHECK_RTOL``.

torchvision: open_clip imports ``torchvision.transforms`` and ``torchvision.ops.misc.FrozenBatchNorm2d``
when it is imported, and nothing else of it. torchvision is not installed here (PyPI's wheel for this torch
is a CUDA build whose extension breaks ``transformers`` and ``diffusers`` model imports next to the CPU
torch), so :func:`import_upstream` puts a stand-in in ``sys.modules`` while the two packages are imported
and removes it afterwards. The stand-in's transforms can be built (open_clip builds its preprocessing with
every model) but raise if run: callers preprocess images themselves (``runtime.vision.preprocess``).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import importlib.machinery
import importlib.util
import io
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from export.checkpoints import LoadedCheckpoint, load_checkpoint, map_flamingo_key
from export.modeling.config import VisionConfig
from export.vocab import AddedVocab

log = logging.getLogger(__name__)

UPSTREAM_INSTALL = "pip install --no-deps open-flamingo==2.0.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4"
SPOT_CHECK_RTOL = 1e-4
"""``max |ours - upstream| / max |upstream|`` allowed on the spot-check logits (both fp32)."""
UNUSED_UPSTREAM_KEYS = frozenset({"vision_encoder.proj"})
"""Upstream tensors with no counterpart in the served model: CLIP's projection head (Flamingo uses the
patch tokens, never the pooled embedding)."""


class UpstreamError(RuntimeError):
    """The upstream model cannot be built from the checkpoint, or does not match the reference."""


# -- importing open_flamingo and open_clip without torchvision ---------------------------------------------


class _StandIn:
    """Any torchvision class: it can be constructed and subclassed, never run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{type(self).__name__} belongs to a torchvision stand-in and cannot run")


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _package(name: str, attrs: dict[str, Any] | None = None, any_name: bool = False) -> ModuleType:
    mod = ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    mod.__path__ = []
    for key, value in (attrs or {}).items():
        setattr(mod, key, value)
    if any_name:

        def __getattr__(attr: str) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (_StandIn,), {})

        mod.__getattr__ = __getattr__  # type: ignore[method-assign]
    return mod


def _torchvision_modules() -> dict[str, ModuleType]:
    functional = _package("torchvision.transforms.functional", any_name=True)
    transforms = _package(
        "torchvision.transforms", {"InterpolationMode": _InterpolationMode, "functional": functional}, any_name=True
    )
    misc = _package("torchvision.ops.misc", {"FrozenBatchNorm2d": type("FrozenBatchNorm2d", (_StandIn,), {})})
    ops = _package("torchvision.ops", {"misc": misc})
    return {
        "torchvision": _package("torchvision", {"transforms": transforms, "ops": ops}),
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
        "torchvision.ops": ops,
        "torchvision.ops.misc": misc,
    }


@contextlib.contextmanager
def _torchvision_present() -> Iterator[None]:
    """A torchvision stand-in in ``sys.modules`` for the duration (a real, importable one is used as is)."""
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision  # noqa: F401  (a broken install fails here, visibly)

        yield
        return
    modules = _torchvision_modules()
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, mod in modules.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]


def import_upstream() -> tuple[ModuleType, ModuleType]:
    """(open_flamingo, open_clip); an ImportError names the install command."""
    if "open_flamingo" in sys.modules and "open_clip" in sys.modules:
        return sys.modules["open_flamingo"], sys.modules["open_clip"]
    # transformers caches whether torchvision is importable the first time it is asked: ask it now, before
    # the stand-in exists, by importing what open_clip and open_flamingo take from it.
    import transformers.modeling_outputs  # noqa: F401
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    with _torchvision_present():
        try:
            import open_clip
            import open_flamingo
        except ImportError as exc:
            raise ImportError(f"{exc}; the upstream model needs: {UPSTREAM_INSTALL}") from exc
    return open_flamingo, open_clip


# -- building -----------------------------------------------------------------------------------------------


class _MaskOptional:
    """Mixed into the Flamingo LM: ``attention_mask`` defaults to None.

    transformers >= 5 ``generate`` drops an all-ones attention mask (no padding) before calling the model,
    while ``FlamingoLMMixin.forward(input_ids, attention_mask, **kwargs)`` requires the argument; None is
    what the GPT-NeoX forward underneath takes for "no padding", so the computation is unchanged.
    """

    def forward(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
        return super().forward(input_ids, attention_mask, **kwargs)  # type: ignore[misc]


def open_clip_config(v: VisionConfig) -> dict[str, Any]:
    """An open_clip model config (the JSON of ``open_clip/model_configs``) whose vision tower is ``v``.

    The text tower and ``embed_dim`` are placeholders: Flamingo keeps only ``visual`` and never uses the
    CLIP projection.
    """
    if v.width % v.heads:
        raise UpstreamError(f"vision width {v.width} is not a multiple of its {v.heads} heads")
    return {
        "embed_dim": 32,
        "quick_gelu": v.quick_gelu,
        "vision_cfg": {
            "image_size": v.image_size,
            "layers": v.layers,
            "width": v.width,
            "head_width": v.width // v.heads,
            "mlp_ratio": v.mlp_ratio,
            "patch_size": v.patch_size,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }


@dataclass
class UpstreamModel:
    flamingo: Any
    """``open_flamingo.Flamingo`` in eval mode, fp32, with the checkpoint's weights."""
    reference: LoadedCheckpoint
    """The reference model the weights came from (and its tokenizer and vocabulary)."""
    spot_check_error: float
    """Relative logits error of the spot check (``max |ours - upstream| / max |upstream|``)."""
    kept_upstream: list[str] = field(default_factory=list)
    """Upstream tensors left as the factory made them (unused by the served model)."""

    @property
    def vocab(self) -> AddedVocab:
        return self.reference.vocab


def _upstream_tokenizer_dir(lm_dir: Path, eos: str, out: Path) -> Path:
    """The LM's tokenizer.json as a transformers fast tokenizer with no pad token, so the factory adds
    ``<PAD>`` after ``<|endofchunk|>`` and ``<image>`` (the ids the loader gives them)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(lm_dir / "tokenizer.json"), bos_token=eos, eos_token=eos)
    tok.save_pretrained(out)
    return out


def upstream_state_dict(flamingo: Any, reference: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every upstream tensor (all its aliases) filled from the reference state dict.

    Returns (state dict for ``flamingo.load_state_dict(strict=True)``, upstream keys kept as they were).
    Raises UpstreamError if a reference tensor finds no upstream home, a shape differs, or an upstream
    tensor other than ``UNUSED_UPSTREAM_KEYS`` has no source.
    """
    state = flamingo.state_dict()
    out: dict[str, torch.Tensor] = {}
    kept: list[str] = []
    used: set[str] = set()
    for key, value in state.items():
        name = map_flamingo_key(key)
        if name is None or name not in reference:
            kept.append(key)
            out[key] = value
            continue
        src = reference[name]
        if src.numel() == value.numel() and name.endswith("_gate"):
            src = src.reshape(value.shape)
        if src.shape != value.shape:
            raise UpstreamError(f"{key}: upstream shape {tuple(value.shape)}, reference {name} {tuple(src.shape)}")
        out[key] = src.to(value.dtype)
        used.add(name)
    unexpected = [k for k in kept if k not in UNUSED_UPSTREAM_KEYS]
    if unexpected:
        raise UpstreamError(f"upstream tensors with no reference counterpart: {', '.join(unexpected[:8])}")
    unused = sorted(set(reference) - used)
    if unused:
        raise UpstreamError(f"reference tensors the upstream model has no place for: {', '.join(unused[:8])}")
    return out, kept


def spot_check(flamingo: Any, reference: LoadedCheckpoint, seed: int = 0, length: int = 40) -> float:
    """Relative error between upstream ``Flamingo.forward`` and ``UniMP.full_logits`` on one sequence.

    The sequence (seeded) has ``<image>`` at positions 0 and ``length // 2``, random text tokens from the
    whole UniMP vocabulary (resized rows included) and random normalised pixels for the two images.
    """
    model, vocab = reference.model, reference.vocab
    gen = torch.Generator().manual_seed(seed)
    specials = {vocab.image, vocab.pad}
    ids = torch.randint(0, vocab.size, (1, length), generator=gen)
    for pos in range(length):
        while int(ids[0, pos]) in specials:
            ids[0, pos] = int(torch.randint(0, vocab.size, (1,), generator=gen))
    ids[0, 0] = ids[0, length // 2] = vocab.image
    ids[0, length // 4] = vocab.item_start  # an item token: a resized embedding row
    s = model.cfg.vision.image_size
    pixels = torch.randn(2, 3, s, s, generator=gen)
    mask = torch.ones_like(ids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Flamingo.forward passes the renamed past_key_values
        theirs = flamingo(pixels[None, :, None], ids, attention_mask=mask).logits[0]
        ours = model.full_logits(ids, mask, [model.encode_images(pixels)], vocab.image, torch.arange(length)[None])[0]
    return float((ours - theirs).abs().max() / theirs.abs().max())


def build_upstream_model(checkpoint: Path, reference: LoadedCheckpoint | None = None, *, seed: int = 0) -> UpstreamModel:
    """OpenFlamingo's ``Flamingo`` for our checkpoint directory, with the reference model's weights.

    ``reference`` (``load_checkpoint(checkpoint)`` if None) supplies the weights; the result is checked
    against it (``SPOT_CHECK_RTOL``) and UpstreamError raised on a mismatch.
    """
    checkpoint = Path(checkpoint)
    reference = reference or load_checkpoint(checkpoint)
    meta, vocab = reference.meta, reference.vocab
    v = reference.model.cfg.vision
    if not v.ln_post_on_tokens:
        raise UpstreamError("open_clip 3.x applies ln_post to the patch tokens; this checkpoint's vision tower does not")
    open_flamingo, open_clip = import_upstream()
    config = open_clip_config(v)
    name = "unimp-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    lm_dir = checkpoint / "lm"
    with tempfile.TemporaryDirectory(prefix="unimp-upstream-") as tmp:
        configs = Path(tmp) / "open_clip"
        configs.mkdir()
        (configs / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(configs)
        tokenizer_dir = _upstream_tokenizer_dir(lm_dir, meta.get("eos_token", "<|endoftext|>"), Path(tmp) / "tokenizer")
        torch.manual_seed(seed)  # the factory's initialisers; every tensor is overwritten below
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flamingo, _, tokenizer = open_flamingo.create_model_and_transforms(
                clip_vision_encoder_path=name,
                clip_vision_encoder_pretrained=None,
                lang_encoder_path=str(lm_dir),
                tokenizer_path=str(tokenizer_dir),
                cross_attn_every_n_layers=int(meta.get("cross_attn_every_n_layers", 2)),
                use_local_files=True,
                decoder_layers_attr_name="gpt_neox.layers",
            )
    got = (flamingo.eoc_token_id, flamingo.media_token_id, tokenizer.pad_token_id)
    want = (vocab.endofchunk, vocab.image, vocab.pad)
    if got != want:
        raise UpstreamError(f"upstream (<|endofchunk|>, <image>, <PAD>) ids are {got}, the loader's are {want}")
    flamingo.lang_encoder.resize_token_embeddings(vocab.size, mean_resizing=False)  # UniMP's tokens
    from open_flamingo.src.utils import extend_instance

    extend_instance(flamingo.lang_encoder, _MaskOptional)
    flamingo.float().eval()
    state, kept = upstream_state_dict(flamingo, reference.model.state_dict())
    flamingo.load_state_dict(state, strict=True)
    err = spot_check(flamingo, reference, seed=seed)
    if not err <= SPOT_CHECK_RTOL:
        raise UpstreamError(f"upstream logits differ from the reference model's: relative error {err:.2e} > {SPOT_CHECK_RTOL}")
    log.info("upstream Flamingo built from %s (spot check relative error %.2e)", checkpoint, err)
    return UpstreamModel(flamingo, reference, err, kept)
