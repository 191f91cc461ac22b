import logging

import numpy as np
import pytest
from PIL import Image

from apl_jax.errors import UserError
from apl_jax.generate_identities import generate, identity_prompt, read_names
from apl_jax.sampling import Sampler, SamplerConfig, prompt_grid
from conftest import REPO, sample_cli

PROMPTS = ["a photo of Ada Quill", "a red square on a blue background", "a portrait of Bo Fenwick"]


@pytest.fixture(scope="module")
def prefix(tiny):
    return np.random.default_rng(0).uniform(size=(10, tiny.text_width)).astype(np.float32)


@pytest.fixture(scope="module")
def sampler(tiny, prefix):
    return Sampler(tiny, SamplerConfig(steps=4, batch_size=2), prefix=prefix)


def test_images_and_recompilation(sampler):
    first = sampler(PROMPTS, seed=1)
    assert first.shape == (3, 32, 32, 3) and first.dtype == np.uint8
    again = sampler(PROMPTS, seed=1)
    np.testing.assert_array_equal(first, again)
    other_seed = sampler(PROMPTS, seed=2)
    assert np.abs(first.astype(int) - other_seed).mean() > 1
    with_prefix = sampler(["another prompt entirely", "x"], seed=3, with_prefix=True, negative_prompt="blurry")
    assert with_prefix.shape == (2, 32, 32, 3)
    # new seeds, prompts, negative prompts and prefix on/off reuse the one program
    assert sampler.compiled_programs() == 1


def test_prefix_changes_the_image(sampler):
    plain = sampler(PROMPTS[:2], seed=0)
    prefixed = sampler(PROMPTS[:2], seed=0, with_prefix=True)
    assert np.abs(plain.astype(int) - prefixed).mean() > 1


def test_a_prompt_cut_by_the_prefix_is_reported(sampler, caplog):
    prompt = "a portrait of " + "a person " * 33  # 71 tokens: it fits; "alz PROMPT" is 72, 81 with the prefix
    with caplog.at_level(logging.WARNING, logger="apl_jax"):
        sampler([prompt], seed=0)
        sampler([prompt, prompt], seed=0, with_prefix=True)
    assert [r.getMessage() for r in caplog.records if r.name == "apl_jax.tokenizer"] == [
        f"prompt cut at 77 tokens (it has 81 with the prefix's 9 extra tokens); the text encoder never sees the rest: "
        f"{'alz ' + prompt!r}"]


def test_noise_index_is_per_image(sampler):
    both = sampler(PROMPTS[:2], seed=5)
    second_alone = sampler(PROMPTS[1:2], seed=5, indices=[1])
    np.testing.assert_array_equal(both[1], second_alone[0])


@pytest.mark.parametrize("scheduler", ["pndm", "dpm++"])
def test_other_schedulers(tiny, scheduler):
    images = Sampler(tiny, SamplerConfig(scheduler=scheduler, steps=3))(PROMPTS[:1], seed=0)
    assert images.shape == (1, 32, 32, 3) and images.std() > 0


def test_pndm_sampler_runs_every_call_of_the_plan(tiny):
    """The compiled loop against a plain loop over schedulers.step: PNDM's 2 steps are 3 UNet calls.

    With "trailing" spacing the last call goes from t=499 to 0, so a loop that stopped early shows.
    """
    import dataclasses

    import jax
    import jax.numpy as jnp

    from apl_jax import schedulers
    from apl_jax.tokenizer import tokenize

    tiny = dataclasses.replace(tiny, scheduler=schedulers.SchedulerConfig(timestep_spacing="trailing"))
    images = Sampler(tiny, SamplerConfig(scheduler="pndm", steps=2, guidance_scale=3.0))(PROMPTS[:1], seed=4)
    p = tiny.params
    context = jnp.concatenate([tiny.encode_text(p["text_encoder"], tokenize(tiny.tokenizer, [text]))
                               for text in ("", PROMPTS[0])])
    latents = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(4), 0), (1, 4, 8, 8))
    plan = schedulers.plan(tiny.scheduler, "pndm", 2)
    history = schedulers.init_history("pndm", latents.shape)
    np.testing.assert_array_equal(plan["timesteps"], [999, 499, 499])
    for i, t in enumerate(plan["timesteps"]):
        e_uncond, e_cond = jnp.split(tiny.predict_noise(p["unet"], jnp.concatenate([latents, latents]),
                                                        jnp.array([t, t]), context), 2)
        latents, history = schedulers.step("pndm", plan, history, i, e_uncond + 3.0 * (e_cond - e_uncond), latents)
    decoded = tiny.decode(p["vae"], latents / tiny.latent_scaling)
    expected = np.round(np.clip(np.transpose(np.asarray(decoded), (0, 2, 3, 1)) / 2 + 0.5, 0, 1) * 255)
    assert np.abs(images.astype(int) - expected).max() <= 1  # float rounding may move a pixel by one level


