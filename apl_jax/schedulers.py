"""Stable Diffusion 1.x's noise schedule and samplers, as small pure functions.

Training uses the DDPM forward process (`alphas_cumprod`, `add_noise`). Sampling uses
DDIM, PNDM (its PLMS steps, as SD runs it) or DPM-Solver++ 2M. A sampler is split in two:

- `plan(config, kind, steps)`: numpy, once per sampler. The timestep of every model call
  and every per-call coefficient, computed in float64 and stored as float32.
- `step(kind, plan, history, i, model_output, sample)`: model call i's update, pure jax,
  for `lax.fori_loop` with a traced i; `history` (the multistep methods' earlier model
  outputs, from `init_history`) travels in the loop's carry.

They follow diffusers' PyTorch DDIMScheduler, PNDMScheduler (skip_prk_steps) and
DPMSolverMultistepScheduler (order 2, midpoint, lower_order_final) step for step;
tests/test_schedulers.py compares the trajectories. The config is diffusers'
scheduler_config.json, so folders we write stay readable by diffusers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from apl_jax.errors import UserError

SAMPLERS = ("ddim", "pndm", "dpm++")
SPACINGS = ("leading", "linspace", "trailing")
# diffusers' default spacing per scheduler class, used when the config names none
DEFAULT_SPACING = {"ddim": "leading", "pndm": "leading", "dpm++": "linspace"}
BETA_SCHEDULES = ("linear", "scaled_linear")
FINAL_SIGMAS = ("zero", "sigma_min")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """diffusers' scheduler_config.json keys that SD 1.x sampling reads; defaults are SD 1.x's values.

    Other keys of a diffusers config (variance_type, ...) are ignored on reading.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None  # overrides the three above
    prediction_type: str = "epsilon"
    clip_sample: bool = False  # DDIM: clip its x0 estimate to +-clip_sample_range (the plan's "clip")
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False  # DDIM/PNDM: the alpha past the last step is 1, else alphas_cumprod[0]
    steps_offset: int = 1  # added to "leading" timesteps
    skip_prk_steps: bool = True  # written for diffusers; our PNDM always runs PLMS steps only, as SD does
    timestep_spacing: str | None = None  # None: each sampler's diffusers default (DEFAULT_SPACING)
    final_sigmas_type: str = "zero"  # DPM++: the last step lands on noise 0, or on alphas_cumprod[0]'s

    def __post_init__(self):
        choices = {"beta_schedule": BETA_SCHEDULES, "timestep_spacing": (None, *SPACINGS),
                   "final_sigmas_type": FINAL_SIGMAS, "prediction_type": ("epsilon",)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                names = ", ".join(str(a) for a in allowed)
                raise UserError(f"scheduler config: {key} must be one of {names}, got {getattr(self, key)!r}")
        if self.num_train_timesteps < 1:
            raise UserError(f"scheduler config: num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise UserError(f"scheduler config: trained_betas has {len(self.trained_betas)} values, "
                            f"num_train_timesteps is {self.num_train_timesteps}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> SchedulerConfig:
        """From a parsed scheduler_config.json; keys this class does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in config.items() if key in known}
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The keys diffusers reads; unset optional ones are left out, so diffusers keeps its per-class defaults."""
        values = dataclasses.asdict(self)
        return {key: value for key, value in values.items() if value is not None}

    def save(self, folder: str | Path, class_name: str) -> None:
        """FOLDER/scheduler_config.json, with diffusers' `_class_name` (e.g. "DDPMScheduler")."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": class_name, **self.to_dict()}
        (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- training: the forward process

def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """float32 [T]: the product of (1 - beta) up to each timestep."""
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps) ** 2
    else:
        betas = np.linspace(config.beta_start, config.beta_end, config.num_train_timesteps)
    return np.cumprod(1.0 - betas).astype(np.float32)


def add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """q(x_t | x0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, per example's timestep t [B]."""
    a = alphas_cumprod[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


# ---------------------------------------------------------------- sampling: plans

def _timesteps(config: SchedulerConfig, kind: str, steps: int) -> np.ndarray:
    """Descending int timesteps, diffusers' set_timesteps for each spacing (DPM++ divides by steps + 1)."""
    total = config.num_train_timesteps
    spacing = config.timestep_spacing or DEFAULT_SPACING[kind]
    points = steps + 1 if kind == "dpm++" else steps
    if spacing == "linspace":
        ts = np.linspace(0, total - 1, points).round()[::-1]
    elif spacing == "leading":
        ts = np.arange(points)[::-1] * (total // points) + config.steps_offset
    else:  # trailing
        ts = np.round(np.arange(total, 0, -total / steps)) - 1
    if kind == "dpm++" and spacing != "trailing":
        ts = ts[:-1]
    if ts.max() >= total:
        raise UserError(f"{steps} {kind} steps with steps_offset {config.steps_offset} pass the model's last "
                        f"timestep {total - 1}")
    return ts.astype(np.int64)


def _final_alpha(config: SchedulerConfig, ac: np.ndarray) -> float:
    return 1.0 if config.set_alpha_to_one else float(ac[0])


def _alpha_at(ac: np.ndarray, t: np.ndarray, final: float) -> np.ndarray:
    """alphas_cumprod at t, and `final` where t < 0 (past the last step)."""
    return np.where(t >= 0, ac[np.maximum(t, 0)], final)


def _ddim_plan(config, ac, steps):
    ts = _timesteps(config, "ddim", steps)
    a_t = ac[ts]
    a_prev = _alpha_at(ac, ts - config.num_train_timesteps // steps, _final_alpha(config, ac))
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    clip = np.full(len(ts), config.clip_sample_range if config.clip_sample else np.inf)
    return {"timesteps": ts, "alpha": a_t, "alpha_prev": a_prev, "variance": variance, "clip": clip}


# PLMS's combination of the new output and up to three stored ones, by model call count:
# [new, stored[-1], stored[-2], stored[-3]]. Call 1 re-takes call 0's step with the mean
# of both outputs (a Heun-like start) and is never stored.
_PLMS_WEIGHTS = np.array([
    [1, 0, 0, 0],
    [1 / 2, 1 / 2, 0, 0],
    [3 / 2, -1 / 2, 0, 0],
    [23 / 12, -16 / 12, 5 / 12, 0],
    [55 / 24, -59 / 24, 37 / 24, -9 / 24],
])


def _pndm_plan(config, ac, steps):
    ascending = _timesteps(config, "pndm", steps)[::-1]
    # steps + 1 model calls: the second-to-last timestep twice (diffusers' plms_timesteps)
    ts = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
    ratio = config.num_train_timesteps // steps
    calls = np.arange(len(ts))
    correction = calls == 1
    t_from = np.where(correction, ts + ratio, ts)  # call 1 restarts from call 0's sample and timestep
    t_to = np.where(correction, ts, ts - ratio)
    a_t, a_prev = ac[t_from], _alpha_at(ac, t_to, _final_alpha(config, ac))
    denominator = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
    return {"timesteps": ts, "correction": correction, "weights": _PLMS_WEIGHTS[np.minimum(calls, 4)],
            "sample_coeff": np.sqrt(a_prev / a_t), "output_coeff": (a_prev - a_t) / denominator}


def _dpm_plan(config, ac, steps):
    ts = _timesteps(config, "dpm++", steps)
    sigmas = np.sqrt((1 - ac) / ac)[ts]  # variance-exploding sigmas, as diffusers
    last = 0.0 if config.final_sigmas_type == "zero" else np.sqrt((1 - ac[0]) / ac[0])
    sigmas = np.concatenate([sigmas, [last]])
    alpha = 1 / np.sqrt(sigmas**2 + 1)  # back to variance-preserving alpha_t, sigma_t
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):  # sigma 0 at the end: lambda = +inf, exp(-h) = 0
        lam = np.log(alpha) - np.log(sigma)
    h = lam[1:] - lam[:-1]
    n = len(ts)
    # First order at the first call, and at the last one for few steps or a final sigma of 0 (diffusers' lower_order_final)
    first_order = np.zeros(n, bool)
    first_order[0] = True
    first_order[-1] |= n < 15 or config.final_sigmas_type == "zero"
    previous_h = np.concatenate([[1.0], h[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        correction = np.where(first_order, 0.0, 0.5 * h / previous_h)  # 0.5 / r0 of DPM-Solver++(2M) midpoint
    return {"timesteps": ts, "to_x0": np.stack([1 / alpha[:-1], sigma[:-1] / alpha[:-1]], axis=1),
            "sample_coeff": sigma[1:] / sigma[:-1], "output_coeff": alpha[1:] * -np.expm1(-h),
            "correction": correction}


_PLANS = {"ddim": _ddim_plan, "pndm": _pndm_plan, "dpm++": _dpm_plan}


def plan(config: SchedulerConfig, kind: str, steps: int) -> dict[str, np.ndarray]:
    """Per model call: "timesteps" (int32, the UNet's t) and the coefficients `step` reads."""
    if kind not in SAMPLERS:
        raise UserError(f"scheduler must be one of {', '.join(SAMPLERS)}, got {kind!r}")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if steps > config.num_train_timesteps:
        raise UserError(f"steps must be at most the model's {config.num_train_timesteps} training timesteps, got {steps}")
    tables = _PLANS[kind](config, alphas_cumprod(config).astype(np.float64), steps)
    return {key: value if value.dtype == bool else value.astype(np.int32 if key == "timesteps" else np.float32)
            for key, value in tables.items()}


def init_history(kind: str, shape: tuple[int, ...]) -> dict[str, jax.Array]:
    """The multistep methods' memory, zeros at the start: PNDM's last three stored outputs and its
    restart sample, DPM++'s previous x0 estimate; DDIM has none."""
    if kind == "pndm":
        return {"stored": jnp.zeros((3, *shape)), "restart": jnp.zeros(shape)}
    if kind == "dpm++":
        return {"previous_x0": jnp.zeros(shape)}
    return {}


# ---------------------------------------------------------------- sampling: steps

def _ddim_step(plan, history, i, eps, sample, eta, noise):
    a_t, a_prev = plan["alpha"][i], plan["alpha_prev"][i]
    x0 = jnp.clip((sample - jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(a_t), -plan["clip"][i], plan["clip"][i])
    std = eta * jnp.sqrt(plan["variance"][i])
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std**2) * eps
    if noise is not None:
        prev = prev + std * noise
    return prev, history


def _pndm_step(plan, history, i, eps, sample, eta, noise):
    stored, correction = history["stored"], plan["correction"][i]
    w = plan["weights"][i]
    combined = w[0] * eps + w[1] * stored[2] + w[2] * stored[1] + w[3] * stored[0]
    start = jnp.where(correction, history["restart"], sample)
    prev = plan["sample_coeff"][i] * start - plan["output_coeff"][i] * combined
    history = {"stored": jnp.where(correction, stored, jnp.concatenate([stored[1:], eps[None]])), "restart": start}
    return prev, history


def _dpm_step(plan, history, i, eps, sample, eta, noise):
    to_x0 = plan["to_x0"][i]
    x0 = to_x0[0] * sample - to_x0[1] * eps
    derivative = plan["correction"][i] * (x0 - history["previous_x0"])
    prev = plan["sample_coeff"][i] * sample + plan["output_coeff"][i] * (x0 + derivative)
    return prev, {"previous_x0": x0}


_STEPS = {"ddim": _ddim_step, "pndm": _pndm_step, "dpm++": _dpm_step}


def step(kind: str, plan: Mapping[str, jax.Array], history, i, model_output: jax.Array, sample: jax.Array,
         eta: jax.Array | float = 0.0, noise: jax.Array | None = None):
    """Model call i's update: (the sample one step less noisy, the new history).

    `eta` and `noise` (a standard normal draw shaped like `sample`) are DDIM's stochastic term,
    eta * sigma_t * noise; the other samplers ignore them.
    """
    return _STEPS[kind](plan, history, i, model_output, sample, eta, noise)
