"""The ONNX diffusion pipeline (numpy schedulers, no torch) equals diffusers' StableDiffusionPipeline.

One tiny demo model is built and exported per module; both sides get the same weights, scheduler
config, prompt ids / embeddings and initial latents (and, for ancestral sampling, the same noise).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from runtime.diffusion.pipeline import (  # noqa: E402
    DiffusionPipeline,
    GenerationParams,
    GenerationResult,
    PromptTokenizer,
    StepProgress,
)
from runtime.types import Cancelled, CancelToken, InvalidRequest  # noqa: E402

TORCH_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}
TORCH_OVERRIDES = {"pndm": {"skip_prk_steps": True}}
"""The runtime's PNDM on a non-PNDM model config is PLMS, as Stable Diffusion configures it."""
PROMPT = "a red leather boot, vintage style photo"
NEGATIVE = "blue plastic"


class Exported:
    def __init__(self, root: Path) -> None:
        from export.diffusion import build_demo_diffusion, export_diffusion

        self.source = build_demo_diffusion(root / "source", seed=0)
        self.out = root / "artifacts"
        self.result = export_diffusion(self.source, self.out, progress=False)
        self.graphs = self.result.graphs


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    torch.set_num_threads(2)
    return Exported(tmp_path_factory.mktemp("diffusion"))


@pytest.fixture(scope="module")
def pipe(exported: Exported) -> DiffusionPipeline:
    return DiffusionPipeline.from_artifacts(exported.out, exported.graphs)


