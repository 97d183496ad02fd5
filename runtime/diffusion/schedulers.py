"""Numpy noise schedulers for latent diffusion, constructed from a diffusers ``scheduler_config.json``.

Five samplers cover what SD 1.x/2.x deployments use: DDIM, Euler discrete, Euler ancestral,
DPM-Solver++ 2M and PNDM (PLMS, SD 1.5's default). Each mirrors the diffusers class of the same name (same config keys and defaults,
same timestep spacings, beta schedules and prediction types) so that an exported model samples the
same images without torch: ``set_timesteps(n)``, ``scale_model_input(sample, t)``,
``step(model_output, t, sample, generator)``, ``init_noise_sigma``.

Precision follows diffusers on purpose: its tables and per-step scalars are float32 tensors, so they
are float32 here too (numpy >= 2 keeps ``np.float32 op python float`` in float32). Computing them in
float64 instead drifts by ~1e-6 per step on Euler samples of magnitude ~15, enough to break 1e-5 parity.

Stochastic samplers (Euler ancestral, DDIM with eta > 0) draw their noise from the caller's
``numpy.random.Generator``, one ``standard_normal(model_output.shape, float32)`` draw per step.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import numpy as np
import numpy.typing as npt

from runtime.types import ImageScheduler, image_scheduler_choices

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SPACINGS = ("leading", "trailing", "linspace")


class SchedulerConfigError(ValueError):
    """The scheduler config asks for something this runtime does not implement (or is malformed)."""


@dataclass(frozen=True)
class StepOutput:
    prev_sample: FloatArray
    """x_{t-1}: the next loop input, same shape as the sample."""
    pred_original_sample: FloatArray
    """The model's estimate of x_0 at this step."""


