"""Checkpoint directory format, loading (OpenFlamingo release + UniMP delta) and the demo checkpoint builder.

A checkpoint directory (see README, "Checkpoint directory") holds::

    unimp.json              model description (vision tower config, cross-attention interval, item count)
    vision.pt               open_clip state dict: a whole CLIP model ("visual.*") or just its visual tower
    lm/                     Hugging Face GPT-NeoX directory: config.json, weights, tokenizer.json
    checkpoint.pt           OpenFlamingo release weights (perceiver, gated cross-attention, embeddings)
    weights_epoch_N.pt      optional UniMP delta (trainable tensors only); the highest N is used
    catalog/items.jsonl     the items the model's item_k tokens refer to, with catalog/images/
    catalog/id2semantic.json  optional: semantic-ID items ({item_id: [a, b, c, d]}); the vocabulary then
                            has item_0..511 + item_last_0..31 instead of one token per item
    shop/*.jsonl            optional: shoppers split into train / validation / test (see export.shop)

Sources are applied in that order (vision, lm, checkpoint.pt, delta): later files override earlier ones.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from export.modeling.config import LMConfig, UniMPConfig, VisionConfig
from export.modeling.model import UniMP
from export.semantic_ids import SEMANTIC_TABLE
from export.vocab import AddedVocab, add_unimp_tokens

log = logging.getLogger(__name__)

UNIMP_JSON = "unimp.json"
EMBEDDINGS = ("lm.gpt_neox.embed_in.weight", "lm.embed_out.weight")
# Keys that real checkpoints carry and the served model does not use.
IGNORED = [
    re.compile(r"^vision\.proj$"),  # CLIP projection head: OpenFlamingo uses the patch tokens
    re.compile(r"^vision\.attn_pool"),
    re.compile(r"^lm\.gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$"),
    re.compile(r"^lm\.gpt_neox\.rotary_emb\.inv_freq$"),
    re.compile(r"^clip_text\."),  # text tower and logit scale of a whole CLIP in vision.pt
]


class CheckpointError(Exception):
    """A checkpoint cannot be loaded; the message names the file and, where relevant, the key."""


@dataclass
class LoadReport:
    sources: dict[str, str] = field(default_factory=dict)
    """model key -> file it was loaded from (the last one to provide it)."""
    missing: list[str] = field(default_factory=list)
    unexpected: list[tuple[str, str]] = field(default_factory=list)
    """(original key, file) pairs with no place in the model."""
    ignored: list[tuple[str, str]] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        files = sorted(set(self.sources.values()))
        lines = [f"loaded {len(self.sources)} tensors from {len(files)} files"]
        if self.resized:
            lines.append(f"resized (new vocabulary rows): {', '.join(self.resized)}")
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} unused keys, e.g. {self.ignored[0][0]} ({self.ignored[0][1]})")
        if self.unexpected:
            shown = ", ".join(f"{k} ({f})" for k, f in self.unexpected[:10])
            lines.append(f"unexpected keys ({len(self.unexpected)}): {shown}")
        if self.missing:
            lines.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing[:10])}")
        return "\n".join(lines)


# -- key mapping ------------------------------------------------------------------------------------------

_FLAMINGO_RULES = [
    (re.compile(r"^lang_encoder\.gpt_neox\.layers\.(\d+)\.decoder_layer\.(.*)$"), r"lm.gpt_neox.layers.\1.\2"),
    (re.compile(r"^lang_encoder\.old_decoder_blocks\.(\d+)\.(.*)$"), r"lm.gpt_neox.layers.\1.\2"),
    (re.compile(r"^lang_encoder\.gpt_neox\.layers\.(\d+)\.gated_cross_attn_layer\.(.*)$"), r"lm.gated_cross_attn_layers.\1.\2"),
    (re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.*)$"), r"lm.gated_cross_attn_layers.\1.\2"),
    (re.compile(r"^lang_encoder\.lm_head\.(.*)$"), r"lm.embed_out.\1"),
    (re.compile(r"^lang_encoder\.(.*)$"), r"lm.\1"),
    (re.compile(r"^vision_encoder\.(.*)$"), r"vision.\1"),
    (re.compile(r"^perceiver\.(.*)$"), r"perceiver.\1"),
]


def map_flamingo_key(key: str) -> str | None:
    """OpenFlamingo/UniMP state-dict name -> reference-model name (None if it has no place)."""
    key = key.removeprefix("module.")
    for pattern, repl in _FLAMINGO_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return None


def map_lm_key(key: str) -> str | None:
    """Hugging Face GPT-NeoX name -> reference-model name."""
    if key.startswith("gpt_neox."):
        return "lm." + key
    if key in ("embed_out.weight", "lm_head.weight"):
        return "lm.embed_out.weight"
    return None


def map_vision_key(key: str, whole_clip: bool = False) -> str | None:
    """open_clip name (whole CLIP with ``visual.`` or the visual tower alone) -> reference-model name.

    In a whole CLIP (``whole_clip``) only ``visual.*`` belongs to the tower: the text tower has its own
    ``positional_embedding`` and ``transformer.*``; its keys map under ``clip_text.`` (ignored).
    """
    key = key.removeprefix("module.")
    if key.startswith("visual."):
        return "vision." + key[len("visual.") :]
    if whole_clip:
        return "clip_text." + key
    if key.startswith(("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "transformer.", "proj")):
        return "vision." + key
    return None


# -- file reading -----------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .pt/.bin/.safetensors state dict (or a {"model_state_dict": ...} wrapper)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(data, dict) and wrapper in data and isinstance(data[wrapper], dict):
            data = data[wrapper]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(data).__name__})")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def lm_weight_files(lm_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = lm_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [lm_dir / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (lm_dir / name).is_file():
            return [lm_dir / name]
    raise CheckpointError(f"no model.safetensors or pytorch_model.bin (or sharded index) in {lm_dir}")


def lm_config_from_hf(lm_dir: Path, vocab_size: int, every_n: int) -> LMConfig:
    path = lm_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the lm/ directory must be a Hugging Face GPT-NeoX directory")
    hf = json.loads(path.read_text())
    if hf.get("model_type", "gpt_neox") != "gpt_neox":
        raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not supported (gpt_neox)")
    rope = hf.get("rope_parameters") or {}
    base = hf.get("rotary_emb_base", rope.get("rope_theta", 10000.0))
    return LMConfig(
        vocab_size=vocab_size,
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        rotary_pct=hf.get("rotary_pct", rope.get("partial_rotary_factor", 1.0)),
        rotary_emb_base=float(base),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        use_parallel_residual=hf.get("use_parallel_residual", True),
        hidden_act=hf.get("hidden_act", "gelu"),
        attention_bias=hf.get("attention_bias", True),
        cross_attn_every_n_layers=every_n,
    )


def find_delta(ckpt: Path, meta: dict[str, Any]) -> Path | None:
    if meta.get("delta"):
        return ckpt / meta["delta"]
    found = []
    for p in ckpt.glob("weights_epoch_*.pt"):
        m = re.match(r"weights_epoch_(\d+)\.pt$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def count_catalog_items(ckpt: Path) -> int:
    items = ckpt / "catalog" / "items.jsonl"
    if not items.is_file():
        raise CheckpointError(f"{items} does not exist: the checkpoint needs the catalog its item tokens refer to")
    with open(items, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


# -- loading ----------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    model: UniMP
    tokenizer: Tokenizer
    vocab: AddedVocab
    report: LoadReport
    meta: dict[str, Any]


def read_meta(ckpt: Path) -> dict[str, Any]:
    path = ckpt / UNIMP_JSON
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: a checkpoint directory needs unimp.json (see README)")
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    return meta


def load_checkpoint(ckpt: Path, strict: bool = True) -> LoadedCheckpoint:
    """Build the reference model for a checkpoint directory and load every source into it.

    With ``strict``, missing keys raise; unexpected keys are always reported (and logged).
    A shape mismatch raises CheckpointError naming the key and the file, except for the vocabulary rows of
    the two embedding matrices, which are resized as OpenFlamingo/UniMP do when they add tokens.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt} does not exist")
    meta = read_meta(ckpt)
    lm_dir = ckpt / "lm"
    tok_path = lm_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path} does not exist: the lm/ directory needs a fast tokenizer (tokenizer.json)")
    tokenizer = Tokenizer.from_file(str(tok_path))
    num_items = int(meta.get("num_items") or count_catalog_items(ckpt))
    semantic = (ckpt / "catalog" / SEMANTIC_TABLE).is_file()
    vocab = add_unimp_tokens(tokenizer, num_items, eos=meta.get("eos_token", "<|endoftext|>"), semantic=semantic)
    vision_cfg = VisionConfig(**meta.get("vision", {}))
    lm_cfg = lm_config_from_hf(lm_dir, vocab.size, int(meta.get("cross_attn_every_n_layers", 2)))
    model = UniMP(UniMPConfig(vision=vision_cfg, lm=lm_cfg)).eval()

    sources: list[tuple[Path, Any]] = [(ckpt / meta.get("vision_file", "vision.pt"), map_vision_key)]
    sources += [(f, map_lm_key) for f in lm_weight_files(lm_dir)]
    sources.append((ckpt / meta.get("flamingo_file", "checkpoint.pt"), map_flamingo_key))
    delta = find_delta(ckpt, meta)
    if delta is not None:
        sources.append((delta, map_flamingo_key))

    report = LoadReport()
    target = model.state_dict()
    with torch.no_grad():
        for path, mapper in sources:
            state = read_state_dict(path)
            if mapper is map_vision_key and any(k.removeprefix("module.").startswith("visual.") for k in state):
                mapper = partial(map_vision_key, whole_clip=True)
            _apply(path, state, mapper, target, report)
    report.missing = sorted(k for k in target if k not in report.sources)
    model.load_state_dict(target)
    log.info("%s", report.summary())
    if strict and report.missing:
        raise CheckpointError(
            f"{len(report.missing)} model tensors were not found in any checkpoint file, e.g. "
            + ", ".join(report.missing[:8])
        )
    return LoadedCheckpoint(model, tokenizer, vocab, report, meta)


