import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apl_jax.data.prompts import Templates
from apl_jax.data.synthetic import SyntheticExamples
from apl_jax.objective import apl_loss, caption_drift, encode_posterior, frozen_inputs, sample_latents
from apl_jax.prefix import encode_with_prefix, init_prefix
from conftest import assert_close

PLACEHOLDER = 41128


@pytest.fixture(scope="module")
def batch(tiny):
    examples = SyntheticExamples(tiny.tokenizer, "alz", Templates.load("configs/data/templates.yaml"), resolution=32,
                                 identity_prob=0.5, num_names=4, num_captions=4, seed=0)
    return jax.tree.map(jnp.asarray, examples.batch(0, 4))


@pytest.fixture(scope="module")
def keys():
    return jax.random.split(jax.random.PRNGKey(7), 4)


@pytest.fixture(scope="module")
def loss_fn(tiny):
    """loss_fn(prefix, frozen, batch, keys, eta): apl_loss on the tiny model, jitted once for the tests here, with
    eta traced: a compile of the tiny UNet's loss takes tens of seconds on 2 cores, one per eta would add minutes."""

    def loss(prefix, frozen, batch, keys, eta, drift_weight=0.0):
        return apl_loss(prefix, frozen, batch, keys, model=tiny, placeholder_id=PLACEHOLDER, negative_guidance=eta,
                        caption_drift_weight=drift_weight)

    return jax.jit(loss)


@pytest.fixture(scope="module")
def loss_and_grad(loss_fn):
    """jax.value_and_grad of loss_fn (w.r.t. the prefix), jitted once for the tests here."""
    return jax.jit(jax.value_and_grad(loss_fn))


def test_matches_separate_passes_by_hand(tiny, batch, keys, loss_fn):
    """The doubled-batch UNet call equals two separate passes, with the noise drawn as documented."""
    prefix = init_prefix(tiny, 10, jax.random.PRNGKey(0))
    p = tiny.params
    post, t, eps = [], [], []
    for key in keys:
        k_post, k_t, k_eps = jax.random.split(key, 3)
        post.append(jax.random.normal(k_post, (8, 8, 4)))
        t.append(jax.random.randint(k_t, (), 0, 1000))
        eps.append(jnp.transpose(jax.random.normal(k_eps, (8, 8, 4)), (2, 0, 1)))
    t = jnp.stack(t)
    z0 = sample_latents(tiny, *encode_posterior(tiny, p["vae"], batch["pixels"]), jnp.stack(post))
    ac = p["scheduler"]["alphas_cumprod"][t][:, None, None, None]
    z_t = jnp.sqrt(ac) * z0 + jnp.sqrt(1 - ac) * jnp.stack(eps)
    e_n = tiny.predict_noise(p["unet"], z_t, t, tiny.encode_text(p["text_encoder"], batch["neutral_ids"]))
    e_p = tiny.predict_noise(p["unet"], z_t, t, encode_with_prefix(tiny, p["text_encoder"], prefix, batch["private_ids"], PLACEHOLDER))
    eta = 1.0
    by_hand = jnp.mean((e_p - (e_n - eta * (e_p - e_n))) ** 2)
    ours = loss_fn(prefix, p, batch, keys, 1.0)
    assert_close(ours, by_hand)


def test_negative_guidance_scales_the_loss(tiny, batch, keys, loss_fn):
    # loss = (1 + eta)^2 * mean((e_p - e_n)^2), so eta=2 gives 9x eta=0
    prefix = init_prefix(tiny, 10, jax.random.PRNGKey(0))
    base = loss_fn(prefix, tiny.params, batch, keys, 0.0)
    assert_close(loss_fn(prefix, tiny.params, batch, keys, 2.0), 9 * base)


def test_negative_guidance_only_scales_the_gradient_so_adam_ignores_it(tiny, batch, keys, loss_and_grad):
    """With the stop-gradient target, d loss / d prefix = (1 + eta) x the eta=0 gradient; Adam divides the factor out.

    Why the mini sweep varies the identity share rather than eta (apl_jax/mini/sweep.py).
    """
    prefix = init_prefix(tiny, 10, jax.random.PRNGKey(0))
    grad = {eta: loss_and_grad(prefix, tiny.params, batch, keys, eta)[1] for eta in (0.5, 2.0)}
    assert float(jnp.abs(grad[0.5]).max()) > 0
    assert_close(grad[2.0], 3.0 / 1.5 * grad[0.5], rel=1e-4)

    def trained(eta):  # three Adam steps of APL training
        adam, params = optax.adam(1e-3), prefix
        state = adam.init(params)
        for _ in range(3):
            update, state = adam.update(loss_and_grad(params, tiny.params, batch, keys, eta)[1], state)
            params = optax.apply_updates(params, update)
        return params

    moved = trained(0.5) - prefix
    assert float(jnp.abs(moved).max()) > 1e-3  # three learning-rate-sized steps
    assert_close(trained(2.0) - prefix, moved, rel=1e-3)