@dataclass(frozen=True)
class NoiseSchedule:
    """The keys every scheduler shares, read once from the diffusers config."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    """How betas go from beta_start to beta_end over the training timesteps."""
    trained_betas: tuple[float, ...] | None = None
    """Explicit betas; override beta_start/beta_end/beta_schedule when given."""
    prediction_type: PredictionType = "epsilon"
    """What the UNet predicts: the noise, the velocity v (SD 2.x 768), or x_0."""
    timestep_spacing: TimestepSpacing = "leading"
    """How n inference timesteps are picked from the training ones (diffusers' three rules)."""
    steps_offset: int = 0
    """Added to "leading" timesteps (SD 1.x uses 1)."""
    rescale_betas_zero_snr: bool = False
    """Rescale betas so the last timestep has zero SNR (arXiv 2305.08891)."""

    @staticmethod
    def from_config(config: Mapping[str, Any], spacing_default: TimestepSpacing) -> NoiseSchedule:
        def choice(key: str, allowed: tuple[str, ...], default: str) -> Any:
            value = config.get(key, default)
            if value not in allowed:
                raise SchedulerConfigError(f"scheduler config {key}={value!r} is not one of {list(allowed)}")
            return value

        trained = config.get("trained_betas")
        return NoiseSchedule(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=choice("beta_schedule", _BETA_SCHEDULES, "linear"),
            trained_betas=tuple(float(b) for b in trained) if trained is not None else None,
            prediction_type=choice("prediction_type", _PREDICTION_TYPES, "epsilon"),
            timestep_spacing=choice("timestep_spacing", _SPACINGS, spacing_default),
            steps_offset=int(config.get("steps_offset", 0)),
            rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )


# -- tables ---------------------------------------------------------------------------------------


def _linspace_f32(start: float, end: float, n: int) -> FloatArray:
    """float32 linspace rounded like torch's CPU kernel (the reference the configs were made with).

    torch fills the first half as start + step*i and the second as end - step*(n-1-i), each with one
    fused multiply-add in float32; float64 arithmetic rounded once reproduces it bit for bit. Plain
    np.linspace differs in the last bit of ~1 in 3 betas.
    """
    lo, hi = np.float32(start), np.float32(end)
    step = np.float32((hi - lo) / np.float32(n - 1)) if n > 1 else np.float32(0)
    i = np.arange(n, dtype=np.float64)
    front = (np.float64(lo) + np.float64(step) * i).astype(np.float32)
    back = (np.float64(hi) - np.float64(step) * (n - 1 - i)).astype(np.float32)
    return np.where(np.arange(n) < n // 2, front, back).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> FloatArray:
    """Betas of "squaredcos_cap_v2": discretising alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def _cumprod_f32(values: FloatArray) -> FloatArray:
    # torch accumulates float32 cumprod in double on CPU; a float32 running product drifts ~1e-6.
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: FloatArray) -> FloatArray:
    """Shift and scale sqrt(alphas_cumprod) so it ends at 0 and keeps its first value (2305.08891, Alg. 1)."""
    root = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_bar = root**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _betas(schedule: NoiseSchedule) -> FloatArray:
    n = schedule.num_train_timesteps
    if schedule.trained_betas is not None:
        betas = np.asarray(schedule.trained_betas, dtype=np.float32)
    elif schedule.beta_schedule == "linear":
        betas = _linspace_f32(schedule.beta_start, schedule.beta_end, n)
    elif schedule.beta_schedule == "scaled_linear":
        # Stable Diffusion: linear in sqrt(beta)
        betas = _linspace_f32(schedule.beta_start**0.5, schedule.beta_end**0.5, n) ** 2
    else:
        betas = _cosine_betas(n)
    if schedule.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _sigma_to_t(sigma: npt.NDArray[np.float64], log_sigmas: FloatArray) -> npt.NDArray[np.float64]:
    """Fractional training timestep whose log-sigma matches ``sigma`` (linear interpolation in log space)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]  # (train, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def _karras_sigmas(
    sigmas: npt.NDArray[Any], n: int, sigma_min: float | None, sigma_max: float | None
) -> npt.NDArray[np.float64]:
    """Karras et al. (2022) rho=7 spacing between sigma_max and sigma_min."""
    lo = float(sigma_min if sigma_min is not None else sigmas[-1])
    hi = float(sigma_max if sigma_max is not None else sigmas[0])
    ramp = np.linspace(0, 1, n)
    rho = 7.0
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _log32(x: np.float32) -> np.float32:
    # float32 log/exp rounded from float64: torch's scalar kernels are correctly rounded, numpy's SIMD
    # float32 ones are not (1-ulp differences in lambda grow ~1/h in the DPM-Solver coefficients)
    with np.errstate(divide="ignore"):  # log(0) = -inf is meaningful at the final sigma
        return np.float32(np.log(np.float64(x)))


def _exp32(x: np.float32) -> np.float32:
    return np.float32(np.exp(np.float64(x)))


def _noise(generator: np.random.Generator | None, shape: tuple[int, ...]) -> FloatArray:
    rng = generator if generator is not None else np.random.default_rng()
    return rng.standard_normal(shape, dtype=np.float32)


