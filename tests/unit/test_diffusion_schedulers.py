"""The numpy schedulers reproduce diffusers' schedulers step for step and over whole loops, to float32
precision (rtol 1e-6 plus 1e-5 of the noise scale)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ddim_mod = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
euler_mod = pytest.importorskip("diffusers.schedulers.scheduling_euler_discrete")
ancestral_mod = pytest.importorskip("diffusers.schedulers.scheduling_euler_ancestral_discrete")
dpm_mod = pytest.importorskip("diffusers.schedulers.scheduling_dpmsolver_multistep")
pndm_mod = pytest.importorskip("diffusers.schedulers.scheduling_pndm")

from runtime.diffusion.schedulers import (  # noqa: E402
    SCHEDULERS,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    SchedulerConfigError,
    make_scheduler,
    resolve_scheduler_name,
)
from runtime.types import ImageScheduler  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SD15 = {  # Stable Diffusion 1.x keys
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
REFERENCE = {
    "ddim": ddim_mod.DDIMScheduler,
    "euler": euler_mod.EulerDiscreteScheduler,
    "euler_ancestral": ancestral_mod.EulerAncestralDiscreteScheduler,
    "dpmpp_2m": dpm_mod.DPMSolverMultistepScheduler,
    "pndm": pndm_mod.PNDMScheduler,
}
NOISE_MODULES = {"ddim": ddim_mod, "euler_ancestral": ancestral_mod}
CASES: list[tuple[str, dict[str, Any]]] = [
    ("ddim", {**SD15, "timestep_spacing": "leading"}),
    ("ddim", {"beta_schedule": "linear", "timestep_spacing": "linspace", "clip_sample": True}),
    (
        "ddim",
        {
            **SD15,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "set_alpha_to_one": True,
        },
    ),
    ("euler", {**SD15, "timestep_spacing": "linspace"}),
    ("euler", {**SD15, "timestep_spacing": "leading", "prediction_type": "v_prediction"}),
    ("euler", {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}),
    ("euler", {**SD15, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    ("euler_ancestral", {**SD15, "timestep_spacing": "linspace"}),
    ("euler_ancestral", {**SD15, "timestep_spacing": "leading", "prediction_type": "v_prediction"}),
    ("euler_ancestral", {**SD15, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}),
    ("dpmpp_2m", {**SD15, "timestep_spacing": "linspace"}),
    ("dpmpp_2m", {**SD15, "timestep_spacing": "leading", "prediction_type": "v_prediction"}),
    ("dpmpp_2m", {"beta_schedule": "linear", "timestep_spacing": "trailing", "solver_type": "heun"}),
    ("dpmpp_2m", {**SD15, "use_karras_sigmas": True}),
    ("dpmpp_2m", {"beta_schedule": "squaredcos_cap_v2", "final_sigmas_type": "sigma_min"}),
    ("pndm", {**SD15, "skip_prk_steps": True}),  # Stable Diffusion 1.5's scheduler_config.json
    ("pndm", {**SD15, "skip_prk_steps": True, "timestep_spacing": "linspace", "prediction_type": "v_prediction"}),
    ("pndm", {**SD15, "skip_prk_steps": True, "timestep_spacing": "trailing", "set_alpha_to_one": True}),
    ("pndm", {**SD15, "skip_prk_steps": False}),  # F-PNDM: Runge-Kutta warm-up
    ("pndm", {"beta_schedule": "linear", "timestep_spacing": "trailing", "skip_prk_steps": False}),
]
SHAPE = (2, 4, 8, 8)


F32_EPS = float(np.finfo(np.float32).eps)


def assert_timesteps_match(got: np.ndarray, want: np.ndarray) -> None:
    """Integer timesteps must be identical; fractional ones (Karras sigmas) may differ in the last bits
    between CPUs' float32 log/exp, so they are compared to rtol 1e-6 and a few ulps of the largest one."""
    assert got.shape == want.shape
    if np.issubdtype(want.dtype, np.integer):
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=4 * F32_EPS * float(np.abs(want).max()))


def _ids(case: tuple[str, dict[str, Any]]) -> str:
    name, cfg = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in cfg.items() if k not in SD15 or cfg[k] != SD15[k])


