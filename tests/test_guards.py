"""Training that cannot silently go wrong: NaN guard, one run per workdir, crash-safe metrics, outputs checked first."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from apl_jax import nonfinite, preflight
from apl_jax.checkpoint import Checkpointer
from apl_jax.errors import UserError
from apl_jax.trainer import train
from apl_jax.workdir_lock import WorkdirLock
from conftest import export_cli, run_train, sample_cli, start_train, tiny_config, wait_for_metrics

EXPLODING = "train.learning_rate=1e30"  # step 1 moves the prefix to ~1e30; step 2's loss is NaN
NAN_AT_STEP_2 = ("error: step 2: the loss, a gradient or the update is NaN or Inf; stopped (train.nan_policy=stop) "
                 "without saving or exporting anything of step 2 or later. Lower train.learning_rate, or set "
                 "train.nan_policy=skip to skip such steps")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def saved_state(workdir, step: int) -> dict:
    with Checkpointer(workdir / "checkpoints", 3, tiny_config().to_dict()) as checkpointer:
        return checkpointer.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


# ---------------------------------------------------------------- non-finite guard


def test_nan_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path):
    """From another current folder, so the shipped paths (templates) must resolve from the project."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_train(tmp_path / "w", EXPLODING, "train.steps=4", "train.checkpoint_every=1", "train.batch_size=2",
                     cwd=elsewhere)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == NAN_AT_STEP_2
    assert "Traceback" not in done.stderr
    workdir = tmp_path / "w"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
    assert not (workdir / "prefix.safetensors").exists()
    assert not (workdir / "lock").exists()
    state = saved_state(workdir, 1)
    assert int(state["step"]) == 1 and int(state["skipped_steps"]) == 0
    assert nonfinite.nonfinite_leaves(state) == []
    assert np.abs(state["params"]).max() > 1e29  # the exploded, still finite step
    assert [(r["step"], np.isnan(r["loss"]), r["skipped_steps"]) for r in records(workdir)] == [(1, False, 0), (2, True, 1)]


def test_nan_policy_skip_drops_the_bad_steps(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="apl_jax"):
        result = train(tiny_config(EXPLODING, "train.steps=4", "train.nan_policy=skip"), tmp_path)
    assert result.step == 4 and result.prefix_file == tmp_path / "prefix.safetensors"
    prefix = safetensors.numpy.load_file(result.prefix_file)["<alz>"]
    assert np.isfinite(prefix).all()
    assert [r["skipped_steps"] for r in records(tmp_path)] == [0, 1, 2, 3]
    assert [r.getMessage() for r in caplog.records if r.name == "apl_jax.trainer"] == [
        "step 2: a NaN/Inf loss or gradient; such steps are skipped (train.nan_policy=skip) and counted as "
        "skipped_steps in metrics.jsonl"]
    # Steps 2-4 kept step 1's prefix, which checkpoint 2 holds too.
    np.testing.assert_array_equal(saved_state(tmp_path, 2)["params"], prefix)


# ---------------------------------------------------------------- one run per workdir


