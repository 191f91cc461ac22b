"""The benchmarks run in CI only as smoke tests: tiny config, one step, never a timed assertion."""

import subprocess
import sys

from conftest import REPO, train_env


def run(*args):
    return subprocess.run([sys.executable, *args], env=train_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_train_step_benchmark_smoke(tmp_path):
    done = run("benchmarks/train_step.py", "--config", "tiny", "--steps", "1", "--warmup", "0", "--cache", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("jax ") for line in lines), done.stdout
    assert any(line.startswith("torch ") for line in lines) or "torch: failed" in done.stdout
    assert "GFLOP (XLA cost analysis)" in done.stdout


def test_sampling_benchmark_smoke():
    done = run("benchmarks/sampling.py", "--steps", "2", "--batch", "1", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ours (JAX):" in done.stdout and "images/s" in done.stdout
    assert "ratio ours/PyTorch:" in done.stdout or "torch is not installed" in done.stdout


def test_flops_are_counted_with_xla_attention_where_cudnn_would_run(monkeypatch):
    """XLA counts nothing for a program with cuDNN attention calls, so lowered_flops traces XLA's attention."""
    import jax
    import jax.numpy as jnp

    from apl_jax.nn import attention

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from flops import lowered_flops

    monkeypatch.setattr(attention, "cudnn_flash_applies", lambda *args, **kwargs: True)  # as on an H200 in bf16
    q = jnp.ones((1, 64, 32), jnp.bfloat16)
    counted = lowered_flops(lambda: jax.jit(lambda q: attention.multi_head_attention(q, q, q, heads=4)).lower(q))
    assert counted >= 2 * (2 * 64 * 64 * 32)  # q k^T and p v, 2 FLOPs a multiply-add
    assert attention.cudnn_flash_applies is not None and attention.cudnn_flash_applies(jnp.bfloat16, 8, 64, 64)


def test_conv_paths_benchmark_smoke():
    done = run("benchmarks/conv_paths.py", "--channels", "64", "--sizes", "4", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:2] == ["64", "4"]]
    assert len(rows) == 1 and len(rows[0]) == 11, done.stdout  # channels, size, rows/ch, then two times and a ratio twice
