"""Text-to-image sampling loop over backend-agnostic components (numpy in, numpy out).

The loop knows three callables and nothing about the backend behind them:

* ``text_encode(ids (B, L) int64) -> (B, L, D)``
* ``unet(sample (N, C, h, w), t, context (N, L, D)) -> noise prediction (N, C, h, w)``
* ``vae_decode(latents (N, C, h, w)) -> image (N, 3, H, W)`` in [-1, 1]

``DiffusionPipeline.from_artifacts`` builds them from ``runtime.backends`` sessions and the manifest's
graph entries (tensor names, dtypes and settings come from the entries; see ``export/diffusion.py``).
Semantics follow diffusers' StableDiffusionPipeline: classifier-free guidance with the unconditional
rows first, ``latents * init_noise_sigma`` at the start, ``latents / scaling_factor`` into the VAE and
``round(255 * clip(image / 2 + 0.5, 0, 1))`` out of it. Under guidance the conditional and
unconditional rows go through ONE UNet call per step (N = 2B) unless the UNet graph has a static batch.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from PIL import Image
from tokenizers import Tokenizer

from runtime.backends import BackendConfig, Session, open_session
from runtime.diffusion.schedulers import (
    Scheduler,
    SchedulerConfigError,
    make_scheduler,
    resolve_scheduler_name,
    scheduler_names,
)
from runtime.manifest import GraphEntry, Manifest, ManifestError
from runtime.types import Cancelled, DeadlineExceeded, ImageScheduler, InvalidRequest, Unavailable

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
TextEncodeFn = Callable[[npt.NDArray[np.int64]], FloatArray]
UNetFn = Callable[[FloatArray, float, FloatArray], FloatArray]
VaeDecodeFn = Callable[[FloatArray], FloatArray]
SessionFactory = Callable[[Path], Session]

MAX_STEPS = 200
MAX_GUIDANCE = 30.0
GRAPH_KEYS = ("text_encoder", "unet", "vae_decoder")


class SupportsCancelled(Protocol):
    """runtime.types.CancelToken or anything with a ``cancelled`` flag (an optional ``deadline`` is honoured)."""

    @property
    def cancelled(self) -> bool: ...


CancelCheck = Callable[[], bool] | SupportsCancelled


# -- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSizeBounds:
    """Pixel sizes the exported graphs accept (both sides, independently)."""

    min: int
    opt: int
    """Default size: the UNet's native resolution."""
    max: int
    multiple: int = 8
    """Sizes must be multiples of this (pixels per latent)."""


