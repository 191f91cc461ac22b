"""Device count and multi-host invariance, with real processes (XLA_FLAGS must be set before jax starts)."""

import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from conftest import REPO, free_port, run_train, train_env

STEPS = ("train.steps=3", "train.batch_size=8", "train.checkpoint_every=3")


def prefix_of(workdir):
    return safetensors.numpy.load_file(workdir / "prefix.safetensors")["<alz>"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    for devices in (1, 8):
        done = run_train(root / f"devices{devices}", *STEPS, devices=devices)
        assert done.returncode == 0, done.stderr[-3000:]

    port = free_port()
    hosts = []
    for process_id in range(2):
        args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny.yaml"),
                "--workdir", str(root / f"host{process_id}")]
        for override in (*STEPS, f"parallel.coordinator_address=127.0.0.1:{port}", "parallel.num_processes=2",
                         f"parallel.process_id={process_id}"):
            args += ["--set", override]
        hosts.append(subprocess.Popen(args, env=train_env(devices=4), cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for proc in hosts:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
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
    np.testing.assert_allclose(prefix_of(runs / "host0"), prefix_of(runs / "devices8"), atol=1e-5)


def test_only_process_zero_writes(runs):
    assert (runs / "host0/checkpoints/3").is_dir()
    assert (runs / "host0/metrics.jsonl").is_file()
    assert not (runs / "host1").exists()


def test_global_batch_must_divide(tmp_path):
    done = run_train(tmp_path, "train.batch_size=12", devices=8)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: train.batch_size=12 does not divide across 8 devices (1 process(es) x 8 local): use a multiple of 8"
    )
