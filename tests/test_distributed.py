"""Device count and multi-host invariance, with real processes (XLA_FLAGS must be set before jax starts)."""

import numpy as np
import pytest
import safetensors.numpy

from conftest import run_train, train_processes

STEPS = ("train.batch_size=8", "train.checkpoint_every=3")


def prefix_of(workdir):
    return safetensors.numpy.load_file(workdir / "prefix.safetensors")["<alz>"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    done = run_train(root / "one", *STEPS, "train.steps=3", devices=1)
    assert done.returncode == 0, done.stderr[-3000:]
    # Two processes x 4 devices on one shared workdir, stopped at step 2 and restarted with the process
    # ids swapped (host 0 is now the other machine). One run covers 8 devices, 2 hosts and the resume:
    # each launch costs a minute of this suite, and a resume that went wrong (another rng, a lost step)
    # moves the prefix by about a learning rate, 100x the tolerance below.
    train_processes(root / "hosts", *STEPS, "train.steps=2")
    train_processes(root / "hosts", *STEPS, "train.steps=3", process_ids=(1, 0))
    return root


def initial_prefix():
    """The uniform [0, 1) start of every run here (train.seed=0), as trainer.initial_state draws it."""
    import jax

    return np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(0), 1), (10, 32)))


def test_two_hosts_of_four_devices_resumed_with_swapped_ids_match_one_device(runs):
    one, hosts = prefix_of(runs / "one"), prefix_of(runs / "hosts")
    assert np.abs(one - initial_prefix()).max() > 1e-3  # training changed the prefix, so equality below means something
    np.testing.assert_allclose(hosts, one, atol=1e-5)


def test_every_process_checkpoints_into_the_shared_workdir(runs):
    assert sorted(p.name for p in (runs / "hosts/checkpoints").iterdir()) == ["2", "3"]
    assert (runs / "hosts/metrics.jsonl").read_text().count("\n") == 3  # process 0 alone logs, in both launches


def test_global_batch_must_divide(tmp_path):
    done = run_train(tmp_path, "train.batch_size=12", devices=8)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: train.batch_size=12 does not divide across 8 devices (1 process(es) x 8 local): use a multiple of 8"
    )