def test_ddim_eta_adds_noise(tiny):
    deterministic = Sampler(tiny, SamplerConfig(steps=3))(PROMPTS[:1], seed=0)
    stochastic = Sampler(tiny, SamplerConfig(steps=3, eta=1.0))(PROMPTS[:1], seed=0)
    assert np.abs(deterministic.astype(int) - stochastic).mean() > 1


def test_compare_grid_size_and_labels(sampler):
    grid, labels = prompt_grid(sampler, PROMPTS[:2], 3, seed=0, variants=(False, True), scale=2)
    assert labels == [PROMPTS[0], f"[alz] {PROMPTS[0]}", PROMPTS[1], f"[alz] {PROMPTS[1]}"]
    assert grid.size[1] == 16 + 4 * 64  # a header line, then 4 rows of 32 px images at scale 2
    left = grid.size[0] - 3 * 64
    assert 50 < left < 400
    pixels = np.asarray(grid)
    assert (pixels[16:, :left] < 100).any()  # the row labels are drawn
    assert (pixels[:16, left:] < 100).any()  # the column labels are drawn
    np.testing.assert_array_equal(pixels[16 : 16 + 64 : 2, left : left + 64 : 2], sampler(PROMPTS[:1], seed=0)[0])


def test_bad_inputs(tiny):
    with pytest.raises(UserError, match=r"prefix has shape \(10, 768\), but the text encoder is 32 wide"):
        Sampler(tiny, prefix=np.zeros((10, 768), np.float32))
    with pytest.raises(UserError, match="scheduler must be one of ddim, pndm, dpm\\+\\+, got 'euler'"):
        Sampler(tiny, SamplerConfig(scheduler="euler"))
    with pytest.raises(UserError, match="with_prefix needs a sampler built with a prefix"):
        Sampler(tiny, SamplerConfig(steps=1))(["x"], with_prefix=True)
    with pytest.raises(UserError, match="resolution 34 is not divisible by the VAE factor 4"):
        Sampler(tiny, SamplerConfig(resolution=34))


def test_same_seed_same_images_on_one_or_eight_devices(tmp_path):
    common = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-images", "4", "--steps", "3", "--seed", "11"]
    one = sample_cli(*common, "--out", str(tmp_path / "one.png"), "--save-dir", str(tmp_path / "one"))
    eight = sample_cli(*common, "--out", str(tmp_path / "eight.png"), "--save-dir", str(tmp_path / "eight"),
                       "--batch-size", "8", devices=8)
    assert one.returncode == 0, one.stderr[-2000:]
    assert eight.returncode == 0, eight.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(files) == 8 and files == sorted(p.name for p in (tmp_path / "eight").iterdir())
    for name in files:
        a = np.asarray(Image.open(tmp_path / "one" / name), int)
        b = np.asarray(Image.open(tmp_path / "eight" / name), int)
        assert np.abs(a - b).max() <= 1, name  # float rounding may move a pixel by one level


def test_cli_errors(tmp_path):
    done = sample_cli("--prompt", "x", "--compare")
    assert done.returncode == 2 and done.stderr.strip() == "error: --compare needs --prefix"
    bad = tmp_path / "wide.safetensors"
    import safetensors.numpy

    safetensors.numpy.save_file({"<alz>": np.zeros((10, 768), np.float32)}, bad)
    done = sample_cli("--prompt", "x", "--prefix", str(bad))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: prefix has shape (10, 768), but the text encoder is 32 wide: a prefix must be [K, 32] for this model"
    )


def test_identity_set_generation_resumes(tiny, tmp_path):
    names_file = tmp_path / "names.txt"
    names_file.write_text("Ada Quill\nBo Fenwick\n")
    names = read_names(names_file)
    sampler = Sampler(tiny, SamplerConfig(steps=2, batch_size=2))
    out = tmp_path / "ids"
    assert generate(sampler, names, 3, out, seed=0, templates_file=REPO / "configs/data/templates.yaml") == 6
    before = (out / "Bo Fenwick-2.png").read_bytes()
    (out / "Bo Fenwick-2.png").unlink()
    assert generate(sampler, names, 3, out, seed=0, templates_file=REPO / "configs/data/templates.yaml") == 1
    assert (out / "Bo Fenwick-2.png").read_bytes() == before  # the same noise and prompt on resume
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["Ada Quill-0.png"] == "Ada Quill" and len(manifest["images"]) == 6


def test_identity_prompts_and_names(tmp_path):
    import yaml

    values = yaml.safe_load((REPO / "configs/data/templates.yaml").read_text())
    prompts = {identity_prompt("Ada Quill", 0, k, 0, values["pre_templates"], values["templates"]) for k in range(64)}
    assert "Ada Quill" in prompts  # both parts left out
    assert any(p.startswith("A close-up portrait of Ada Quill") for p in prompts)
    assert all("Ada Quill" in p for p in prompts)
    bad = tmp_path / "n.txt"
    bad.write_text("Ada-3\n")
    with pytest.raises(UserError, match="must not end in -<digits>"):
        read_names(bad)

