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
    for devices in (1, 8):
        done = run_train(root / f"devices{devices}", *STEPS, "train.steps=3", devices=devices)
        assert done.returncode == 0, done.stderr[-3000:]
    # Two processes x 4 devices on one shared workdir: straight, and stopped at step 2 then
    # restarted with the process ids swapped (host 0 is now the other machine).
    train_processes(root / "hosts", *STEPS, "train.steps=3")
    train_processes(root / "swapped", *STEPS, "train.steps=2")
    train_processes(root / "swapped", *STEPS, "train.steps=3", process_ids=(1, 0))
    return root


def test_eight_devices_match_one(runs):
    one, eight = prefix_of(runs / "devices1"), prefix_of(runs / "devices8")
    moved = np.abs(one - initial_prefix()).max()
    assert moved > 1e-3  # training changed the prefix, so equality below means something
    assert np.abs(one - eight).max() < 1e-5


def initial_prefix():
    """The uniform [0, 1) start of every run here (train.seed=0), as trainer.initial_state draws it."""
    import jax

    return np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(0), 1), (10, 32)))


def test_two_hosts_match_one_host(runs):
    np.testing.assert_allclose(prefix_of(runs / "hosts"), prefix_of(runs / "devices8"), atol=1e-5)


def test_every_process_checkpoints_into_the_shared_workdir(runs):
    assert sorted(p.name for p in (runs / "hosts/checkpoints").iterdir()) == ["3"]
    assert (runs / "hosts/metrics.jsonl").read_text().count("\n") == 3  # process 0 alone logs


def test_resume_with_swapped_process_ids_is_bitwise_equal(runs):
    assert sorted(p.name for p in (runs / "swapped/checkpoints").iterdir()) == ["2", "3"]
    np.testing.assert_array_equal(prefix_of(runs / "swapped"), prefix_of(runs / "hosts"))


def test_global_batch_must_divide(tmp_path):
    done = run_train(tmp_path, "train.batch_size=12", devices=8)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: train.batch_size=12 does not divide across 8 devices (1 process(es) x 8 local): use a multiple of 8"
    )