@pytest.fixture(scope="module")
def reference(exported: Exported) -> Any:
    """diffusers' own pipeline on the same tiny weights (the tokenizer is only there to satisfy it)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    src = exported.source
    sd: Any = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(src / "vae", low_cpu_mem_usage=False),
        text_encoder=CLIPTextModel.from_pretrained(src / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(src / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(src / "unet", low_cpu_mem_usage=False),
        scheduler=diffusers.DDIMScheduler.from_pretrained(src / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def _torch_generate(
    sd: Any,
    pipe: DiffusionPipeline,
    params: GenerationParams,
    latents: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' pipeline with the runtime's prompt ids and latents; returns (images in [0, 1], latents)."""
    assert pipe.tokenizer is not None
    ids = torch.from_numpy(pipe.tokenizer([params.negative_prompt, params.prompt]))
    with torch.no_grad():
        embeds = sd.text_encoder(ids).last_hidden_state  # (2, L, D)
    n = params.num_images
    cls = getattr(diffusers, TORCH_SCHEDULERS[params.scheduler])
    sd.scheduler = cls.from_config({**pipe.settings.scheduler_config, **TORCH_OVERRIDES.get(params.scheduler, {})})
    # ancestral noise: the runtime draws it from default_rng(seed) once the latents are given
    rng = np.random.default_rng(params.seed)
    monkeypatch.setattr(
        diffusers.schedulers.scheduling_euler_ancestral_discrete,
        "randn_tensor",
        lambda shape, **_: torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)),
    )
    final: dict[str, Any] = {}

    def keep_latents(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        final["latents"] = kwargs["latents"]
        return {}

    out = sd(
        prompt_embeds=embeds[1:].repeat(n, 1, 1),
        negative_prompt_embeds=embeds[:1].repeat(n, 1, 1),
        latents=torch.from_numpy(latents),
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        height=params.height,
        width=params.width,
        output_type="np",
        callback_on_step_end=keep_latents,
    )
    return out.images, final["latents"].numpy()


@pytest.mark.parametrize(
    ("scheduler", "width", "height", "num_images"),
    [("ddim", 64, 64, 1), ("euler", 56, 40, 2), ("dpmpp_2m", 64, 48, 1), ("euler_ancestral", 64, 64, 1),
     ("pndm", 64, 56, 1)],
)
def test_pipeline_matches_diffusers(
    pipe: DiffusionPipeline,
    reference: Any,
    scheduler: str,
    width: int,
    height: int,
    num_images: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = GenerationParams(
        PROMPT, NEGATIVE, width=width, height=height, steps=8, guidance_scale=7.5, seed=5,
        scheduler=scheduler, num_images=num_images,
    )  # fmt: skip
    init = np.random.default_rng(123).standard_normal(
        (num_images, 4, height // 8, width // 8), dtype=np.float32
    )
    ours = pipe.generate(params, latents=init)
    want_images, want_latents = _torch_generate(reference, pipe, params, init, monkeypatch)

    assert ours.images.shape == (num_images, height, width, 3) and ours.images.dtype == np.uint8
    np.testing.assert_allclose(ours.latents, want_latents, atol=1e-4, rtol=1e-5)
    pixel_diff = np.abs(ours.images.astype(np.float32) / 255.0 - want_images).max()
    assert pixel_diff <= 2 / 255, f"max pixel difference {pixel_diff * 255:.2f}/255"
    assert ours.images.std() > 5  # not a flat image: the comparison means something


def test_text_encoder_and_tokenizer_match(
    exported: Exported, pipe: DiffusionPipeline, reference: Any
) -> None:
    from transformers import AutoTokenizer

    assert isinstance(pipe.tokenizer, PromptTokenizer)
    hf = AutoTokenizer.from_pretrained(exported.source / "tokenizer")
    prompts = [PROMPT, "", "Unknown WORDS here!", " ".join(["red"] * 40)]  # the last one is truncated
    ids = pipe.tokenizer(prompts)
    length = pipe.settings.text_max_length
    want = hf(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    np.testing.assert_array_equal(ids, np.asarray(want))
    with torch.no_grad():
        emb_ref = reference.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(pipe.text_encode(ids), emb_ref, atol=1e-4, rtol=1e-5)


def test_clip_tokenizer_conversion(tmp_path: Path) -> None:
    """A real SD directory's CLIP BPE tokenizer (here: a tiny ASCII vocabulary) encodes the same ids
    through the exported tokenizer.json as through transformers, SD 2.x "!" padding included."""
    from transformers import AutoTokenizer, CLIPTokenizer

    from export.diffusion import export_tokenizer

    chars = [chr(c) for c in range(33, 127)]  # printable ASCII map to themselves in byte-level BPE
    words = ["re", "red</w>", "bo", "boo", "boot</w>"]
    vocab = [*chars, *(c + "</w>" for c in chars), *words, "<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\nb o\nbo o\nboo t</w>\n")
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="!").save_pretrained(
        tmp_path / "tokenizer"
    )
    hf = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    info = export_tokenizer(hf, tmp_path, "diffusion/tokenizer.json", max_length=12)
    assert info["pad_id"] == 0 and info["bos_id"] == vocab.index("<|startoftext|>")
    ours = PromptTokenizer.from_file(tmp_path / info["file"], info)
    prompts = ["Red boot", "a red, RED boot!!", "red boot " * 10, ""]
    want = hf(prompts, padding="max_length", max_length=12, truncation=True).input_ids
    np.testing.assert_array_equal(ours(prompts), np.asarray(want))


def test_guidance_batching_equals_two_calls(exported: Exported, pipe: DiffusionPipeline) -> None:
    calls: list[int] = []

    def counting_unet(sample: np.ndarray, t: float, context: np.ndarray) -> np.ndarray:
        calls.append(sample.shape[0])
        return pipe.unet(sample, t, context)

    def build(batch: bool) -> DiffusionPipeline:
        return DiffusionPipeline(
            pipe.text_encode,
            counting_unet,
            pipe.vae_decode,
            pipe.settings,
            pipe.tokenizer,
            batch_guidance=batch,
        )

    params = GenerationParams(
        PROMPT, NEGATIVE, steps=5, guidance_scale=6.0, seed=11, scheduler="euler", num_images=2
    )
    batched = build(True).generate(params)
    assert calls == [4] * 5  # one UNet call per step with uncond + cond rows
    calls.clear()
    separate = build(False).generate(params)
    assert calls == [2] * 10  # two calls per step
    np.testing.assert_allclose(batched.latents, separate.latents, atol=1e-5, rtol=1e-6)
    assert np.abs(batched.images.astype(int) - separate.images.astype(int)).max() <= 1
    # guidance <= 1 skips the unconditional half entirely
    calls.clear()
    build(True).generate(GenerationParams(PROMPT, steps=3, guidance_scale=1.0))
    assert calls == [1] * 3


def test_progress_timings_png_and_cancel(pipe: DiffusionPipeline) -> None:
    seen: list[StepProgress] = []
    params = GenerationParams(PROMPT, steps=4, seed=1, scheduler="dpmpp_2m")
    result = pipe.generate(params, progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4] and all(p.total == 4 for p in seen)
    timings = result.timings.as_dict()
    assert timings["steps"] == 4 and timings["text_encoder"] > 0 and timings["vae_decoder"] > 0
    assert len(result.timings.unet_steps) == 4 and timings["total"] >= timings["unet"]
    decoded = Image.open(io.BytesIO(result.png()))
    assert decoded.size == (64, 64) and decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), result.images[0])
    # same seed, same image; streaming yields progress then the result
    events: Iterator[Any] = pipe.stream(params)
    last = list(events)[-1]
    assert isinstance(last, GenerationResult)
    np.testing.assert_array_equal(last.images, result.images)

    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        for _ in pipe.stream(GenerationParams(PROMPT, steps=10), cancel=token):
            pass
    steps_done: list[StepProgress] = []
    with pytest.raises(Cancelled):
        pipe.generate(
            GenerationParams(PROMPT, steps=10),
            progress=steps_done.append,
            cancel=lambda: len(steps_done) >= 3,
        )
    assert len(steps_done) == 3


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"width": 60}, "width"),
        ({"height": 256}, "height"),
        ({"height": 16}, "height"),
        ({"steps": 0}, "steps"),
        ({"steps": 201}, "steps"),
        ({"guidance_scale": 30.5}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"scheduler": "lms"}, "scheduler"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 5}, "num_images"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_requests_name_the_field(pipe: DiffusionPipeline, change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        pipe.stream(GenerationParams(PROMPT, **change))
    assert info.value.field == field
    assert field in str(info.value) or "scheduler" in str(info.value)