@dataclass(frozen=True)
class DiffusionSettings:
    """Model-level settings, read once from the unet graph's ``extra`` (written by export)."""

    scheduler_config: dict[str, Any]
    """The diffusers scheduler_config.json the model shipped with."""
    image_size: ImageSizeBounds
    latent_channels: int = 4
    vae_scale_factor: int = 8
    """Pixels per latent along each side."""
    vae_scaling_factor: float = 0.18215
    vae_shift_factor: float = 0.0
    max_batch: int = 4
    """Most images per request."""
    text_max_length: int = 77

    @staticmethod
    def from_extra(extra: Mapping[str, Any]) -> DiffusionSettings:
        try:
            size = extra["image_size"]
            return DiffusionSettings(
                scheduler_config=dict(extra["scheduler_config"]),
                image_size=ImageSizeBounds(
                    min=int(size["min"]),
                    opt=int(size["opt"]),
                    max=int(size["max"]),
                    multiple=int(size["multiple"]),
                ),
                latent_channels=int(extra["latent_channels"]),
                vae_scale_factor=int(extra["vae_scale_factor"]),
                vae_scaling_factor=float(extra["vae_scaling_factor"]),
                vae_shift_factor=float(extra.get("vae_shift_factor", 0.0)),
                max_batch=int(extra.get("max_batch", 4)),
                text_max_length=int(extra["text_max_length"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"the unet graph's diffusion settings are incomplete or malformed: {exc!r}"
            ) from exc


@dataclass(frozen=True)
class PromptTokenizer:
    """CLIP-style prompt encoding: [bos] tokens[: L - 2] [eos] [pad ...], always exactly L ids."""

    tokenizer: Tokenizer
    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int

    @staticmethod
    def from_file(path: Path, info: Mapping[str, Any]) -> PromptTokenizer:
        tok = Tokenizer.from_file(str(path))
        tok.no_padding()  # padding and truncation are done here, identically for every backend
        tok.no_truncation()
        return PromptTokenizer(
            tok, int(info["bos_id"]), int(info["eos_id"]), int(info["pad_id"]), int(info["max_length"])
        )

    def __call__(self, prompts: Sequence[str]) -> npt.NDArray[np.int64]:
        body = self.max_length - 2
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)  # (B, L)
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
            tokens = encoding.ids[:body]
            if len(encoding.ids) > body:
                log.info("prompt truncated from %d to %d tokens", len(encoding.ids), body)
            ids[row, : len(tokens) + 2] = [self.bos_id, *tokens, self.eos_id]
        return ids


# -- request, progress, result --------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationParams:
    """One text-to-image request (already personalised: the prompt comes from the LLM)."""

    prompt: str
    negative_prompt: str = ""
    """Text for the unconditional rows of classifier-free guidance ("" = unconditional)."""
    width: int | None = None
    """Pixels; None or 0 = the model's native size. A multiple of ``ImageSizeBounds.multiple`` within bounds."""
    height: int | None = None
    steps: int = 20
    """Denoising steps, 1..200."""
    guidance_scale: float = 7.5
    """0..30; values <= 1 disable classifier-free guidance (half the UNet work)."""
    seed: int = 0
    """Seeds the initial latents and any sampler noise (numpy PCG64)."""
    scheduler: ImageScheduler | str = ImageScheduler.DDIM
    """An ImageScheduler (or its value or an alias: euler_a, dpm++_2m, plms); DEFAULT is the model's
    own scheduler class when the runtime implements it. ``validate`` resolves it to a concrete member."""
    num_images: int = 1


@dataclass(frozen=True)
class StepProgress:
    step: int
    """1-based index of the step just finished."""
    total: int
    timestep: float
    elapsed: float
    """Seconds since the request started."""


@dataclass(frozen=True)
class DiffusionTimings:
    """Seconds per component for one request."""

    text_encoder: float = 0.0
    unet_steps: tuple[float, ...] = ()
    """UNet time of each denoising step (both guidance halves together)."""
    vae_decoder: float = 0.0
    total: float = 0.0

    @property
    def unet(self) -> float:
        return float(sum(self.unet_steps))

    def as_dict(self) -> dict[str, float]:
        steps = len(self.unet_steps)
        return {
            "text_encoder": self.text_encoder,
            "unet": self.unet,
            "unet_per_step": self.unet / steps if steps else 0.0,
            "vae_decoder": self.vae_decoder,
            "total": self.total,
            "steps": float(steps),
        }


@dataclass(frozen=True)
class GenerationResult:
    images: npt.NDArray[np.uint8]
    """(N, H, W, 3) RGB."""
    latents: FloatArray
    """(N, C, h, w) final latents, before the VAE scaling."""
    params: GenerationParams
    """The request as run (sizes and scheduler resolved)."""
    timings: DiffusionTimings = field(default_factory=DiffusionTimings)

    def png(self, index: int = 0) -> bytes:
        return encode_png(self.images[index])


def encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def to_uint8(image: FloatArray) -> npt.NDArray[np.uint8]:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounding like diffusers' image processor."""
    unit = np.clip(image * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
    return np.round(unit.transpose(0, 2, 3, 1) * np.float32(255)).astype(np.uint8)


def _check_cancel(cancel: CancelCheck | None) -> None:
    if cancel is None:
        return
    deadline = getattr(cancel, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("image generation passed its deadline")
    cancelled = cancel() if callable(cancel) else bool(cancel.cancelled)
    if cancelled:
        raise Cancelled("image generation was cancelled")


# -- session adapters -----------------------------------------------------------------------------


def _names(entry: GraphEntry, inputs: Sequence[str], outputs: Sequence[str]) -> dict[str, str]:
    """Role -> tensor name from ``extra["roles"]``; without it, the documented I/O order."""
    roles = entry.extra.get("roles", {})
    names = {}
    for specs, wanted in ((entry.inputs, inputs), (entry.outputs, outputs)):
        for i, role in enumerate(wanted):
            if role in roles:
                names[role] = roles[role]
            elif i < len(specs):
                names[role] = specs[i].name
            else:
                raise ManifestError(f"graph {entry.file} has no tensor for {role!r}")
    return names


def _text_encoder_fn(session: Session, entry: GraphEntry) -> TextEncodeFn:
    n = _names(entry, ["input_ids"], ["last_hidden_state"])
    dtype = np.dtype(entry.input(n["input_ids"]).dtype)

    def run(ids: npt.NDArray[np.int64]) -> FloatArray:
        return session.run({n["input_ids"]: ids.astype(dtype, copy=False)}, [n["last_hidden_state"]])[
            n["last_hidden_state"]
        ]

    return run


def _unet_fn(session: Session, entry: GraphEntry) -> UNetFn:
    n = _names(entry, ["sample", "timestep", "encoder_hidden_states"], ["noise_pred"])
    t_spec = entry.input(n["timestep"])
    t_dtype = np.dtype(t_spec.dtype)

    def run(sample: FloatArray, t: float, context: FloatArray) -> FloatArray:
        if not t_spec.shape:  # scalar
            tv = np.asarray(t, dtype=t_dtype)
        elif t_spec.shape[0] == 1:  # (1,), broadcast inside the graph
            tv = np.full((1,), t, dtype=t_dtype)
        else:  # (N,)
            tv = np.full((sample.shape[0],), t, dtype=t_dtype)
        feeds = {
            n["sample"]: np.ascontiguousarray(sample, dtype=np.float32),
            n["timestep"]: tv,
            n["encoder_hidden_states"]: np.ascontiguousarray(context, dtype=np.float32),
        }
        return session.run(feeds, [n["noise_pred"]])[n["noise_pred"]]

    return run


def _vae_decoder_fn(session: Session, entry: GraphEntry) -> VaeDecodeFn:
    n = _names(entry, ["latents"], ["image"])

    def run(latents: FloatArray) -> FloatArray:
        return session.run({n["latents"]: np.ascontiguousarray(latents, dtype=np.float32)}, [n["image"]])[
            n["image"]
        ]

    return run


# -- the pipeline ---------------------------------------------------------------------------------


class DiffusionPipeline:
    """Prompt -> images. Thread-safe: every request builds its own scheduler and random generator."""

    def __init__(
        self,
        text_encode: TextEncodeFn,
        unet: UNetFn,
        vae_decode: VaeDecodeFn,
        settings: DiffusionSettings,
        tokenizer: Callable[[Sequence[str]], npt.NDArray[np.int64]] | None = None,
        *,
        batch_guidance: bool = True,
    ) -> None:
        """``tokenizer`` maps prompts to (B, L) ids (None: only ``prompt_ids`` requests work).
        ``batch_guidance``: run the guidance halves as one UNet batch (False: two calls per step, for
        backends whose UNet has a static batch of 1)."""
        self.text_encode = text_encode
        self.unet = unet
        self.vae_decode = vae_decode
        self.settings = settings
        self.tokenizer = tokenizer
        self.batch_guidance = batch_guidance

    @classmethod
    def from_artifacts(
        cls,
        root: Path,
        manifest: Manifest | Mapping[str, GraphEntry],
        session_factory: SessionFactory | None = None,
        *,
        batch_guidance: bool | None = None,
    ) -> DiffusionPipeline:
        """Open the three diffusion graphs of an artifacts directory (``manifest`` or just its graphs).

        ``session_factory(path) -> Session`` defaults to ONNX Runtime on CPU. Raises Unavailable when
        the artifacts carry no diffusion graphs.
        """
        root = Path(root)
        graphs = manifest.graphs if isinstance(manifest, Manifest) else manifest
        missing = [k for k in GRAPH_KEYS if k not in graphs]
        if missing:
            raise Unavailable(
                f"these artifacts have no image generation graphs (missing {', '.join(missing)})"
            )
        factory = session_factory or (lambda path: open_session(path, BackendConfig()))
        te, un, va = (graphs[k] for k in GRAPH_KEYS)
        settings = DiffusionSettings.from_extra(un.extra)
        info = te.extra.get("tokenizer")
        tokenizer = PromptTokenizer.from_file(root / info["file"], info) if info else None
        if batch_guidance is None:
            # a UNet exported (or built as an engine) with a static batch cannot take both halves at once
            sample = un.input(_names(un, ["sample"], [])["sample"])
            batch_guidance = not isinstance(sample.shape[0], int) or sample.shape[0] >= 2
        return cls(
            _text_encoder_fn(factory(root / te.file), te),
            _unet_fn(factory(root / un.file), un),
            _vae_decoder_fn(factory(root / va.file), va),
            settings,
            tokenizer,
            batch_guidance=batch_guidance,
        )

    # -- validation -------------------------------------------------------------------------------

    def validate(self, params: GenerationParams) -> GenerationParams:
        """Check every field (InvalidRequest names the first bad one); returns the request with the
        image size and scheduler name resolved."""
        bounds = self.settings.image_size
        if not isinstance(params.prompt, str):
            raise InvalidRequest("prompt must be a string", field="prompt")
        if not isinstance(params.negative_prompt, str):
            raise InvalidRequest("negative_prompt must be a string", field="negative_prompt")
        sizes = {}
        for name in ("width", "height"):
            value = getattr(params, name)
            value = bounds.opt if value is None or value == 0 else value
            if not _is_int(value):
                raise InvalidRequest(f"{name} must be an integer number of pixels", field=name)
            if value % bounds.multiple:
                raise InvalidRequest(f"{name}={value} must be a multiple of {bounds.multiple}", field=name)
            if not bounds.min <= value <= bounds.max:
                raise InvalidRequest(
                    f"{name}={value} is outside {bounds.min}..{bounds.max} for this model", field=name
                )
            sizes[name] = int(value)
        if not _is_int(params.steps) or not 1 <= params.steps <= MAX_STEPS:
            raise InvalidRequest(
                f"steps={params.steps!r} must be an integer in 1..{MAX_STEPS}", field="steps"
            )
        g = params.guidance_scale
        if (
            isinstance(g, bool)
            or not isinstance(g, (int, float))
            or not math.isfinite(g)
            or not 0 <= g <= MAX_GUIDANCE
        ):
            raise InvalidRequest(
                f"guidance_scale={g!r} must be a number in 0..{MAX_GUIDANCE:g}", field="guidance_scale"
            )
        if not _is_int(params.seed) or not 0 <= params.seed < 2**64:
            raise InvalidRequest(f"seed={params.seed!r} must be an integer in 0..2^64-1", field="seed")
        if not _is_int(params.num_images) or not 1 <= params.num_images <= self.settings.max_batch:
            raise InvalidRequest(
                f"num_images={params.num_images!r} must be in 1..{self.settings.max_batch}",
                field="num_images",
            )
        try:
            scheduler = resolve_scheduler_name(params.scheduler, self.settings.scheduler_config)
        except KeyError:
            raise InvalidRequest(
                f"unknown scheduler {params.scheduler!r}; choose one of {', '.join(scheduler_names())}",
                field="scheduler",
            ) from None
        return replace(params, width=sizes["width"], height=sizes["height"], scheduler=scheduler)

    # -- sampling ---------------------------------------------------------------------------------

    def stream(
        self,
        params: GenerationParams,
        *,
        cancel: CancelCheck | None = None,
        latents: FloatArray | None = None,
        prompt_ids: npt.NDArray[np.int64] | None = None,
    ) -> Iterator[StepProgress | GenerationResult]:
        """Validate now, then yield one StepProgress per denoising step and finally the GenerationResult.

        ``latents`` (N, C, h, w) replaces the seeded initial noise (before ``init_noise_sigma``);
        ``prompt_ids`` (2, L) = [negative, prompt] ids (or (1, L) without guidance) bypasses the
        tokenizer. ``cancel`` is checked before every step and before the VAE: Cancelled /
        DeadlineExceeded.
        """
        p = self.validate(params)
        try:
            scheduler = make_scheduler(p.scheduler, self.settings.scheduler_config)
            scheduler.set_timesteps(p.steps)
        except SchedulerConfigError as exc:
            raise InvalidRequest(
                f"scheduler {ImageScheduler(p.scheduler).value!r} cannot run this model: {exc}", field="scheduler"
            ) from exc
        n, c, f = p.num_images, self.settings.latent_channels, self.settings.vae_scale_factor
        shape = (n, c, cast(int, p.height) // f, cast(int, p.width) // f)  # sizes resolved by validate
        if latents is not None and tuple(latents.shape) != shape:
            raise InvalidRequest(
                f"latents have shape {tuple(latents.shape)}, expected {shape}", field="latents"
            )
        guided = p.guidance_scale > 1.0
        if prompt_ids is None:
            if self.tokenizer is None:
                raise Unavailable("this pipeline has no tokenizer; pass prompt_ids")
            prompt_ids = self.tokenizer([p.negative_prompt, p.prompt] if guided else [p.prompt])
        elif prompt_ids.shape[0] != (2 if guided else 1):
            raise InvalidRequest(
                "prompt_ids must hold [negative, prompt] rows under guidance", field="prompt_ids"
            )
        return self._run(p, scheduler, shape, guided, prompt_ids, cancel, latents)

    def generate(
        self,
        params: GenerationParams,
        *,
        progress: Callable[[StepProgress], None] | None = None,
        cancel: CancelCheck | None = None,
        latents: FloatArray | None = None,
        prompt_ids: npt.NDArray[np.int64] | None = None,
    ) -> GenerationResult:
        """``stream`` run to the end; ``progress`` is called after every step."""
        for event in self.stream(params, cancel=cancel, latents=latents, prompt_ids=prompt_ids):
            if isinstance(event, GenerationResult):
                return event
            if progress is not None:
                progress(event)
        raise AssertionError("stream ended without a result")  # pragma: no cover

    def _run(
        self,
        p: GenerationParams,
        scheduler: Scheduler,
        shape: tuple[int, int, int, int],
        guided: bool,
        prompt_ids: npt.NDArray[np.int64],
        cancel: CancelCheck | None,
        latents: FloatArray | None,
    ) -> Iterator[StepProgress | GenerationResult]:
        start = time.perf_counter()
        n = shape[0]
        _check_cancel(cancel)
        t0 = time.perf_counter()
        embeddings = self.text_encode(prompt_ids)  # (1 or 2, L, D)
        text_s = time.perf_counter() - t0
        cond = np.repeat(embeddings[-1:], n, axis=0)  # (N, L, D)
        uncond = np.repeat(embeddings[:1], n, axis=0) if guided else None
        # (2N, L, D) with the unconditional rows first, as diffusers orders them
        context = np.concatenate([uncond, cond]) if guided and self.batch_guidance else cond

        rng = np.random.default_rng(p.seed)
        x = rng.standard_normal(shape, dtype=np.float32) if latents is None else latents.astype(np.float32)
        x = x * np.float32(scheduler.init_noise_sigma)  # (N, C, h, w)
        g = float(p.guidance_scale)
        unet_steps: list[float] = []
        total = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            _check_cancel(cancel)
            t_val = float(t)
            t0 = time.perf_counter()
            if guided and self.batch_guidance:
                scaled = scheduler.scale_model_input(np.concatenate([x, x]), t)  # (2N, C, h, w)
                out = self.unet(scaled, t_val, context)
                noise_uncond, noise_cond = out[:n], out[n:]
            elif guided:
                scaled = scheduler.scale_model_input(x, t)
                noise_uncond = self.unet(scaled, t_val, cast(FloatArray, uncond))
                noise_cond = self.unet(scaled, t_val, cond)
            else:
                noise_cond = self.unet(scheduler.scale_model_input(x, t), t_val, cond)
            unet_steps.append(time.perf_counter() - t0)
            noise = noise_uncond + g * (noise_cond - noise_uncond) if guided else noise_cond
            x = scheduler.step(noise, t, x, rng).prev_sample
            yield StepProgress(step=i + 1, total=total, timestep=t_val, elapsed=time.perf_counter() - start)

        _check_cancel(cancel)
        t0 = time.perf_counter()
        z = x / np.float32(self.settings.vae_scaling_factor)
        if self.settings.vae_shift_factor:
            z = z + np.float32(self.settings.vae_shift_factor)
        image = self.vae_decode(z)  # (N, 3, H, W) in [-1, 1]
        vae_s = time.perf_counter() - t0
        timings = DiffusionTimings(text_s, tuple(unet_steps), vae_s, time.perf_counter() - start)
        log.debug("generated %d image(s) %dx%d in %.2fs", n, p.width, p.height, timings.total)
        yield GenerationResult(images=to_uint8(image), latents=x, params=p, timings=timings)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