def test_a_second_run_on_the_same_workdir_is_refused(tmp_path):
    first = start_train(tmp_path)
    try:
        wait_for_metrics(tmp_path, 1)
        holder = json.loads((tmp_path / "lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = run_train(tmp_path, "train.steps=2", "model.path=/no/such/model")  # refused before the model loads
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f"error: workdir {tmp_path} is in use by another run (pid {first.pid} on {socket.gethostname()}, "
            f"since {holder['since']}); wait for it to end or use another --workdir (if that run is gone, "
            f"delete {tmp_path / 'lock'})")
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 143, out
    assert not (tmp_path / "lock").exists()  # released at exit


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    pid, host = dead_pid(), socket.gethostname()
    (tmp_path / "lock").write_text(json.dumps({"pid": pid, "host": host, "since": "yesterday"}))
    with caplog.at_level(logging.WARNING, logger="apl_jax"):
        assert train(tiny_config("train.steps=1"), tmp_path).step == 1
    assert [r.getMessage() for r in caplog.records if r.name == "apl_jax.workdir_lock"] == [
        f"taking over {tmp_path / 'lock'}: its run (pid {pid} on {host}) is gone"]
    assert not (tmp_path / "lock").exists()


def test_a_lock_naming_this_very_process_is_stale(tmp_path, caplog):
    """What a killed run leaves when a restarted container gives the new run the same pid."""
    pid, host = os.getpid(), socket.gethostname()
    (tmp_path / "lock").write_text(json.dumps({"pid": pid, "host": host}))
    with caplog.at_level(logging.WARNING, logger="apl_jax"), WorkdirLock(tmp_path):
        assert json.loads((tmp_path / "lock").read_text())["pid"] == pid
    assert [r.getMessage() for r in caplog.records] == [f"taking over {tmp_path / 'lock'}: its run (pid {pid} on {host}) is gone"]
    assert not (tmp_path / "lock").exists()


def test_a_lock_from_another_host_counts_as_held(tmp_path):
    (tmp_path / "lock").write_text(json.dumps({"pid": dead_pid(), "host": "other-host", "since": "2026-01-01 10:00:00"}))
    with pytest.raises(UserError) as raised, WorkdirLock(tmp_path):
        pass
    pid = json.loads((tmp_path / "lock").read_text())["pid"]
    assert str(raised.value) == (
        f"workdir {tmp_path} is in use by another run (pid {pid} on other-host, since 2026-01-01 10:00:00); wait for it "
        f"to end or use another --workdir (if that run is gone, delete {tmp_path / 'lock'})")
    (tmp_path / "lock").write_text("{")
    with pytest.raises(UserError) as raised, WorkdirLock(tmp_path):
        pass
    assert str(raised.value) == (f"{tmp_path / 'lock'} exists but cannot be read; if no run is using {tmp_path}, "
                                 "delete it and start again")


# ---------------------------------------------------------------- crash-safe metrics


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    train(tiny_config("train.steps=2"), tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.0')  # what a crash in the middle of a write leaves
    with caplog.at_level(logging.WARNING, logger="apl_jax"):
        assert train(tiny_config("train.steps=4"), tmp_path).step == 4
    assert [r.getMessage() for r in caplog.records if r.name == "apl_jax.metrics"] == [
        f"{tmp_path / 'metrics.jsonl'}: dropped 1 unreadable line(s) (line 3), as a crash or a full disk leaves them"]
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]


# ---------------------------------------------------------------- checkpoints


def test_keep_checkpoints_must_be_at_least_one(tmp_path):
    with pytest.raises(UserError, match=r"^train.keep_checkpoints must be >= 1, got 0$"):
        Checkpointer(tmp_path, 0, {})


# ---------------------------------------------------------------- outputs checked before any model loads


@pytest.mark.parametrize("make, message", [
    (lambda t: preflight.folder(t / "f", "--save-dir"), "--save-dir {t}/f is a file, not a folder"),
    (lambda t: preflight.folder(t / "f" / "sub", "--save-dir"), "--save-dir {t}/f/sub cannot be created: {t}/f is a file"),
    (lambda t: preflight.image_file(t / "grid", "--out"), "--out {t}/grid must end in .png, .jpg, .jpeg or .webp"),
    (lambda t: preflight.image_file(t / "d.png", "--out"), "--out {t}/d.png is a folder; give a file name in it"),
    (lambda t: preflight.file(t / "f" / "p.pt", "--to"), "--to {t}/f/p.pt cannot be created: {t}/f is a file"),
])
def test_output_path_messages(tmp_path, make, message):
    (tmp_path / "f").write_text("a file")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(UserError) as raised:
        make(tmp_path)
    assert str(raised.value) == message.format(t=tmp_path)


def test_unwritable_output_folder():
    # /sys refuses new files even to root (chmod would not stop root)
    try:
        open("/sys/apl-jax-probe", "w")
    except OSError as err:
        reason = err.strerror
    else:
        pytest.fail("/sys accepted a file")
    with pytest.raises(UserError) as raised:
        preflight.folder("/sys/apl-jax/out", "--out")
    assert str(raised.value) == f"--out /sys/apl-jax/out is not writable: cannot create files in /sys ({reason})"


def test_writable_outputs_pass(tmp_path):
    assert preflight.folder(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert preflight.image_file(tmp_path / "grid.JPG", "--out") == tmp_path / "grid.JPG"
    assert not (tmp_path / "new").exists()  # checking creates nothing


NO_MODEL = ["--model", "/no/such/model"]  # loading it would fail: an error about anything else came first


@pytest.mark.parametrize("args, message", [
    (["--out", "{t}/grid"], "--out {t}/grid must end in .png, .jpg, .jpeg or .webp"),
    (["--out", "{t}"], "--out {t} is a folder; give a file name in it"),
    (["--save-dir", "{t}/file.png"], "--save-dir {t}/file.png is a file, not a folder"),
    (["--scale", "-1"], "--scale must be at least 1, got -1"),
    (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
    (["--seed", str(2**64)], f"--seed must be in [0, 4294967295] (JAX keys hold 32 bits), got {2**64}"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295] (JAX keys hold 32 bits), got -1"),
])
def test_sample_refuses_bad_outputs_before_loading_the_model(tmp_path, args, message):
    (tmp_path / "file.png").write_text("not a folder")
    done = sample_cli("--prompt", "x", *NO_MODEL, "--out", str(tmp_path / "grid.png"),
                      *[a.format(t=tmp_path) for a in args])
    assert done.returncode == 2
    assert done.stderr.strip() == "error: " + message.format(t=tmp_path)


def test_export_refuses_bad_targets_before_reading_or_writing(tmp_path):
    safetensors.numpy.save_file({"<alz>": np.zeros(32, np.float32)}, tmp_path / "flat.safetensors")
    done = export_cli("prefix", "--from", str(tmp_path / "flat.safetensors"), "--to", str(tmp_path / "out.safetensors"),
                      "--format", "diffusers")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {tmp_path / 'flat.safetensors'} holds an array of shape (32,), not a prefix: "
                                   "a prefix is [K, D] (K vectors of the text encoder's width)")
    assert not (tmp_path / "out.safetensors").exists()
    (tmp_path / "file").write_text("")
    done = export_cli("prefix", "--from", str(tmp_path / "missing.safetensors"), "--to",
                      str(tmp_path / "file" / "p.safetensors"), "--format", "diffusers")
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --to {tmp_path}/file/p.safetensors cannot be created: {tmp_path}/file is a file"
    done = export_cli("model", *NO_MODEL, "--out", str(tmp_path / "file"), "--force")
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --out {tmp_path}/file is a file, not a folder"


def test_train_refuses_a_workdir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    done = run_train(tmp_path / "file", "model.path=/no/such/model")
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: workdir {tmp_path}/file is a file, not a folder"
