"""gs:// workdirs against a local GCS emulator: train, stop, resume, and the start-up errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from conftest import REPO, run_train, train_env

STEPS = ("train.batch_size=2", "train.checkpoint_every=2")


def read_gcs(env, url):
    """The bytes of a gs:// object, read in a fresh process pointed at the emulator."""
    code = "import sys; from etils import epath; sys.stdout.buffer.write(epath.Path(sys.argv[1]).read_bytes())"
    done = subprocess.run([sys.executable, "-c", code, url], env=train_env(extra_env=env), capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout


def list_gcs(env, url):
    code = "import sys; from etils import epath; print(*sorted(p.name for p in epath.Path(sys.argv[1]).iterdir()))"
    done = subprocess.run([sys.executable, "-c", code, url], env=train_env(extra_env=env), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    done = run_train(workdir, *STEPS, "train.steps=4")
    assert done.returncode == 0, done.stderr[-3000:]
    return safetensors.numpy.load_file(workdir / "prefix.safetensors")["<alz>"]


RUN = "gs://bucket/run"


@pytest.fixture(scope="module")
def gs_run(gcs):
    """A tiny run in gs://bucket/run, stopped at step 2 (train.steps=2 saves it) and resumed to step 4."""
    first = run_train(RUN, *STEPS, "train.steps=2", extra_env=gcs)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = list_gcs(gcs, RUN + "/checkpoints")
    resumed = run_train(RUN, *STEPS, "train.steps=4", extra_env=gcs)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return checkpoints, resumed


def test_gs_workdir_stops_and_resumes_bitwise(gcs, gs_run, straight):
    run = RUN
    checkpoints, resumed = gs_run
    assert checkpoints == ["2"]
    assert "resumed from step 2" in resumed.stderr
    assert list_gcs(gcs, run + "/checkpoints") == ["2", "4"]
    prefix = safetensors.numpy.load(read_gcs(gcs, run + "/prefix.safetensors"))["<alz>"]
    np.testing.assert_array_equal(prefix, straight)
    metrics = read_gcs(gcs, run + "/metrics.jsonl").decode().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in metrics] == [1, 2, 3, 4]
    assert {"loss.png", "prefix.safetensors", "metrics.jsonl"} <= set(list_gcs(gcs, run))
    assert any(name.startswith("events.out.tfevents") for name in list_gcs(gcs, run))


def test_the_emulator_stamps_reads_so_a_conditional_write_after_one_works(gcs):
    """OCDBT (orbax's format) reads its manifest back when its cache is stale and writes the next one on
    condition of what it read; the plain emulator's reads had no generation, and those saves failed at random."""
    code = """if True:
        import tensorstore as ts
        kv = ts.KvStore.open({"driver": "gcs", "bucket": "bucket", "path": "stamps/"}).result()
        written = kv.write("manifest", b"first").result().generation
        read = kv.read("manifest").result().stamp.generation
        assert read == written, (read, written)
        kv.write("manifest", b"second", if_equal=read).result()
        print(kv.read("manifest").result().value.decode())"""
    done = subprocess.run([sys.executable, "-c", code], env=train_env(extra_env=gcs), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "second"


def test_missing_bucket_is_one_error_line(gcs):
    done = run_train("gs://no-such-bucket/run", "train.steps=1", extra_env=gcs)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: workdir gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist "
                                   "(create it with `gcloud storage buckets create gs://no-such-bucket`)")


def test_no_credentials_is_one_error_line(tmp_path):
    pytest.importorskip("gcsfs", reason="needs gcsfs (requirements.txt)")
    env = {key: value for key, value in train_env().items()
           if key not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG")}
    # No gcloud files under HOME, and the metadata server of a Google Cloud VM refuses at once.
    env.update(HOME=str(tmp_path), GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny.yaml"),
                           "--workdir", "gs://bucket/run"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: gs://bucket/run is on Google Cloud Storage, but no credentials were found: run `gcloud auth "
        "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or run on a Google Cloud VM with a service "
        "account")


def test_read_only_bucket_is_one_error_line(monkeypatch):
    """The emulator has no permissions, so the bucket's 403 is gcsfs's own error for it, raised in place."""
    pytest.importorskip("gcsfs", reason="needs gcsfs (requirements.txt)")
    from apl_jax import preflight, storage
    from apl_jax.errors import UserError

    def forbidden(self, data):
        raise OSError(f"Forbidden: {self}\nrunner@example.com does not have storage.objects.create access, 403")

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # no credentials needed; nothing is reached
    monkeypatch.setattr(type(storage.path("gs://bucket/run")), "write_bytes", forbidden)
    with pytest.raises(UserError) as err:
        preflight.folder("gs://read-only/run", "--out")
    assert str(err.value) == ("--out gs://read-only/run is not writable: cannot create objects in gs://read-only "
                              f"(Forbidden: gs://read-only/run/.apl-jax-write-test-{os.getpid()})")


def test_model_prefix_and_sample_outputs_on_gs(gcs, gs_run, tiny, tmp_path, monkeypatch):
    from etils import epath

    from apl_jax import storage

    local = tmp_path / "tiny"
    tiny.save(local)
    for key, value in gcs.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(storage, "LOCAL_MIRROR", tmp_path / "mirror")
    files = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    for name in files:
        (epath.Path("gs://bucket/models/tiny") / str(name)).write_bytes((local / name).read_bytes())
    mirror = storage.local_copy("gs://bucket/models/tiny")
    assert all((mirror / name).read_bytes() == (local / name).read_bytes() for name in files)

    out = "gs://bucket/samples"
    done = subprocess.run([sys.executable, str(REPO / "sample.py"), "--model", "gs://bucket/models/tiny", "--prefix",
                           RUN + "/prefix.safetensors", "--prompt", "a photo", "--num-images", "2", "--steps", "2",
                           "--out", out + "/grid.png", "--save-dir", out + "/images"],
                          env=train_env(extra_env=gcs), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list_gcs(gcs, out + "/images") == ["0000-a_photo-prefix.png", "0001-a_photo-prefix.png"]
    assert read_gcs(gcs, out + "/grid.png").startswith(b"\x89PNG")
