import json
import logging
import re
import shutil
import signal
import struct

import jax
import numpy as np
import pytest
import safetensors.numpy

from apl_jax.checkpoint import Checkpointer
from apl_jax.errors import UserError
from apl_jax.trainer import train
from conftest import assert_close, assert_umask_modes, run_train, start_train, tiny_config as config, umask, wait_for_metrics


def prefix_of(workdir):
    return safetensors.numpy.load_file(workdir / "prefix.safetensors")["<alz>"]


def read_events(path):
    """The events of one TensorBoard file, read as TensorBoard reads them: TFRecord framing, both CRCs checked."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data, offset, events = path.read_bytes(), 0, []
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == masked_crc32c(header)
        body = data[offset + 12:offset + 12 + length]
        assert struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] == masked_crc32c(body)
        events.append(Event.FromString(body))
        offset += 16 + length
    return events


def scalars(events):
    """{tag: {step: value}}"""
    found = {}
    for event in events:
        for value in event.summary.value:
            found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    with umask(0o027):  # every file of the workdir must follow it (test_outputs)
        result = train(config("train.steps=6"), workdir)
    assert result.step == 6 and not result.interrupted
    return workdir


def test_outputs(straight):
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert (straight / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tensors = safetensors.numpy.load_file(straight / "prefix.safetensors")
    assert list(tensors) == ["<alz>"]
    assert tensors["<alz>"].shape == (10, 32) and tensors["<alz>"].dtype == np.float32
    with open(straight / "prefix.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}
    assert sorted(int(p.name) for p in (straight / "checkpoints").iterdir()) == [2, 4, 6]  # keep 3
    assert_umask_modes(straight, 0o027)  # checkpoints, metrics, events, plot and prefix alike: no 0600 files


def test_tensorboard_events(straight):
    (path,) = straight.glob("events.out.tfevents.*")
    logged = scalars(read_events(path))
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert sorted(logged) == ["grad_norm", "learning_rate", "loss", "skipped_steps", "steps_per_s"]
    for tag, values in logged.items():
        assert sorted(values) == [1, 2, 3, 4, 5, 6]
        np.testing.assert_allclose([values[r["step"]] for r in records], [r[tag] for r in records], rtol=1e-6)
    assert set(logged["learning_rate"].values()) == {np.float32(1e-3)} and set(logged["skipped_steps"].values()) == {0}


def test_loss_plot_smoothing():
    from apl_jax.metrics import smooth

    assert smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(smooth([2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0])  # debiased: no pull towards 0
    np.testing.assert_allclose(smooth([0.0, 1.0, 1.0], 0.5), [0.0, 0.5 / 0.75, 0.75 / 0.875])


def test_resume_is_bitwise(straight, tmp_path):
    first = train(config("train.steps=3"), tmp_path)
    assert first.step == 3
    second = train(config("train.steps=6"), tmp_path)
    assert second.step == 6
    np.testing.assert_array_equal(prefix_of(tmp_path), prefix_of(straight))
    straight_losses = (straight / "metrics.jsonl").read_text()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 6
    assert [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(l)["loss"] for l in straight_losses.splitlines()
    ]
    # the resumed run's event file tells TensorBoard to drop later steps of the first one
    first, second = (read_events(tmp_path / name) for name in sorted(p.name for p in tmp_path.glob("events.out.tfevents.*")))
    assert sorted(scalars(first)["loss"]) == [1, 2, 3] and sorted(scalars(second)["loss"]) == [4, 5, 6]
    assert [(e.step, e.session_log.status) for e in second if e.HasField("session_log")] == [(4, 1)]  # START


def test_caption_drift_is_measured_from_the_initial_prefix_also_after_a_resume(straight, tmp_path):
    drift = ("train.caption_drift_weight=10000",)
    assert train(config("train.steps=3", *drift), tmp_path / "straight").step == 3
    losses = [json.loads(l)["loss"] for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(l)["loss"] for l in (straight / "metrics.jsonl").read_text().splitlines()]
    # step 1 trains the initial prefix: no drift yet, and none in the gradient (a square's is 0 at 0), so
    # step 2 starts from the same prefix and its loss adds 10^4 x the drift the first update made
    np.testing.assert_allclose(losses[0], plain[0], rtol=1e-5)
    assert losses[1] > plain[1] * (1 + 1e-3)
    train(config("train.steps=1", *drift), tmp_path / "resumed")
    train(config("train.steps=3", *drift), tmp_path / "resumed")
    np.testing.assert_array_equal(prefix_of(tmp_path / "resumed"), prefix_of(tmp_path / "straight"))


def test_incompatible_checkpoint_is_an_error(straight, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(straight, workdir)
    with pytest.raises(UserError, match=r"written with prefix.num_vectors=10, this run has 4: use another --workdir"):
        train(config("train.steps=8", "prefix.num_vectors=4"), workdir)


def truncate_state(checkpoint):
    """Cut the array data of a checkpoint's state in half, as a full disk or an interrupted copy leaves it."""
    for f in (checkpoint / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_corrupt_checkpoint_falls_back_to_the_newest_intact_one(straight, tmp_path, caplog):
    workdir = tmp_path / "w"
    shutil.copytree(straight, workdir)
    truncate_state(workdir / "checkpoints/6")
    with caplog.at_level(logging.WARNING, logger="apl_jax"):
        result = train(config("train.steps=6"), workdir)
    assert result.step == 6
    ckpt = workdir / "checkpoints"
    [warning] = [r.getMessage() for r in caplog.records if r.name == "apl_jax.checkpoint"]
    assert re.fullmatch(rf"checkpoint {ckpt}/6 is corrupt: its state cannot be read \(ValueError: .+\); restored the "
                        rf"newest intact one, {ckpt}/4, and moved the corrupt one to {workdir}/corrupt-checkpoints/6",
                        warning), warning
    # Resumed from step 4, it redid steps 5 and 6 exactly, and saved step 6 again.
    np.testing.assert_array_equal(prefix_of(workdir), prefix_of(straight))
    assert sorted(int(p.name) for p in ckpt.iterdir()) == [2, 4, 6]
    assert [p.name for p in (workdir / "corrupt-checkpoints").iterdir()] == ["6"]


def test_no_intact_checkpoint_is_an_error(straight, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(straight, workdir)
    for step in (2, 4, 6):
        truncate_state(workdir / f"checkpoints/{step}")
    ckpt = workdir / "checkpoints"
    with pytest.raises(UserError) as raised:
        train(config("train.steps=8"), workdir)
    assert re.fullmatch(rf"no checkpoint in {ckpt} can be restored: step 6: its state cannot be read \(ValueError: .+\); "
                        rf"step 4: .+; step 2: .+; move {ckpt} away to train again from step 0", str(raised.value))
    assert not (workdir / "corrupt-checkpoints").exists()  # nothing is moved when nothing can be restored


def test_cosine_schedule_decays_each_update():
    """Adam on a constant gradient moves each element by the rate itself, so the updates show the schedule."""
    from apl_jax.config import TrainConfig
    from apl_jax.trainer import learning_rate_at, make_optimizer

    cosine = [0.01 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)]
    optimizer = make_optimizer(TrainConfig(steps=4, learning_rate=0.01, lr_schedule="cosine"))
    params = np.zeros(3, np.float32)
    state = optimizer.init(params)
    for rate in cosine:
        update, state = optimizer.update(np.ones(3, np.float32), state, params)
        np.testing.assert_allclose(update, -rate, rtol=1e-5, atol=1e-9)
    accumulated = TrainConfig(steps=8, learning_rate=0.01, lr_schedule="cosine", grad_accum_steps=2)
    np.testing.assert_allclose([learning_rate_at(accumulated, s) for s in range(1, 9)], np.repeat(cosine, 2), rtol=1e-6)
    assert learning_rate_at(TrainConfig(steps=8, learning_rate=0.01), 8) == 0.01


def test_cosine_run_logs_its_rate_and_resumes_only_to_its_end(tmp_path):
    cosine = ("train.lr_schedule=cosine", "train.learning_rate=0.01")
    assert train(config("train.steps=4", *cosine), tmp_path).step == 4
    rates = [json.loads(line)["learning_rate"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(rates, [0.01 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)], rtol=1e-6)
    with pytest.raises(UserError) as raised:  # the decay ended at step 4: more steps would not be the same schedule
        train(config("train.steps=6", *cosine), tmp_path)
    assert str(raised.value) == f"checkpoint {tmp_path}/checkpoints/4 was written with train.steps=4, this run has 6: " \
                                "use another --workdir, or set train.steps=4 to resume"
    with pytest.raises(UserError, match="was written with train.lr_schedule='cosine', this run has 'constant'"):
        train(config("train.steps=6"), tmp_path)


def test_checkpoint_from_before_the_nan_guard_restores_with_zero_counters(tmp_path):
    """Runs saved before train.nan_policy existed have no guard counters, nor (before train.lr_schedule) a
    schedule in their config; they must still resume."""
    from apl_jax.models import tiny_random
    from apl_jax.nonfinite import FIELDS
    from apl_jax.trainer import initial_state, make_optimizer

    template = jax.device_get(initial_state(config(), tiny_random(), make_optimizer(config().train)))  # train()'s
    old_state = {k: v for k, v in template.items() if k not in FIELDS} | {"step": np.int32(4)}
    old_config = config().to_dict()
    del old_config["train"]["lr_schedule"]
    with Checkpointer(tmp_path, 3, old_config) as old_run:
        old_run.save(old_state, {"next_example": 8})
    with Checkpointer(tmp_path, 3, config().to_dict()) as new_run:
        restored, position = new_run.restore(template)
    assert (int(restored["step"]), int(restored["skipped_steps"]), int(restored["nonfinite_step"])) == (4, 0, 0)
    assert np.array_equal(restored["params"], template["params"]) and position == {"next_example": 8}
    assert not (tmp_path.parent / "corrupt-checkpoints").exists()


def test_sigterm_leaves_a_restorable_checkpoint(tmp_path):
    proc = start_train(tmp_path)
    wait_for_metrics(tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    stopped_at = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert f"stopped by signal at step {stopped_at}; checkpoint saved in {tmp_path}/checkpoints/{stopped_at}. " \
           "Rerun the same command to resume." in out
    assert stopped_at >= 3
    metrics = tmp_path / "metrics.jsonl"
    assert not (tmp_path / "prefix.safetensors").exists()  # no export of an unfinished run

    checkpointer = Checkpointer(tmp_path / "checkpoints", 3, config().to_dict())
    assert checkpointer.latest_step() == stopped_at
    checkpointer.close()
    result = train(config(f"train.steps={stopped_at + 2}", "train.checkpoint_every=100000"), tmp_path)
    assert result.step == stopped_at + 2
    lines = metrics.read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines][-3:] == [stopped_at, stopped_at + 1, stopped_at + 2]


def test_cli_user_errors_are_one_line(tmp_path):
    done = run_train(tmp_path, "train.stepz=3")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown config key train.stepz; known keys here: " \
        "steps, batch_size, learning_rate, lr_schedule, negative_guidance, caption_drift_weight, grad_accum_steps, fused_unet_passes, cache_latents, seed, "\
        "checkpoint_every, keep_checkpoints, log_every, nan_policy"
    done = run_train(tmp_path, "model.path=/no/such/model")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: model folder /no/such/model does not exist")
    assert "Traceback" not in done.stderr


def test_cached_latents_train_the_same_objective(straight, tmp_path):
    """The cached posterior feeds the same loss: the 6 straight steps' losses again, to float tolerance."""
    result = train(config("train.steps=6", "train.cache_latents=true"), tmp_path)
    assert result.step == 6
    cached = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(l)["loss"] for l in (straight / "metrics.jsonl").read_text().splitlines()]
    assert_close(cached, plain)


def test_latent_cache_encodes_each_image_once():
    from apl_jax.latent_cache import LatentCache

    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        mean = pixels.astype(np.float32).mean(axis=(1, 2, 3))[:, None, None, None] * np.ones((1, 2, 2, 4))
        return mean, mean + 1

    cache = LatentCache(encode)
    images = np.random.default_rng(0).integers(0, 255, size=(3, 4, 4, 3), dtype=np.uint8)
    first = cache({"pixels": images[[0, 1]], "private_ids": np.zeros((2, 77))})
    again = cache({"pixels": images[[1, 0]], "private_ids": np.ones((2, 77))})
    assert calls == [2]  # both images seen: no second encode
    np.testing.assert_array_equal(again["posterior_mean"], first["posterior_mean"][::-1])
    assert "pixels" not in again and again["private_ids"].sum() == 2 * 77
    cache({"pixels": images[[2, 0]], "private_ids": np.zeros((2, 77))})
    assert calls == [2, 2] and len(cache.entries) == 3
