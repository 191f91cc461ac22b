"""Shared test set-up: one XLA compilation cache for the session and its subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Set before jax is imported anywhere, so subprocesses (train.py runs) inherit it too:
# the tiny model's init and step compile once per device count, not once per run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="apl-jax-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO)
    return env


def run_train(workdir: Path, *overrides: str, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """python train.py --config configs/tiny.yaml --workdir WORKDIR --set ... in a fresh process."""
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny.yaml"), "--workdir", str(workdir)]
    for override in overrides:
        args += ["--set", override]
    return subprocess.run(args, env=train_env(devices), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def sample_cli(*args, devices=1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *args], env=train_env(devices), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def export_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apl_jax.export", *args], env=train_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def tiny():
    from apl_jax.models import tiny_random

    return tiny_random()
