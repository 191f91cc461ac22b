"""Shared test set-up: one XLA compilation cache for the session and its subprocesses; umask helpers."""

from __future__ import annotations

import contextlib
import json
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


def train_env(devices: int = 1, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO)
    return {**env, **(extra_env or {})}


def _train_args(workdir: Path, overrides) -> list[str]:
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny.yaml"), "--workdir", str(workdir)]
    for override in overrides:
        args += ["--set", override]
    return args


def run_train(workdir: Path | str, *overrides: str, devices: int = 1, timeout: int = 600, cwd: Path = REPO,
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """python train.py --config configs/tiny.yaml --workdir WORKDIR --set ... in a fresh process."""
    return subprocess.run(_train_args(workdir, overrides), env=train_env(devices, extra_env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def run_processes(args_of, count: int = 2, devices: int = 4, timeout: int = 600,
                  extra_env: dict[str, str] | None = None) -> list[str]:
    """Run one multi-process JAX program: args_of(process_id, coordinator_address) -> argv, `count` processes of
    `devices` CPU devices each. Returns each process's merged output; every process must exit 0."""
    address = f"127.0.0.1:{free_port()}"
    # Files, not pipes: a process whose pipe is not being read would block on a full one while
    # the others wait for it at a barrier.
    logs = [tempfile.TemporaryFile("w+") for _ in range(count)]
    procs = [subprocess.Popen(args_of(process_id, address), env=train_env(devices, extra_env), cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT, text=True) for process_id, log in enumerate(logs)]
    for proc in procs:
        proc.wait(timeout=timeout)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    # All outputs: the first process to fail often only reports that another one died.
    assert [proc.returncode for proc in procs] == [0] * count, "\n".join(
        f"--- process {k} (exit {proc.returncode}):\n{out[-6000:]}" for k, (proc, out) in enumerate(zip(procs, outputs)))
    return outputs


def train_processes(workdir: Path, *overrides: str, process_ids=(0, 1)) -> list[str]:
    """train.py on tiny.yaml in len(process_ids) processes x 4 CPU devices, all on one shared workdir;
    process k of the launch gets parallel.process_id=process_ids[k]."""
    def args_of(k, address):
        return _train_args(workdir, [*overrides, f"parallel.coordinator_address={address}",
                                     f"parallel.num_processes={len(process_ids)}",
                                     f"parallel.process_id={process_ids[k]}"])

    return run_processes(args_of, count=len(process_ids))


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
def gcs():
    """A local Google Cloud Storage server (tests/gcs_emulator.py) with the bucket `bucket`; yields the
    environment that points gcsfs/google-cloud-storage (STORAGE_EMULATOR_HOST) and orbax's tensorstore
    (TENSORSTORE_GCS_HTTP_URL, with a fixed test token instead of credentials) at it."""
    pytest.importorskip("gcp_storage_emulator", reason="needs gcp-storage-emulator (requirements-test.txt)")
    pytest.importorskip("gcsfs", reason="needs gcsfs (requirements.txt)")
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "gcs_emulator.py"), "start", "--host", "127.0.0.1",
                               "--port", str(port), "--in-memory", "--default-bucket", "bucket"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "GOOGLE_CLOUD_PROJECT": "test",
           # gcsfs's hierarchical-namespace probe is a gRPC call the emulator does not serve
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    try:
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def tiny():
    from apl_jax.models import tiny_random

    return tiny_random()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny):
    """tiny-random saved as a model folder (--model FOLDER): the same weights, but a subprocess loads them
    in a second, where the preset's jitted random init compiles for some 25 s on a CPU."""
    folder = tmp_path_factory.mktemp("tiny-random")
    tiny.save(folder)
    return folder


# ---------------------------------------------------------------- apl_jax.evaluate on tiny-random

EVAL_NAMES = ["Ada Quill", "Bo Fenwick"]


@pytest.fixture(scope="session")
def eval_inputs(tmp_path_factory, tiny):
    """A random prefix for tiny-random, names.txt (EVAL_NAMES), prompts.txt (one generic prompt) and
    refs/NAME/{0,1}.png (random 32 px "photos")."""
    from PIL import Image

    from apl_jax.export import save_diffusers_prefix

    root = tmp_path_factory.mktemp("eval-inputs")
    prefix = np.random.default_rng(0).uniform(size=(10, tiny.text_width)).astype(np.float32)
    save_diffusers_prefix(root / "prefix.safetensors", prefix, "alz")
    (root / "names.txt").write_text("\n".join(EVAL_NAMES) + "\n")
    (root / "prompts.txt").write_text("# generic prompts\na red square on a blue background\n")
    for i, name in enumerate(EVAL_NAMES):
        person = root / "refs" / name
        person.mkdir(parents=True)
        for k in range(2):
            photo = np.random.default_rng([i, k]).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(photo).save(person / f"{k}.png")
    return root


def evaluate_args(inputs, out, *extra):
    """apl_jax.evaluate's arguments on eval_inputs: tiny-random, 2 images per prompt, 2 steps, the fake embedder;
    a later flag in `extra` overrides an earlier one."""
    return ["--model", "tiny-random", "--prefix", str(inputs / "prefix.safetensors"), "--names",
            str(inputs / "names.txt"), "--references", str(inputs / "refs"), "--out", str(out), "--num-images", "2",
            "--steps", "2", "--embedder", "fake", *extra]


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A tiny random CLIP (our CLIPModel) as a transformers folder: config.json and flax_model.msgpack."""
    import flax.serialization

    from apl_jax.nn.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
    from apl_jax.nn.configs import to_json

    config = CLIPConfig(
        CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                       pad_token_id=49407),
        CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                         image_size=32, patch_size=8),
        projection_dim=16,
    )
    params = jax.jit(CLIPModel(config).init_weights)(jax.random.PRNGKey(0))
    folder = tmp_path_factory.mktemp("tiny-clip")  # no tokenizer files: the shipped vocabulary is used
    (folder / "config.json").write_text(json.dumps({"model_type": "clip", "projection_dim": 16,
                                                    "text_config": to_json(config.text),
                                                    "vision_config": to_json(config.vision)}))
    (folder / "flax_model.msgpack").write_bytes(flax.serialization.to_bytes(jax.device_get(params)))
    return folder


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