def _reference(name: str, config: dict[str, Any]) -> Any:
    cls = REFERENCE[name]
    return cls.from_config(dict(config, _class_name=cls.__name__))


def _matched_noise(monkeypatch: pytest.MonkeyPatch, name: str, seed: int) -> None:
    """Make the diffusers scheduler draw the same noise stream as ``np.random.default_rng(seed)``."""
    if name not in NOISE_MODULES:
        return
    rng = np.random.default_rng(seed)

    def randn_tensor(
        shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any
    ) -> Any:
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))

    monkeypatch.setattr(NOISE_MODULES[name], "randn_tensor", randn_tensor)


def _step_kwargs(name: str, eta: float) -> dict[str, Any]:
    return {"eta": eta} if name == "ddim" else {}


@pytest.mark.parametrize("steps", [5, 10, 25])
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_step_matches_diffusers(
    case: tuple[str, dict[str, Any]], steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, config = case
    ours, ref = make_scheduler(name, config), _reference(name, config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert_timesteps_match(np.asarray(ours.timesteps), ref.timesteps.numpy())
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    _matched_noise(monkeypatch, name, seed=7)
    scale = max(1.0, ours.init_noise_sigma)
    rng, noise_rng = np.random.default_rng(steps), np.random.default_rng(7)
    for t, t_ref in zip(ours.timesteps, ref.timesteps):
        # random inputs at every step (the sampler's state only carries its own history)
        sample = (rng.standard_normal(SHAPE, dtype=np.float32) * ours.init_noise_sigma).astype(np.float32)
        output = rng.standard_normal(SHAPE, dtype=np.float32)
        scaled = ours.scale_model_input(sample, t)
        scaled_ref = ref.scale_model_input(torch.from_numpy(sample), t_ref).numpy()
        np.testing.assert_allclose(scaled, scaled_ref, atol=1e-6, rtol=1e-6)
        got = ours.step(output, t, sample, noise_rng).prev_sample
        want = ref.step(torch.from_numpy(output), t_ref, torch.from_numpy(sample)).prev_sample.numpy()
        assert got.dtype == np.float32 and got.shape == SHAPE
        # 1e-5 in units of the noise scale (squaredcos_cap_v2 starts at sigma ~ 4e4, where one float32
        # ulp is already 4e-3) or 1e-6 of the value, whichever is larger
        np.testing.assert_allclose(got / scale, want / scale, atol=1e-5, rtol=1e-6, err_msg=f"{name} t={t}")


def _toy_model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet: smooth in x, depends on t."""
    return (0.8 * np.tanh(x) + 0.05 * np.cos(t / 100.0)).astype(np.float32)


def _run_loop(
    scheduler: Any,
    timesteps: Any,
    latents: np.ndarray,
    step: Callable[[Any, np.ndarray, Any, np.ndarray], np.ndarray],
) -> np.ndarray:
    x = latents
    for t in timesteps:
        x = step(scheduler, x, t, _toy_model(np.asarray(scheduler.scale_model_input(x, t)), float(t)))
    return x


@pytest.mark.parametrize(
    ("name", "config", "steps", "eta"),
    [
        ("ddim", SD15, 20, 0.0),
        ("ddim", SD15, 10, 0.5),
        ("euler", SD15, 20, 0.0),
        ("euler_ancestral", SD15, 20, 0.0),
        ("dpmpp_2m", SD15, 20, 0.0),
        ("dpmpp_2m", {**SD15, "use_karras_sigmas": True}, 25, 0.0),
        ("pndm", {**SD15, "skip_prk_steps": True}, 20, 0.0),
        ("pndm", {**SD15, "skip_prk_steps": True, "prediction_type": "v_prediction"}, 15, 0.0),
        ("pndm", {**SD15, "skip_prk_steps": False}, 10, 0.0),
    ],
)
def test_whole_loop_matches_diffusers(
    name: str, config: dict[str, Any], steps: int, eta: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, ref = make_scheduler(name, config), _reference(name, config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    _matched_noise(monkeypatch, name, seed=3)
    noise_rng = np.random.default_rng(3)
    latents = (
        np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32) * ours.init_noise_sigma
    ).astype(np.float32)
    kwargs = _step_kwargs(name, eta)

    def step_ours(s: Any, x: np.ndarray, t: Any, eps: np.ndarray) -> np.ndarray:
        return s.step(eps, t, x, noise_rng, **kwargs).prev_sample

    def step_ref(s: Any, x: np.ndarray, t: Any, eps: np.ndarray) -> np.ndarray:
        return s.step(torch.from_numpy(eps), t, torch.from_numpy(np.asarray(x)), **kwargs).prev_sample.numpy()

    class _TorchScaled:
        """Adapts the diffusers scheduler's scale_model_input to numpy in/out for the shared loop."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def scale_model_input(self, x: np.ndarray, t: Any) -> np.ndarray:
            return self.inner.scale_model_input(torch.from_numpy(np.asarray(x)), t).numpy()

        def step(self, eps: Any, t: Any, x: Any, **kw: Any) -> Any:
            return self.inner.step(eps, t, x, **kw)

    got = _run_loop(ours, ours.timesteps, latents, step_ours)
    want = _run_loop(_TorchScaled(ref), ref.timesteps, latents, step_ref)
    assert np.abs(got).max() < 50  # the loop ran to a sample of sane magnitude
    # samples reach |x| ~ 40: 1e-6 of the value covers last-bit differences of float32 math across CPUs
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-6)


def test_names_and_config_errors() -> None:
    assert resolve_scheduler_name("euler_a", {}) == "euler_ancestral"
    assert resolve_scheduler_name("default", {"_class_name": "EulerDiscreteScheduler"}) == "euler"
    assert resolve_scheduler_name("default", {"_class_name": "PNDMScheduler"}) is ImageScheduler.PNDM
    assert resolve_scheduler_name("default", {"_class_name": "LMSDiscreteScheduler"}) is ImageScheduler.DDIM
    assert resolve_scheduler_name("plms", {}) is ImageScheduler.PNDM
    assert resolve_scheduler_name(ImageScheduler.PNDM, {}) is ImageScheduler.PNDM
    # every request-facing scheduler has an implementation (DEFAULT resolves to one of them)
    assert set(SCHEDULERS) == set(ImageScheduler) - {ImageScheduler.DEFAULT}
    assert all(make_scheduler(member, SD15).name is resolve_scheduler_name(member, SD15) for member in ImageScheduler)
    # PNDM from another class's config is PLMS (SD's setting); a PNDM config keeps its own choice
    from_ddim, from_pndm = make_scheduler("pndm", {"_class_name": "DDIMScheduler"}), make_scheduler(
        "pndm", {"_class_name": "PNDMScheduler"}
    )
    assert isinstance(from_ddim, PNDMScheduler) and from_ddim.skip_prk_steps
    assert isinstance(from_pndm, PNDMScheduler) and not from_pndm.skip_prk_steps
    with pytest.raises(SchedulerConfigError, match="prediction_type"):
        make_scheduler("pndm", {"prediction_type": "sample"})
    with pytest.raises(SchedulerConfigError, match="Runge-Kutta"):
        make_scheduler("pndm", {"skip_prk_steps": False}).set_timesteps(3)
    pndm = make_scheduler("pndm", SD15)
    pndm.set_timesteps(4)
    assert isinstance(pndm, PNDMScheduler) and pndm.timesteps.tolist() == [751, 501, 501, 251, 1]
    with pytest.raises(KeyError):
        resolve_scheduler_name("lms", {})
    with pytest.raises(SchedulerConfigError, match="beta_schedule"):
        make_scheduler("ddim", {"beta_schedule": "quadratic"})
    with pytest.raises(SchedulerConfigError, match="use_lu_lambdas"):
        make_scheduler("dpmpp_2m", {"use_lu_lambdas": True})
    # "dpmpp_2m" is second order whatever the model's own DPM config said
    dpm = make_scheduler("dpmpp_2m", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"})
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.solver_order == 2


def test_runtime_diffusion_never_imports_torch() -> None:
    code = (
        "import sys, runtime.diffusion.schedulers, runtime.diffusion.pipeline; "
        "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr or done.stdout
