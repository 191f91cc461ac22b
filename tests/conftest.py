"""Shared test set-up: one XLA compilation cache for the session and its subprocesses; umask helpers."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Set before jax is imported anywhere, so subprocesses (train.py runs) inherit it too:
# the tiny model's init and step compile once per device count, not once per run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="apl-jax-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def assert_close(actual, expected, rel: float = 1e-4) -> None:
    """Two different programs agree to `rel` x the expected tensor's scale (its largest magnitude).

    Different programs reorder float32 reductions, and XLA's threaded reductions change with
    machine load, so elementwise tolerances on near-zero elements fail by chance; the error
    that matters is relative to the tensor's scale.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max()), float(np.finfo(np.float32).tiny))
    error = float(np.abs(actual - expected).max())
    assert error <= rel * scale, f"max |difference| {error:.3g} > {rel:g} x scale {scale:.3g}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO)
    return env


def _train_args(workdir: Path, overrides) -> list[str]:
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny.yaml"), "--workdir", str(workdir)]
    for override in overrides:
        args += ["--set", override]
    return args


def run_train(workdir: Path, *overrides: str, devices: int = 1, timeout: int = 600, cwd: Path = REPO
              ) -> subprocess.CompletedProcess:
    """python train.py --config configs/tiny.yaml --workdir WORKDIR --set ... in a fresh process."""
    return subprocess.run(_train_args(workdir, overrides), env=train_env(devices), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def start_train(workdir: Path, *overrides: str) -> subprocess.Popen:
    """A run_train that keeps going (train.steps=100000, no checkpoints) until it is stopped; output merged."""
    args = _train_args(workdir, ["train.steps=100000", "train.checkpoint_every=100000", "train.batch_size=2", *overrides])
    return subprocess.Popen(args, env=train_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_metrics(workdir: Path, lines: int, timeout: float = 300) -> None:
    """Until WORKDIR/metrics.jsonl has `lines` lines (so the run holds its lock and is stepping)."""
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= lines):
        time.sleep(0.2)


def sample_cli(*args, devices=1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *args], env=train_env(devices), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def export_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apl_jax.export", *args], env=train_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def tiny_config(*overrides):
    """configs/tiny.yaml with batch 2 and a checkpoint every 2 steps, for in-process train() runs."""
    from apl_jax.config import load_config

    return load_config(REPO / "configs/tiny.yaml", ["train.batch_size=2", "train.checkpoint_every=2", *overrides])


@pytest.fixture(scope="session")
def tiny():
    from apl_jax.models import tiny_random

    return tiny_random()


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root):
    """{relative path: permission bits} of every file and folder under root."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def assert_umask_modes(root, mask):
    found = modes(root)
    assert found
    want = {path: (0o777 if (root / path).is_dir() else 0o666) & ~mask for path in found}
    assert found == want