def _unsupported(config: Mapping[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> Any:
    value = config.get(key, default)
    if value not in allowed:
        raise SchedulerConfigError(
            f"scheduler config {key}={value!r} is not supported by this runtime (supported: {list(allowed)})"
        )
    return value


# -- schedulers -----------------------------------------------------------------------------------


class Scheduler(ABC):
    """Common state: the noise schedule, the inference timesteps and the step counter."""

    name: ClassVar[ImageScheduler]
    spacing_default: ClassVar[TimestepSpacing] = "linspace"
    zero_snr_floor: ClassVar[bool] = True
    """Sigma-based schedulers clamp the last alphas_cumprod to 2^-24 under zero-SNR rescaling
    (sigma would be infinite otherwise); DDIM does not."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.schedule = NoiseSchedule.from_config(config, self.spacing_default)
        self.betas = _betas(self.schedule)
        self.alphas_cumprod = _cumprod_f32(np.float32(1.0) - self.betas)  # (train,)
        if self.schedule.rescale_betas_zero_snr and self.zero_snr_floor:
            self.alphas_cumprod[-1] = np.float32(2.0**-24)
        self.num_inference_steps: int | None = None
        self.timesteps: npt.NDArray[Any] = np.arange(self.schedule.num_train_timesteps)[::-1].copy()
        self._step_index: int | None = None

    @property
    def prediction_type(self) -> PredictionType:
        return self.schedule.prediction_type

    @property
    @abstractmethod
    def init_noise_sigma(self) -> float:
        """Scale of the initial Gaussian latents."""

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int) -> None:
        """Pick the inference timesteps (descending) and reset the step counter."""

    def scale_model_input(self, sample: FloatArray, timestep: float) -> FloatArray:
        """The UNet input for ``sample`` at ``timestep`` (identity unless the sampler works in sigma space)."""
        return sample

    @abstractmethod
    def step(
        self,
        model_output: FloatArray,
        timestep: float,
        sample: FloatArray,
        generator: np.random.Generator | None = None,
    ) -> StepOutput:
        """One reverse step from ``timestep``: returns x_{t-1} for the (B, C, h, w) ``sample``."""

    def _require_timesteps(self) -> int:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}.set_timesteps must be called before stepping")
        return self.num_inference_steps

    def _index_for(self, timestep: float) -> int:
        """Position of ``timestep`` in the schedule; the second hit when it repeats (diffusers' rule,
        so a schedule starting with a duplicate does not skip a sigma)."""
        hits = np.flatnonzero(self.timesteps == timestep)
        if hits.size == 0:
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps")
        return int(hits[1] if hits.size > 1 else hits[0])

    def _current_index(self, timestep: float) -> int:
        if self._step_index is None:
            self._step_index = self._index_for(timestep)
        return self._step_index


def _discrete_timesteps(schedule: NoiseSchedule, n: int) -> npt.NDArray[np.int64]:
    """(n,) descending integer training timesteps for ``n`` inference steps, spaced as diffusers spaces
    them (``linspace``, ``leading`` + steps_offset, or ``trailing``); DDIM and PNDM share this."""
    train = schedule.num_train_timesteps
    if not 1 <= n <= train:
        raise ValueError(f"num_inference_steps must be in 1..{train}, got {n}")
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, train - 1, n).round()[::-1].astype(np.int64)
    if schedule.timestep_spacing == "leading":
        return (np.arange(0, n) * (train // n)).round()[::-1].astype(np.int64) + schedule.steps_offset
    return np.round(np.arange(train, 0, -train / n)).astype(np.int64) - 1


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models (Song et al. 2020); deterministic at eta = 0."""

    name = ImageScheduler.DDIM
    spacing_default = "leading"
    zero_snr_floor = False

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        _unsupported(config, "thresholding", (False,), False)
        self.clip_sample = bool(config.get("clip_sample", True))
        self.clip_sample_range = float(config.get("clip_sample_range", 1.0))
        set_alpha_to_one = bool(config.get("set_alpha_to_one", True))
        # alphas_cumprod "before" the first training step, used by the last inference step
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = _discrete_timesteps(self.schedule, num_inference_steps)
        self.num_inference_steps = num_inference_steps

    def step(
        self,
        model_output: FloatArray,
        timestep: float,
        sample: FloatArray,
        generator: np.random.Generator | None = None,
        eta: float = 0.0,
    ) -> StepOutput:
        n = self._require_timesteps()
        t = int(timestep)
        # DDIM always steps back by train // n, whatever the spacing rule picked.
        prev_t = t - self.schedule.num_train_timesteps // n
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        if self.prediction_type == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        else:  # v_prediction: v = sqrt(a) * eps - sqrt(1 - a) * x0
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = np.float32(eta) * variance**0.5
        prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            prev = prev + std * _noise(generator, model_output.shape)
        return StepOutput(prev.astype(np.float32, copy=False), x0.astype(np.float32, copy=False))


class _SigmaScheduler(Scheduler):
    """Samplers that work on x = x_0 + sigma * eps (k-diffusion form): sigma = sqrt((1 - a) / a)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.train_sigmas: FloatArray = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # (train,)
        self.sigmas: FloatArray = np.concatenate([self.train_sigmas[::-1], [0.0]]).astype(np.float32)
        self.timesteps = np.linspace(
            0, self.schedule.num_train_timesteps - 1, self.schedule.num_train_timesteps
        )[::-1].copy()

    def _spaced_timesteps(self, n: int) -> npt.NDArray[np.float32]:
        train = self.schedule.num_train_timesteps
        spacing = self.schedule.timestep_spacing
        if spacing == "linspace":
            return np.linspace(0, train - 1, n, dtype=np.float32)[::-1].copy()
        if spacing == "leading":
            steps = (np.arange(0, n) * (train // n)).round()[::-1].astype(np.float32)
            return steps + np.float32(self.schedule.steps_offset)
        return np.arange(train, 0, -train / n).round().astype(np.float32) - np.float32(1)

    @property
    def init_noise_sigma(self) -> float:
        top = self.sigmas.max()
        if self.schedule.timestep_spacing in ("linspace", "trailing"):
            return float(top)
        return float((top**2 + 1) ** 0.5)

    def scale_model_input(self, sample: FloatArray, timestep: float) -> FloatArray:
        sigma = self.sigmas[self._current_index(timestep)]
        return sample / ((sigma**2 + 1) ** 0.5)

    def _x0(self, model_output: FloatArray, sample: FloatArray, sigma: np.float32) -> FloatArray:
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        if self.prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        return model_output


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""

    name = ImageScheduler.EULER

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        _unsupported(config, "interpolation_type", ("linear",), "linear")
        _unsupported(config, "use_exponential_sigmas", (False, None), False)
        _unsupported(config, "use_beta_sigmas", (False, None), False)
        self.use_karras_sigmas = bool(config.get("use_karras_sigmas") or False)
        self.sigma_min: float | None = config.get("sigma_min")
        self.sigma_max: float | None = config.get("sigma_max")
        self.final_sigmas_type = _unsupported(config, "final_sigmas_type", ("zero", "sigma_min"), "zero")
        self.timestep_type = _unsupported(config, "timestep_type", ("discrete", "continuous"), "discrete")
        if self._continuous:
            self.timesteps = np.asarray([0.25 * _log32(s) for s in self.sigmas[:-1]], dtype=np.float32)

    @property
    def _continuous(self) -> bool:
        # the UNet is conditioned on 0.25 * log(sigma) instead of a timestep (v-prediction upscalers)
        return self.timestep_type == "continuous" and self.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = num_inference_steps
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        timesteps: npt.NDArray[Any] = self._spaced_timesteps(n)
        log_sigmas = np.log(self.train_sigmas)
        sigmas: npt.NDArray[Any] = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        if self.use_karras_sigmas:
            sigmas = _karras_sigmas(sigmas, n, self.sigma_min, self.sigma_max)
            timesteps = _sigma_to_t(sigmas, log_sigmas)
        last = self.train_sigmas[0] if self.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)  # (n + 1,)
        if self._continuous:
            self.timesteps = np.asarray([0.25 * _log32(s) for s in self.sigmas[:-1]], dtype=np.float32)
        else:
            self.timesteps = timesteps.astype(np.float32)
        self.num_inference_steps = n
        self._step_index = None

    def step(
        self,
        model_output: FloatArray,
        timestep: float,
        sample: FloatArray,
        generator: np.random.Generator | None = None,
    ) -> StepOutput:
        self._require_timesteps()
        i = self._current_index(timestep)
        sigma = self.sigmas[i]
        sample = sample.astype(np.float32, copy=False)
        x0 = self._x0(model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (self.sigmas[i + 1] - sigma)
        self._step_index = i + 1
        return StepOutput(prev.astype(np.float32, copy=False), x0.astype(np.float32, copy=False))


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """Euler steps down to sigma_down, then fresh noise back up to sigma_to (ancestral sampling)."""

    name = ImageScheduler.EULER_ANCESTRAL

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        if self.prediction_type == "sample":
            raise SchedulerConfigError("euler_ancestral does not support prediction_type='sample'")

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = num_inference_steps
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        timesteps = self._spaced_timesteps(n)
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # (n + 1,)
        self.timesteps = timesteps
        self.num_inference_steps = n
        self._step_index = None

    def step(
        self,
        model_output: FloatArray,
        timestep: float,
        sample: FloatArray,
        generator: np.random.Generator | None = None,
    ) -> StepOutput:
        self._require_timesteps()
        i = self._current_index(timestep)
        sigma_from, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        sample = sample.astype(np.float32, copy=False)
        x0 = self._x0(model_output, sample, sigma_from)
        # split the move to sigma_to into a deterministic part (to sigma_down) and fresh noise (sigma_up)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma_from
        prev = sample + derivative * (sigma_down - sigma_from)
        prev = prev + _noise(generator, model_output.shape) * sigma_up  # drawn even when sigma_up == 0
        self._step_index = i + 1
        return StepOutput(prev.astype(np.float32, copy=False), x0.astype(np.float32, copy=False))


class DPMSolverMultistepScheduler(_SigmaScheduler):
    """DPM-Solver++ (Lu et al. 2022) in data-prediction form; order 2 = "DPM++ 2M"."""

    name = ImageScheduler.DPMPP_2M

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        _unsupported(config, "algorithm_type", ("dpmsolver++",), "dpmsolver++")
        _unsupported(config, "thresholding", (False,), False)
        _unsupported(config, "variance_type", (None,), None)
        for key in ("use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"):
            _unsupported(config, key, (False, None), False)
        self.solver_order = int(_unsupported(config, "solver_order", (1, 2), 2))
        self.solver_type = _unsupported(config, "solver_type", ("midpoint", "heun"), "midpoint")
        self.lower_order_final = bool(config.get("lower_order_final", True))
        self.euler_at_final = bool(config.get("euler_at_final", False))
        self.use_karras_sigmas = bool(config.get("use_karras_sigmas") or False)
        self.final_sigmas_type = _unsupported(config, "final_sigmas_type", ("zero", "sigma_min"), "zero")
        self.lambda_min_clipped = float(config.get("lambda_min_clipped", -math.inf))
        alpha_t = np.sqrt(self.alphas_cumprod)
        sigma_t = np.sqrt(1 - self.alphas_cumprod)
        self.lambdas: FloatArray = (  # (train,) half log-SNR
            np.log(alpha_t.astype(np.float64)) - np.log(sigma_t.astype(np.float64))
        ).astype(np.float32)
        self.sigmas = self.train_sigmas.copy()
        self._history: list[FloatArray | None] = [None] * self.solver_order
        self._lower_order_nums = 0

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample: FloatArray, timestep: float) -> FloatArray:
        return sample

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = num_inference_steps
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        train = self.schedule.num_train_timesteps
        # timesteps whose half log-SNR is below lambda_min_clipped are never visited
        clipped = int(np.searchsorted(self.lambdas[::-1], self.lambda_min_clipped))
        last = train - clipped
        spacing = self.schedule.timestep_spacing
        timesteps: npt.NDArray[Any]
        if spacing == "linspace":
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ratio = last // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            timesteps = timesteps + self.schedule.steps_offset
        else:
            timesteps = np.arange(last, 0, -train / n).round().astype(np.int64) - 1
        sigmas: npt.NDArray[Any] = self.train_sigmas
        if self.use_karras_sigmas:
            log_sigmas = np.log(sigmas)
            sigmas = _karras_sigmas(np.flip(sigmas), n, None, None)
            timesteps = _sigma_to_t(sigmas, log_sigmas)
            if self.schedule.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
        last_sigma = self.train_sigmas[0] if self.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)  # (n + 1,)
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self._history = [None] * self.solver_order
        self._lower_order_nums = 0
        self._step_index = None

    def _index_for(self, timestep: float) -> int:
        hits = np.flatnonzero(self.timesteps == timestep)
        if hits.size == 0:
            return len(self.timesteps) - 1
        return int(hits[1] if hits.size > 1 else hits[0])

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        # x = alpha * x0 + sigma_t * eps with alpha = 1 / sqrt(1 + sigma^2)
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def step(
        self,
        model_output: FloatArray,
        timestep: float,
        sample: FloatArray,
        generator: np.random.Generator | None = None,
    ) -> StepOutput:
        self._require_timesteps()
        i = self._current_index(timestep)
        count = len(self.timesteps)
        final = i == count - 1 and (
            self.euler_at_final or (self.lower_order_final and count < 15) or self.final_sigmas_type == "zero"
        )
        # (diffusers' "lower order at the second-to-last step" rule only matters for third order)

        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        x0: FloatArray  # the model output converted to a data (x_0) prediction
        if self.prediction_type == "epsilon":
            x0 = ((sample - sigma_s * model_output) / alpha_s).astype(np.float32, copy=False)
        elif self.prediction_type == "v_prediction":
            x0 = (alpha_s * sample - sigma_s * model_output).astype(np.float32, copy=False)
        else:
            x0 = model_output.astype(np.float32, copy=False)
        self._history = [*self._history[1:], x0]
        sample = sample.astype(np.float32, copy=False)

        if self.solver_order == 1 or self._lower_order_nums < 1 or final:
            prev = self._first_order(x0, sample, i)
        else:
            prev = self._second_order(sample, i)
        if self._lower_order_nums < self.solver_order:
            self._lower_order_nums += 1
        self._step_index = i + 1
        return StepOutput(prev.astype(np.float32, copy=False), x0)

    def _lambda(self, index: int) -> tuple[np.float32, np.float32, np.float32]:
        alpha, sigma = self._alpha_sigma(self.sigmas[index])
        # sigma = 0 at the very end: lambda = +inf, exp(-h) = 0 and the step lands on x0
        return alpha, sigma, _log32(alpha) - _log32(sigma)

    def _first_order(self, x0: FloatArray, sample: FloatArray, i: int) -> FloatArray:
        alpha_t, sigma_t, lambda_t = self._lambda(i + 1)
        _, sigma_s, lambda_s = self._lambda(i)
        h = lambda_t - lambda_s
        return (sigma_t / sigma_s) * sample - (alpha_t * (_exp32(-h) - 1.0)) * x0

    def _second_order(self, sample: FloatArray, i: int) -> FloatArray:
        alpha_t, sigma_t, lambda_t = self._lambda(i + 1)
        _, sigma_s0, lambda_s0 = self._lambda(i)
        _, _, lambda_s1 = self._lambda(i - 1)
        m0, m1 = cast(FloatArray, self._history[-1]), cast(FloatArray, self._history[-2])
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)  # value and scaled first difference of x0 predictions
        if self.solver_type == "midpoint":
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (_exp32(-h) - 1.0)) * d0
                - 0.5 * (alpha_t * (_exp32(-h) - 1.0)) * d1
            )
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (_exp32(-h) - 1.0)) * d0
            + (alpha_t * ((_exp32(-h) - 1.0) / h + 1.0)) * d1
        )


class PNDMScheduler(Scheduler):
    """Pseudo numerical methods for diffusion models (Liu et al. 2022, arXiv 2202.09778).

    With ``skip_prk_steps`` (Stable Diffusion's config) this is PLMS: linear multistep over the last
    four noise predictions, warmed up by one extra model call at the first timestep (so n steps make
    n + 1 UNet calls, the first timestep listed twice). Without it, F-PNDM: three Runge-Kutta steps
    (four model calls each, at half steps) before the multistep ones. State is a step counter, as in
    diffusers, so ``step`` must see the timesteps in order.
    """

    name = ImageScheduler.PNDM
    spacing_default = "leading"
    zero_snr_floor = False
    order = 4

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        _unsupported(config, "prediction_type", ("epsilon", "v_prediction"), "epsilon")
        _unsupported(config, "rescale_betas_zero_snr", (False,), False)
        self.skip_prk_steps = bool(config.get("skip_prk_steps", False))
        set_alpha_to_one = bool(config.get("set_alpha_to_one", False))
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.prk_timesteps: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self._reset()

    def _reset(self) -> None:
        self._counter = 0
        self._ets: list[FloatArray] = []
        """Noise predictions of the multistep history (at most four kept)."""
        self._cur_sample: FloatArray | None = None
        self._cur_output: FloatArray | None = None
        """Runge-Kutta: the weighted sum of this step's model outputs so far."""

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        n, train = num_inference_steps, self.schedule.num_train_timesteps
        base = _discrete_timesteps(self.schedule, n)[::-1]  # ascending
        if self.skip_prk_steps:
            self.prk_timesteps = np.zeros(0, dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            if n < self.order:
                raise SchedulerConfigError(
                    f"PNDM's Runge-Kutta warm-up needs at least {self.order} steps (or skip_prk_steps=true)"
                )
            half = train // n // 2
            prk = base[-self.order :].repeat(2) + np.tile(np.array([0, half]), self.order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].astype(np.int64)
            plms = base[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self.num_inference_steps = n
        self._reset()

    def step(
        self,
        model_output: FloatArray,
        timestep: float,
        sample: FloatArray,
        generator: np.random.Generator | None = None,
    ) -> StepOutput:
        self._require_timesteps()
        model_output = model_output.astype(np.float32, copy=False)
        sample = sample.astype(np.float32, copy=False)
        if self._counter < len(self.prk_timesteps) and not self.skip_prk_steps:
            return self._step_prk(model_output, int(timestep), sample)
        return self._step_plms(model_output, int(timestep), sample)

    def _step_prk(self, model_output: FloatArray, t: int, sample: FloatArray) -> StepOutput:
        n = cast(int, self.num_inference_steps)
        c = self._counter
        prev_t = t - (0 if c % 2 else self.schedule.num_train_timesteps // n // 2)
        t = int(self.prk_timesteps[c // 4 * 4])
        phase = c % 4
        if phase == 0:
            self._cur_output = np.float32(1 / 6) * model_output
            self._ets.append(model_output)
            self._cur_sample = sample
        elif phase in (1, 2):
            self._cur_output = cast(FloatArray, self._cur_output) + np.float32(1 / 3) * model_output
        else:
            model_output = cast(FloatArray, self._cur_output) + np.float32(1 / 6) * model_output
            self._cur_output = None
        base = self._cur_sample if self._cur_sample is not None else sample
        prev, x0 = self._prev_sample(base, t, prev_t, model_output)
        self._counter += 1
        return StepOutput(prev, x0)

    def _step_plms(self, model_output: FloatArray, t: int, sample: FloatArray) -> StepOutput:
        if not self.skip_prk_steps and len(self._ets) < 3:
            raise RuntimeError("PNDM's multistep phase needs the Runge-Kutta warm-up steps first")
        ratio = self.schedule.num_train_timesteps // cast(int, self.num_inference_steps)
        prev_t = t - ratio
        if self._counter != 1:
            self._ets = [*self._ets[-3:], model_output]
        else:  # the warm-up call: the first timestep again, averaged with the first prediction
            prev_t, t = t, t + ratio
        ets = self._ets
        if len(ets) == 1 and self._counter == 0:
            self._cur_sample = sample
        elif len(ets) == 1 and self._counter == 1:
            model_output = (model_output + ets[-1]) / np.float32(2)
            sample = cast(FloatArray, self._cur_sample)
            self._cur_sample = None
        elif len(ets) == 2:
            model_output = (np.float32(3) * ets[-1] - ets[-2]) / np.float32(2)
        elif len(ets) == 3:
            model_output = (np.float32(23) * ets[-1] - np.float32(16) * ets[-2] + np.float32(5) * ets[-3]) / np.float32(
                12
            )
        else:
            model_output = np.float32(1 / 24) * (
                np.float32(55) * ets[-1] - np.float32(59) * ets[-2] + np.float32(37) * ets[-3] - np.float32(9) * ets[-4]
            )
        prev, x0 = self._prev_sample(sample, t, prev_t, model_output)
        self._counter += 1
        return StepOutput(prev, x0)

    def _prev_sample(
        self, sample: FloatArray, t: int, prev_t: int, model_output: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """x_{t - delta} from x_t and the (combined) noise prediction: the paper's formula (9)."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.prediction_type == "v_prediction":  # convert v to the noise prediction
            model_output = a_t**0.5 * model_output + b_t**0.5 * sample
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        prev = sample_coeff * sample - (a_prev - a_t) * model_output / denom
        x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
        return prev.astype(np.float32, copy=False), x0.astype(np.float32, copy=False)


SCHEDULERS: dict[ImageScheduler, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        DDIMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
        PNDMScheduler,
    )
}
"""Request-facing schedulers -> classes: every ImageScheduler but DEFAULT."""

_DIFFUSERS_CLASSES = {
    "DDIMScheduler": ImageScheduler.DDIM,
    "EulerDiscreteScheduler": ImageScheduler.EULER,
    "EulerAncestralDiscreteScheduler": ImageScheduler.EULER_ANCESTRAL,
    "DPMSolverMultistepScheduler": ImageScheduler.DPMPP_2M,
    "PNDMScheduler": ImageScheduler.PNDM,
}


def scheduler_names() -> tuple[str, ...]:
    """Every accepted scheduler name (ImageScheduler values, then aliases)."""
    return image_scheduler_choices()


def resolve_scheduler_name(name: ImageScheduler | str, config: Mapping[str, Any]) -> ImageScheduler:
    """The concrete scheduler for ``name`` (a member, its value or an alias); DEFAULT is the model's own
    scheduler class when it is one of ours (DDIM otherwise). Raises KeyError for unknown names."""
    try:
        choice = ImageScheduler.parse(name)
    except ValueError:
        raise KeyError(name) from None
    if choice is ImageScheduler.DEFAULT:
        return _DIFFUSERS_CLASSES.get(str(config.get("_class_name", "")), ImageScheduler.DDIM)
    return choice


def make_scheduler(name: ImageScheduler | str, config: Mapping[str, Any]) -> Scheduler:
    """Scheduler ``name`` configured from a diffusers scheduler config of any class (like ``from_config``:
    shared keys carry over, the rest take this class's defaults)."""
    canonical = resolve_scheduler_name(name, config)
    cfg = dict(config)
    if canonical is ImageScheduler.DPMPP_2M:
        # "2M" is second-order multistep DPM-Solver++ whatever solver the model shipped with
        cfg.update(algorithm_type="dpmsolver++", solver_order=2)
    if canonical is ImageScheduler.PNDM and cfg.get("_class_name") != "PNDMScheduler":
        # a model that ships another scheduler gets PNDM as Stable Diffusion configures it (PLMS,
        # steps + 1 UNet calls), not diffusers' class default (Runge-Kutta warm-up, steps + 9 calls)
        cfg.setdefault("skip_prk_steps", True)
    return SCHEDULERS[canonical](cfg)