def test_caption_drift_compares_each_caption_token_with_its_start_reading():
    """Behind a K-vector prefix the caption starts at position K + 1 (start of text, then the K rows)."""
    k, length, width, p = 3, 12, 4, 99
    eos = [2] * length
    neutral = np.array([[1, 5, 6, *eos][:length],
                        [1, 5, 6, *eos][:length],  # an identity example: another private prompt
                        [1, *range(10, 20), 2]])  # a caption the prefix cuts short
    private = np.array([[1, p, 5, 6, *eos][:length],
                        [1, p, 7, 6, *eos][:length],
                        [1, p, *range(10, 19), 2]])
    rng = np.random.default_rng(0)
    start = rng.normal(size=(3, length, width))
    now = start + np.array([0.0, 5.0, 0.5])[:, None, None]  # each caption moved by this
    now[:, 1:k + 1] = rng.normal(size=(3, k, width))  # the prefix rows' own states: not compared
    args = (jnp.asarray(start), jnp.asarray(private), jnp.asarray(neutral), p, k)
    assert_close(caption_drift(jnp.asarray(now), *args), np.array([0.0, 0.0, 0.25]))
    now[0, k] += 1.0  # the last prefix row is not the caption
    assert float(caption_drift(jnp.asarray(now), *args)[0]) == 0
    now[0, k + 1] += 1.0  # its first word is
    assert_close(caption_drift(jnp.asarray(now), *args)[0], np.float32(1.0 / (length - k - 1)))  # 1 in each of width dims
    moved = private.copy()
    moved[2, 1:3] = [10, p]  # the placeholder elsewhere: not a generic pair
    assert float(caption_drift(jnp.asarray(now), jnp.asarray(start), jnp.asarray(moved), jnp.asarray(neutral), p, k)[2]) == 0


def test_caption_drift_weight_adds_the_generic_examples_drift(tiny, batch, keys, loss_fn):
    start, prefix = init_prefix(tiny, 10, jax.random.PRNGKey(0)), init_prefix(tiny, 10, jax.random.PRNGKey(1))
    frozen = frozen_inputs(tiny.params, start_prefix=start)
    text = tiny.params["text_encoder"]
    drift = caption_drift(encode_with_prefix(tiny, text, prefix, batch["private_ids"], PLACEHOLDER),
                          encode_with_prefix(tiny, text, start, batch["private_ids"], PLACEHOLDER),
                          batch["private_ids"], batch["neutral_ids"], PLACEHOLDER, 10)
    generic = np.all(np.asarray(batch["private_ids"])[:, 2:] == np.asarray(batch["neutral_ids"])[:, 1:-1], axis=1)
    assert 1 <= generic.sum() < len(generic)  # the batch holds both kinds
    assert np.array_equal(np.asarray(drift) > 0, generic)
    without = loss_fn(prefix, frozen, batch, keys, 1.0, 0.0)
    assert_close(without, loss_fn(prefix, tiny.params, batch, keys, 1.0))  # weight 0: the official loss
    assert_close(loss_fn(prefix, frozen, batch, keys, 1.0, 2.0) - without, 2.0 * jnp.mean(drift), rel=1e-3)


def test_latents_use_the_scaling_factor(tiny, batch):
    zero = jnp.zeros((4, 8, 8, 4))
    z = sample_latents(tiny, *encode_posterior(tiny, tiny.params["vae"], batch["pixels"]), zero)
    mean, _ = tiny.posterior(tiny.params["vae"], jnp.transpose(batch["pixels"] / 127.5 - 1, (0, 3, 1, 2)))
    np.testing.assert_allclose(z, jnp.transpose(mean, (0, 3, 1, 2)) * 0.18215, rtol=1e-5, atol=1e-6)
    assert tiny.latent_scaling == pytest.approx(0.18215)