def _apply(path: Path, state: dict[str, torch.Tensor], mapper: Any, target: dict[str, torch.Tensor], report: LoadReport) -> None:
    for key, value in state.items():
        name = mapper(key)
        if name is not None and any(p.match(name) for p in IGNORED):
            report.ignored.append((key, str(path)))
            continue
        if name is None or name not in target:
            report.unexpected.append((key, str(path)))
            continue
        dest = target[name]
        value = value.to(dest.dtype)
        if name.endswith("_gate") and value.numel() == dest.numel():
            value = value.reshape(dest.shape)
        if value.shape != dest.shape:
            if name in EMBEDDINGS and value.shape[1:] == dest.shape[1:]:
                rows = min(value.shape[0], dest.shape[0])
                dest[:rows] = value[:rows]
                if value.shape[0] < dest.shape[0]:
                    dest[rows:] = value.mean(dim=0, keepdim=True)  # new tokens start at the mean embedding
                report.resized.append(f"{name} {tuple(value.shape)}->{tuple(dest.shape)} ({path.name})")
            else:
                raise CheckpointError(
                    f"shape mismatch for {key} in {path}: file has {tuple(value.shape)}, "
                    f"the model expects {tuple(dest.shape)} (as {name})"
                )
        else:
            dest.copy_(value)
        report.sources[name] = str(path)


