"""Our schedulers against diffusers' PyTorch ones, on the same fake model outputs."""

import functools
import json

import jax
import numpy as np
import pytest

from apl_jax import schedulers
from apl_jax.errors import UserError
from conftest import REPO, assert_close

SHAPE = (2, 4, 8, 8)
SD1 = schedulers.SchedulerConfig()
TORCH = "the PyTorch parity tests need torch (pip install -r requirements-pt.txt)"


def fake_noise_prediction(x: np.ndarray, t: int) -> np.ndarray:
    """A smooth, t-dependent stand-in for a UNet, in float32 numpy: both sides see the same function."""
    x = np.asarray(x, np.float32)
    return (np.tanh(0.7 * x + np.float32(np.sin(t / 97.0))) + np.float32(0.05 * np.cos(t / 13.0)) * x).astype(np.float32)


def initial_noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def step_noise(i):
    return np.random.default_rng(1000 + i).standard_normal(SHAPE).astype(np.float32)


@functools.cache
def _jitted_step(kind):
    return jax.jit(functools.partial(schedulers.step, kind))


def our_trajectory(config, kind, steps, eta=0.0):
    """Every sample after every model call; i is traced, as inside the sampler's fori_loop."""
    plan = {k: jax.numpy.asarray(v) for k, v in schedulers.plan(config, kind, steps).items()}
    history = schedulers.init_history(kind, SHAPE)
    x, samples = initial_noise(), []
    for i, t in enumerate(np.asarray(plan["timesteps"])):
        x, history = _jitted_step(kind)(plan, history, np.int32(i), fake_noise_prediction(x, int(t)), x,
                                        np.float32(eta), step_noise(i))
        x = np.asarray(x)
        samples.append(x)
    return np.asarray(plan["timesteps"]), samples


def torch_scheduler(config, kind):
    pytest.importorskip("torch", reason=TORCH)
    import diffusers

    classes = {"ddim": diffusers.DDIMScheduler, "pndm": diffusers.PNDMScheduler,
               "dpm++": diffusers.DPMSolverMultistepScheduler}
    return classes[kind].from_config(config.to_dict())


def torch_trajectory(config, kind, steps, eta=0.0):
    import torch

    scheduler = torch_scheduler(config, kind)
    scheduler.set_timesteps(steps)
    x, samples = torch.from_numpy(initial_noise()), []
    for i, t in enumerate(scheduler.timesteps):
        eps = torch.from_numpy(fake_noise_prediction(x.numpy(), int(t)))
        extra = {"eta": eta, "variance_noise": torch.from_numpy(step_noise(i))} if kind == "ddim" else {}
        x = scheduler.step(eps, t, x, **extra).prev_sample
        samples.append(x.numpy().copy())
    return scheduler.timesteps.numpy(), samples


def assert_same_trajectory(config, kind, steps, eta=0.0):
    ours_t, ours = our_trajectory(config, kind, steps, eta)
    theirs_t, theirs = torch_trajectory(config, kind, steps, eta)
    np.testing.assert_array_equal(ours_t, theirs_t)
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        try:
            assert_close(a, b)
        except AssertionError as err:
            raise AssertionError(f"model call {i} (t={ours_t[i]}): {err}") from None


@pytest.mark.parametrize("steps", [20, 7, 13])
@pytest.mark.parametrize("kind", schedulers.SAMPLERS)
def test_trajectories_match_diffusers(kind, steps):
    assert_same_trajectory(SD1, kind, steps)


@pytest.mark.parametrize("steps", [20, 9])
def test_ddim_with_eta_adds_the_same_noise_as_diffusers(steps):
    assert_same_trajectory(SD1, "ddim", steps, eta=0.8)


@pytest.mark.parametrize("kind", schedulers.SAMPLERS)
@pytest.mark.parametrize("spacing", schedulers.SPACINGS)
def test_every_timestep_spacing_matches_diffusers(kind, spacing):
    assert_same_trajectory(schedulers.SchedulerConfig(timestep_spacing=spacing), kind, 11)


@pytest.mark.parametrize("steps", [20, 5])
def test_dpm_final_sigma_min_matches_diffusers(steps):
    """With the last noise level at alphas_cumprod[0]'s, 15+ steps end on a second-order step."""
    assert_same_trajectory(schedulers.SchedulerConfig(final_sigmas_type="sigma_min"), "dpm++", steps)