def test_timesteps_cover_the_whole_range(tiny):
    ts = jax.vmap(lambda k: jax.random.randint(jax.random.split(k, 3)[1], (), 0, 1000))(
        jax.random.split(jax.random.PRNGKey(0), 4000)
    )
    assert int(ts.min()) < 10 and int(ts.max()) > 990


def test_loss_goes_down_on_a_fixed_batch(tiny, batch, keys, loss_fn):
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(prefix, opt_state):
        value, grad = jax.value_and_grad(loss_fn)(prefix, tiny.params, batch, keys, 1.0)
        updates, opt_state = optimizer.update(grad, opt_state, prefix)
        return optax.apply_updates(prefix, updates), opt_state, value

    prefix = init_prefix(tiny, 10, jax.random.PRNGKey(0))
    opt_state = optimizer.init(prefix)
    history = []
    for _ in range(40):
        prefix, opt_state, value = step(prefix, opt_state)
        history.append(float(value))
    assert history[-1] < 0.5 * history[0], history


def test_split_passes_give_the_same_loss_and_gradient(tiny, batch, keys, loss_and_grad):
    prefix = init_prefix(tiny, 10, jax.random.PRNGKey(0))
    fused = functools.partial(apl_loss, model=tiny, placeholder_id=PLACEHOLDER, negative_guidance=1.0, fused_passes=True)
    fused_loss, fused_grad = jax.jit(jax.value_and_grad(fused))(prefix, tiny.params, batch, keys)
    split_loss, split_grad = loss_and_grad(prefix, tiny.params, batch, keys, 1.0)  # two passes: apl_loss's default
    assert_close(split_loss, fused_loss, rel=1e-5)
    assert_close(split_grad, fused_grad)


def test_cached_posterior_gives_the_same_loss(tiny, batch, keys, loss_fn):
    prefix = init_prefix(tiny, 10, jax.random.PRNGKey(0))
    mean, std = encode_posterior(tiny, tiny.params["vae"], batch["pixels"])
    cached = {k: v for k, v in batch.items() if k != "pixels"} | {"posterior_mean": mean, "posterior_std": std}
    assert_close(loss_fn(prefix, tiny.params, cached, keys, 1.0), loss_fn(prefix, tiny.params, batch, keys, 1.0),
                 rel=1e-5)


def test_frozen_inputs_leave_out_the_decoder_and_change_nothing(tiny, batch, keys, loss_fn):
    frozen = frozen_inputs(tiny.params)
    assert set(frozen["vae"]) == {"encoder", "quant_conv"} and set(tiny.params["vae"]) > set(frozen["vae"])
    assert set(frozen) == set(tiny.params)
    prefix = init_prefix(tiny, 10, jax.random.PRNGKey(0))
    assert loss_fn(prefix, frozen, batch, keys, 1.0) == loss_fn(prefix, tiny.params, batch, keys, 1.0)


def test_remat_gives_the_same_loss_and_gradient(tiny, batch, keys, loss_and_grad):
    """model.remat recomputes the UNet blocks in the backward pass (the program says so); nothing else changes."""
    prefix = init_prefix(tiny, 10, jax.random.PRNGKey(0))

    def value_and_grad(model):
        fn = functools.partial(apl_loss, model=model, placeholder_id=PLACEHOLDER, negative_guidance=1.0)
        return jax.value_and_grad(fn)

    remat = tiny.with_remat()
    assert "remat" in str(jax.make_jaxpr(value_and_grad(remat))(prefix, tiny.params, batch, keys))  # jax.checkpoint
    assert "remat" not in str(jax.make_jaxpr(value_and_grad(tiny))(prefix, tiny.params, batch, keys))
    loss, grad = jax.jit(value_and_grad(remat))(prefix, tiny.params, batch, keys)
    plain_loss, plain_grad = loss_and_grad(prefix, tiny.params, batch, keys, 1.0)
    assert_close(loss, plain_loss, rel=1e-6)
    assert_close(grad, plain_grad, rel=1e-5)


def test_pass_layout_default_is_two_calls():
    """Two UNet calls measured faster on CPU (14%) and on an H200 (16%; benchmarks/README.md): the trainer's
    and apl_loss's default."""
    import inspect

    from apl_jax.config import TrainConfig

    assert TrainConfig().fused_unet_passes is False
    assert inspect.signature(apl_loss).parameters["fused_passes"].default is False