# -- the demo checkpoint ----------------------------------------------------------------------------------


def randomize(model: UniMP, seed: int) -> None:
    """Seeded weights that exercise every path: perturbed LayerNorms, non-zero gates, varied embeddings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5 + 0.5 * torch.rand(1, generator=g).item())
            elif p.ndim == 1 and ("norm" in name or "ln" in name):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                std = 0.02 if "embed" in name or "latents" in name or "positional" in name else p.shape[-1] ** -0.5
                p.copy_(std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def write_checkpoint_dir(
    out: Path,
    model: UniMP,
    base_tokenizer: Tokenizer,
    base_vocab: int,
    meta: dict[str, Any],
) -> None:
    """Write ``model`` in the checkpoint directory layout (vision.pt, lm/, checkpoint.pt, weights_epoch_1.pt).

    The split mirrors the real releases: lm/ carries the base vocabulary only; the OpenFlamingo checkpoint
    and the UniMP delta carry the trainable tensors, the delta at the full UniMP vocabulary.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save({"visual." + k[len("vision.") :]: v for k, v in sd.items() if k.startswith("vision.")}, out / "vision.pt")
    lm_dir = out / "lm"
    lm_dir.mkdir(exist_ok=True)
    c = model.cfg.lm
    lm = {k[len("lm.") :]: v for k, v in sd.items() if k.startswith("lm.gpt_neox.") or k == "lm.embed_out.weight"}
    lm["gpt_neox.embed_in.weight"] = lm["gpt_neox.embed_in.weight"][:base_vocab].clone()
    lm["embed_out.weight"] = lm["embed_out.weight"][:base_vocab].clone()
    save_file(lm, str(lm_dir / "model.safetensors"))
    hf_config = {
        "model_type": "gpt_neox",
        "architectures": ["GPTNeoXForCausalLM"],
        "vocab_size": base_vocab,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "rotary_pct": c.rotary_pct,
        "rotary_emb_base": c.rotary_emb_base,
        "max_position_embeddings": c.max_position_embeddings,
        "layer_norm_eps": c.layer_norm_eps,
        "use_parallel_residual": c.use_parallel_residual,
        "hidden_act": c.hidden_act,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    (lm_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    base_tokenizer.save(str(lm_dir / "tokenizer.json"))
    flamingo = {}
    delta = {}
    for k, v in sd.items():
        if k.startswith("perceiver."):
            flamingo[k] = v
            delta[k] = v
        elif k.startswith("lm.gated_cross_attn_layers."):
            name = "lang_encoder." + k[len("lm.") :]
            flamingo[name] = v
            delta[name] = v
    flamingo["lang_encoder.gpt_neox.embed_in.weight"] = sd["lm.gpt_neox.embed_in.weight"][: base_vocab + 3].clone()
    delta["lang_encoder.gpt_neox.embed_in.weight"] = sd["lm.gpt_neox.embed_in.weight"]
    delta["lang_encoder.embed_out.weight"] = sd["lm.embed_out.weight"]
    torch.save(flamingo, out / "checkpoint.pt")
    torch.save(delta, out / "weights_epoch_1.pt")
    (out / UNIMP_JSON).write_text(json.dumps(meta, indent=2))


DEMO_USERS = {"tiny": 3000, "small": 20000}
"""Shoppers per demo preset (split 80 / 10 / 10 into train / validation / test)."""


def build_demo_checkpoint(
    out: Path, preset: str, seed: int = 0, num_items: int | None = None, semantic_ids: bool = False,
    trained: bool = False, train_config: Any = None, progress: bool = False, resume: Any = None,
) -> Path:
    """A seeded UniMP-shaped checkpoint directory with a local tokenizer, a synthetic catalog and shop.

    ``semantic_ids``: the catalog carries a seeded ``id2semantic.json`` (see export.semantic_ids) and the
    vocabulary the semantic-ID item tokens (untrained only: the shop training spells atomic items).
    ``trained``: train the model on the shop's train split (``export.train``); otherwise the weights are
    the seeded random ones (flat logits). Either way the weights are written in the checkpoint directory
    layout and read back by ``load_checkpoint`` like a real release. ``train_config`` (an
    ``export.train.TrainConfig``) defaults to the preset's (``export.train.PRESETS``). ``resume`` (an
    ``export.resume.ResumeOptions``): cache the catalog encode and save / resume the training state (see
    ``export.train.train``); a stopped training raises ``export.resume.TrainingStopped`` before any weights
    are written.
    """
    if semantic_ids and trained:
        raise CheckpointError("the semantic-ID demo is untrained (the shop training spells atomic items)")
    from export.catalog import build_catalog, catalog_corpus
    from export.modeling.config import small_config, tiny_config
    from export.shop import build_shop, review_corpus
    from export.vocab import train_demo_tokenizer

    # (config, items, BPE size untrained, BPE size trained): the trained demo's tokenizer also learns the
    # review sentences (shorter training sequences); the untrained one keeps the catalog-only tokenizer
    presets = {"tiny": (tiny_config, 200, 600, 1200), "small": (small_config, 2000, 8000, 8000)}
    if preset not in presets:
        raise CheckpointError(f"unknown demo preset {preset!r}; choose one of {', '.join(presets)}")
    make_config, default_items, bpe_untrained, bpe_trained = presets[preset]
    n_items = num_items or default_items
    out = Path(out)
    records = build_catalog(out / "catalog", n_items, seed=seed)
    build_shop(out / "shop", records, DEMO_USERS[preset], seed=seed)
    corpus = catalog_corpus(records) + (review_corpus() if trained else [])
    base = train_demo_tokenizer(corpus, bpe_trained if trained else bpe_untrained)
    base_vocab = base.get_vocab_size(with_added_tokens=True)
    full = Tokenizer.from_str(base.to_str())
    if semantic_ids:
        from export.semantic_ids import demo_semantic_ids, write_semantic_table

        table = demo_semantic_ids([r.item_id for r in records], [r.category for r in records], seed=seed)
        write_semantic_table(out / "catalog", table)
    vocab = add_unimp_tokens(full, n_items, semantic=semantic_ids)
    cfg = make_config(vocab.size)
    torch.manual_seed(seed)
    model = UniMP(cfg).eval()
    randomize(model, seed)
    training: dict[str, Any] = {"trained": False}
    if trained:
        from dataclasses import asdict, replace

        from export.shop import read_split
        from export.train import PRESETS, ShopExamples, catalog_pixels, train

        tc = replace(train_config or PRESETS[preset], seed=seed)
        examples = ShopExamples(records, full, vocab, tc.max_history)
        pixels = catalog_pixels(out / "catalog", records, cfg.vision.image_size)
        result = train(model, examples, read_split(out / "shop", "train"), pixels, tc, progress=progress,
                       resume=resume)
        training = {"trained": True, "config": asdict(tc), "seconds": round(result.seconds, 1),
                    "first_loss": round(result.first_loss, 4), "last_loss": round(result.last_loss, 4)}
    v = cfg.vision
    meta = {
        "name": f"unimp-demo-{preset}",  # trained or not: see "demo" below
        "num_items": n_items,
        "cross_attn_every_n_layers": cfg.lm.cross_attn_every_n_layers,
        "vision": {
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "width": v.width,
            "layers": v.layers,
            "heads": v.heads,
            "mlp_ratio": v.mlp_ratio,
            "quick_gelu": v.quick_gelu,
            "ln_post_on_tokens": v.ln_post_on_tokens,
        },
        "demo": {"preset": preset, "seed": seed, "semantic_ids": semantic_ids, **training},
    }
    write_checkpoint_dir(out, model, base, base_vocab, meta)
    return out