def test_other_configs_match_diffusers():
    linear = schedulers.SchedulerConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, steps_offset=0,
                                        set_alpha_to_one=True)
    for kind in schedulers.SAMPLERS:
        assert_same_trajectory(linear, kind, 10)
    assert_same_trajectory(schedulers.SchedulerConfig(clip_sample=True, clip_sample_range=0.5), "ddim", 10)


def test_sd1_timesteps():
    """The exact timesteps of SD 1.x's config at 20 steps (PNDM calls the model once more)."""
    ddim = schedulers.plan(SD1, "ddim", 20)["timesteps"]
    np.testing.assert_array_equal(ddim, np.arange(951, 0, -50))
    pndm = schedulers.plan(SD1, "pndm", 20)["timesteps"]
    np.testing.assert_array_equal(pndm, [951, 901, *range(901, 0, -50)])
    dpm = schedulers.plan(SD1, "dpm++", 20)["timesteps"]
    np.testing.assert_array_equal(dpm[:3], [999, 949, 899])
    assert len(dpm) == 20 and dpm[-1] == 50


@pytest.mark.parametrize("beta_schedule", schedulers.BETA_SCHEDULES)
def test_forward_process_matches_ddpm(beta_schedule):
    pytest.importorskip("torch", reason=TORCH)
    import diffusers
    import torch

    config = schedulers.SchedulerConfig(beta_schedule=beta_schedule)
    ddpm = diffusers.DDPMScheduler.from_config(config.to_dict())
    ac = schedulers.alphas_cumprod(config)
    assert ac.shape == (1000,) and ac.dtype == np.float32
    assert_close(ac, ddpm.alphas_cumprod.numpy(), rel=1e-6)
    x0, noise = initial_noise(1), initial_noise(2)
    t = np.array([0, 999])
    ours = schedulers.add_noise(jax.numpy.asarray(ac), x0, noise, t)
    theirs = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    assert_close(ours, theirs.numpy(), rel=1e-6)


def test_config_reads_and_writes_diffusers_json(tmp_path):
    shipped = json.loads((REPO / "apl_jax/assets/models/apl-mini" / "scheduler" / "scheduler_config.json").read_text())
    assert schedulers.SchedulerConfig.from_dict(shipped) == SD1  # the Flax-era file, extra keys and all
    SD1.save(tmp_path, "DDPMScheduler")
    written = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert written["_class_name"] == "DDPMScheduler" and "timestep_spacing" not in written
    assert schedulers.SchedulerConfig.from_dict(written) == SD1
    trained = schedulers.SchedulerConfig.from_dict({"trained_betas": [0.1] * 10, "num_train_timesteps": 10})
    assert_close(schedulers.alphas_cumprod(trained), 0.9 ** np.arange(1, 11))


def test_diffusers_reads_what_we_write(tmp_path):
    pytest.importorskip("torch", reason=TORCH)
    import diffusers

    SD1.save(tmp_path, "DDPMScheduler")
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler, diffusers.PNDMScheduler):
        loaded = cls.from_pretrained(tmp_path)
        assert loaded.config.steps_offset == 1 and loaded.config.beta_schedule == "scaled_linear"
        assert_close(loaded.alphas_cumprod.numpy(), schedulers.alphas_cumprod(SD1), rel=1e-6)


def test_bad_configs_are_user_errors():
    with pytest.raises(UserError, match="beta_schedule must be one of linear, scaled_linear, got 'squaredcos_cap_v2'"):
        schedulers.SchedulerConfig.from_dict({"beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(UserError, match="prediction_type must be one of epsilon, got 'v_prediction'"):
        schedulers.SchedulerConfig(prediction_type="v_prediction")
    with pytest.raises(UserError, match="scheduler must be one of ddim, pndm, dpm\\+\\+, got 'euler'"):
        schedulers.plan(SD1, "euler", 10)
    with pytest.raises(UserError, match="steps must be at most the model's 1000 training timesteps, got 1001"):
        schedulers.plan(SD1, "ddim", 1001)
    with pytest.raises(UserError, match="1000 ddim steps with steps_offset 1 pass the model's last timestep 999"):
        schedulers.plan(SD1, "ddim", 1000)
