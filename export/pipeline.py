"""`unimp export` and `unimp validate`: checkpoint directory -> validated ONNX graphs + manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import fields
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from export.checkpoints import build_demo_checkpoint, load_checkpoint
from export.graphs import export_graph, graph_entry, validate_graph
from export.modeling.config import CLIP_MEAN, CLIP_STD
from export.semantic_ids import SEMANTIC_TABLE
from export.specs import all_specs, check_decoder_form
from export.vocab import SEMANTIC_CODES, SEMANTIC_LAST_CODES, AddedVocab
from runtime.catalog import SemanticTable
from runtime.manifest import (
    SCHEMA_VERSION,
    DecoderDims,
    DecoderNames,
    GraphEntry,
    ItemsSpec,
    Manifest,
    TokenIds,
    VisionDims,
    load_manifest,
    sha256_file,
)

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("unimp-edge", "torch", "onnx", "onnxruntime", "transformers", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def export_checkpoint(
    ckpt: Path, out: Path, progress: bool = True, source: dict[str, Any] | None = None, diffusion: Path | None = None,
    vqgan: Path | None = None, kv_layout: str = "inplace", attention: str = "gqa",
) -> Manifest:
    """Load ``ckpt`` (checkpoint directory layout), export and validate every graph, write the manifest.

    ``diffusion`` (a diffusers directory) and ``vqgan`` (a taming VQGAN directory) add the optional image
    generation graphs; ``source["vqgan"]`` then records the VQGAN's source and validation. ``kv_layout``:
    the decoder's KV cache form (export.specs.KV_LAYOUTS; "inplace" for onnxruntime, "concat" for
    TensorRT 10.3). ``attention`` (inplace only): "gqa" (com.microsoft.GroupQueryAttention) or "onnx"
    (standard ops with an opset-24 TensorScatter cache update: what TensorRT >= 10.15 builds in place)."""
    check_decoder_form(kv_layout, attention)
    ckpt, out = Path(ckpt), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    steps = tqdm(total=6, desc="export", unit="step", disable=not progress)
    steps.set_postfix_str("loading checkpoint")
    loaded = load_checkpoint(ckpt)
    model, vocab = loaded.model, loaded.vocab
    params = sum(p.numel() for p in model.parameters())
    log.info("model has %.1fM parameters", params / 1e6)
    steps.update()

    names = DecoderNames()
    graphs: dict[str, GraphEntry] = {}
    report: dict[str, Any] = {}
    for spec in all_specs(model, names, kv_layout, attention):
        rel = f"{spec.name}.onnx"
        steps.set_postfix_str(f"exporting {spec.name}")
        t0 = time.perf_counter()
        export_graph(spec, out / rel)
        t1 = time.perf_counter()
        report[spec.name] = validate_graph(spec, out / rel)
        report[spec.name]["export_s"] = round(t1 - t0, 2)
        graphs[spec.name] = graph_entry(spec, out, rel)
        steps.update()

    steps.set_postfix_str("tokenizer and catalog")
    loaded.tokenizer.save(str(out / "tokenizer.json"))
    copied = ["catalog"] + (["shop"] if (ckpt / "shop").is_dir() else [])
    for name in copied:
        if (out / name).resolve() != (ckpt / name).resolve():
            shutil.copytree(ckpt / name, out / name, dirs_exist_ok=True)
    files = {"tokenizer.json": sha256_file(out / "tokenizer.json")}
    for name in copied:
        for path in sorted((out / name).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                files[str(path.relative_to(out))] = sha256_file(path)
    diffusion_meta: dict[str, Any] = {}
    if diffusion is not None:
        from export.diffusion import export_diffusion

        steps.set_postfix_str("exporting diffusion")
        diffusion_graphs, diffusion_meta, diffusion_files = export_diffusion(diffusion, out, progress=progress)
        graphs.update(diffusion_graphs)
        files.update(diffusion_files)
    vqgan_meta: dict[str, Any] = {}
    if vqgan is not None:
        from export.vqgan import export_vqgan

        steps.set_postfix_str("exporting vqgan")
        vqgan_graphs, vqgan_meta = export_vqgan(vqgan, out, progress=progress)
        graphs.update(vqgan_graphs)
        vqgan_meta["path"] = os.path.relpath(Path(vqgan).resolve(), out.resolve())
    steps.update()

    cfg = model.cfg
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model_name=str(loaded.meta.get("name", ckpt.name)),
        vision=VisionDims(
            image_size=cfg.vision.image_size,
            patch_size=cfg.vision.patch_size,
            width=cfg.vision.width,
            num_latents=cfg.perceiver.num_latents,
            mean=list(CLIP_MEAN),
            std=list(CLIP_STD),
        ),
        decoder=DecoderDims(
            num_layers=cfg.lm.num_hidden_layers,
            hidden_size=cfg.lm.hidden_size,
            num_heads=cfg.lm.num_attention_heads,
            head_dim=cfg.lm.head_dim,
            vocab_size=cfg.lm.vocab_size,
            max_positions=cfg.lm.max_position_embeddings,
            xattn_layers=cfg.lm.xattn_layers,
            xattn_heads=cfg.lm.xattn_heads,
            xattn_head_dim=cfg.lm.xattn_dim_head,
            kv_layout=kv_layout,
            attention=attention if kv_layout == "inplace" else "mha",
        ),
        tokens=TokenIds(**{f.name: getattr(vocab, f.name) for f in fields(TokenIds)}),
        graphs=graphs,
        files=files,
        names=names,
        exporter=_versions(),
        source={
            "checkpoint": os.path.relpath(ckpt.resolve(), out.resolve()),
            "parameters": params,
            "config": cfg.to_dict(),
            "validation": report,
            **({"vqgan": vqgan_meta} if vqgan_meta else {}),
            **(source or {}),
        },
        diffusion=diffusion_meta,
        items=_items_spec(out, vocab),
    )
    manifest.save(out)
    steps.set_postfix_str("done")
    steps.update()
    steps.close()
    return manifest


def _items_spec(out: Path, vocab: AddedVocab) -> ItemsSpec:
    """Atomic items, or semantic-ID items when the copied catalog has an ``id2semantic`` table (checked
    here with the runtime's own reader against the catalog and the vocabulary)."""
    rel = f"catalog/{SEMANTIC_TABLE}"
    if not (out / rel).is_file():
        return ItemsSpec()
    if vocab.item_last_count != SEMANTIC_LAST_CODES or vocab.item_count != SEMANTIC_CODES:
        raise ValueError(f"{rel}: semantic ids need the item_0..{SEMANTIC_CODES - 1} and "
                         f"item_last_0..{SEMANTIC_LAST_CODES - 1} tokens")
    SemanticTable.load(out / rel)
    return ItemsSpec(kind="semantic", semantic_table=rel, semantic_sha256=sha256_file(out / rel),
                     code_counts=[SEMANTIC_CODES] * 3 + [SEMANTIC_LAST_CODES])


def export_demo(
    preset: str, out: Path, seed: int = 0, progress: bool = True, with_diffusion: bool = True,
    semantic_ids: bool = False, with_vqgan: bool = False, trained: bool = False, train_steps: int | None = None,
    kv_layout: str = "inplace", attention: str = "gqa", save_every: int | None = None,
    train_max_minutes: float | None = None, restart: bool = False,
) -> Manifest:
    """Build the seeded demo checkpoint under ``out/checkpoint`` and export it into ``out``.

    ``trained``: train it on the synthetic shop first (what ``unimp export --demo`` does); the default keeps
    the seeded random weights (fast, flat logits: what most tests want). ``semantic_ids``: with a
    semantic-ID catalog (see export.semantic_ids; untrained only). ``with_vqgan``: with a seeded demo VQGAN.
    ``train_steps``: with ``trained``, this many optimizer steps instead of the preset's
    (``export.train.train_preset``). ``kv_layout``, ``attention``: see ``export_checkpoint``.

    A trained demo caches its catalog encode and saves its training state under
    ``out/checkpoint/.train-cache`` (``export.resume``) every ``save_every`` steps (default: the preset's,
    ``export.train.SAVE_EVERY``), on SIGINT/SIGTERM and after ``train_max_minutes`` (counted from this
    call), and a call on the same ``out`` resumes it; those stops raise ``export.resume.TrainingStopped``
    with nothing exported. ``restart``: discard a saved training state first.
    """
    check_decoder_form(kv_layout, attention)
    start = time.monotonic()
    out = Path(out)
    ckpt = out / "checkpoint"
    if progress:
        kind = "trained" if trained else "untrained"
        print(f"building the {kind} {preset} demo checkpoint in {ckpt} ...", flush=True)
    train_config = None
    if trained and train_steps is not None:
        from export.train import train_preset

        train_config = train_preset(preset, train_steps)
    resume = None
    if trained:
        from export.resume import CACHE_DIR, ResumeOptions
        from export.train import SAVE_EVERY

        deadline = None if train_max_minutes is None else start + 60.0 * train_max_minutes
        resume = ResumeOptions(ckpt / CACHE_DIR, SAVE_EVERY.get(preset, 0) if save_every is None else save_every,
                               deadline=deadline, restart=restart)
    build_demo_checkpoint(ckpt, preset, seed=seed, semantic_ids=semantic_ids, trained=trained,
                          train_config=train_config, progress=progress, resume=resume)
    diffusion_dir = None
    if with_diffusion:
        try:
            from export.diffusion import build_demo_diffusion
        except ImportError:  # diffusers not installed: the text tasks still export
            log.warning("diffusers is not installed; the demo is exported without image generation")
        else:
            diffusion_dir = build_demo_diffusion(ckpt / "diffusion", seed=seed)
    source = {"demo": preset, "seed": seed, "trained": trained, **({"semantic_ids": True} if semantic_ids else {})}
    vqgan_dir = None
    if with_vqgan:
        from export.modeling.vqgan import build_demo_vqgan

        vqgan_dir = build_demo_vqgan(ckpt / "vqgan", seed=seed)
    return export_checkpoint(ckpt, out, progress=progress, source=source, diffusion=diffusion_dir, vqgan=vqgan_dir,
                             kv_layout=kv_layout, attention=attention)


def validate_artifacts(directory: Path, checkpoint: Path | None = None) -> dict[str, Any]:
    """Re-run every decoder-side graph against the PyTorch reference rebuilt from the source checkpoint."""
    directory = Path(directory)
    manifest = load_manifest(directory, verify=True)
    ckpt = checkpoint or (directory / manifest.source["checkpoint"])
    loaded = load_checkpoint(ckpt)
    result: dict[str, Any] = {"artifacts": str(directory), "checkpoint": str(ckpt), "graphs": {}}
    attention = manifest.decoder.attention if manifest.decoder.kv_layout == "inplace" else "gqa"
    for spec in all_specs(loaded.model, manifest.names, manifest.decoder.kv_layout, attention):
        entry = manifest.graphs[spec.name]
        result["graphs"][spec.name] = validate_graph(spec, directory / entry.file)
    if any(k in manifest.graphs for k in ("unet", "text_encoder", "vae_decoder")):
        from export.diffusion import validate_diffusion

        result["graphs"].update(validate_diffusion(directory, manifest, ckpt / "diffusion"))
    if "vqgan_decoder" in manifest.graphs:
        from export.vqgan import validate_vqgan

        vq = manifest.source.get("vqgan", {}).get("path")
        result["graphs"].update(validate_vqgan(directory, manifest, directory / vq if vq else ckpt / "vqgan"))
    result["ok"] = True
    return result


def dump_report(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
