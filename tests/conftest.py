"""Shared fixtures: one tiny demo export per test session (untrained), the trained one on request."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained tiny demo exported once (text graphs only, seeded random weights: flat logits);
    reused by every test that needs artifacts."""
    from export.pipeline import export_demo

    out = tmp_path_factory.mktemp("tiny_demo")
    export_demo("tiny", out, seed=0, progress=False, with_diffusion=False)
    return out


@pytest.fixture(scope="session")
def tiny_concat_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same untrained tiny demo (same seed, same weights) with the ``concat`` decoder KV layout."""
    from export.pipeline import export_demo

    out = tmp_path_factory.mktemp("tiny_demo_concat")
    export_demo("tiny", out, seed=0, progress=False, with_diffusion=False, kv_layout="concat")
    return out


@pytest.fixture(scope="session")
def tiny_onnx_attention_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same untrained tiny demo with the ``inplace`` layout in standard ops (``--attention onnx``:
    TensorScatter-24 + MatMul/Softmax instead of GroupQueryAttention)."""
    from export.pipeline import export_demo

    out = tmp_path_factory.mktemp("tiny_demo_onnx_attention")
    export_demo("tiny", out, seed=0, progress=False, with_diffusion=False, attention="onnx")
    return out


@pytest.fixture(scope="session")
def tiny_artifacts_with_vqgan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo exported once with its seeded VQGAN graphs (the paper's image-code path)."""
    from export.pipeline import export_demo

    out = tmp_path_factory.mktemp("tiny_demo_vqgan")
    export_demo("tiny", out, seed=0, progress=False, with_diffusion=False, with_vqgan=True)
    return out


@pytest.fixture(scope="session")
def tiny_reference(tiny_artifacts: Path):  # type: ignore[no-untyped-def]
    """The PyTorch reference model of the tiny demo (loaded from its checkpoint directory)."""
    import torch

    from export.checkpoints import load_checkpoint

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_checkpoint(tiny_artifacts / "checkpoint")


@pytest.fixture(scope="session")
def tiny_artifacts_with_diffusion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo exported once with its diffusion graphs (GenerateImage works on it)."""
    from export.pipeline import export_demo

    out = tmp_path_factory.mktemp("tiny_demo_diffusion")
    export_demo("tiny", out, seed=0, progress=False, with_diffusion=True)
    return out


@pytest.fixture(scope="session")
def tiny_semantic_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo with semantic-ID items (``unimp export --demo tiny --semantic-ids``), exported once."""
    from export.pipeline import export_demo

    out = tmp_path_factory.mktemp("tiny_semantic_demo")
    export_demo("tiny", out, seed=0, progress=False, with_diffusion=False, semantic_ids=True)
    return out


@pytest.fixture(scope="session")
def tiny_trained_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny demo (what ``unimp export --demo tiny`` builds; minutes), text graphs only."""
    from export.pipeline import export_demo

    out = tmp_path_factory.mktemp("tiny_trained_demo")
    export_demo("tiny", out, seed=0, progress=False, with_diffusion=False, trained=True)
    return out
