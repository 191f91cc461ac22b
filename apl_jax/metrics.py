"""Training metrics: DIR/metrics.jsonl (one JSON object per logged step), TensorBoard event files and a loss-curve PNG.

Each record is appended and flushed as its own line, so a crash or a full disk tears
at most the last line; on resume an unreadable line is dropped with a warning.

In a gs:// workdir nothing can be appended (GCS objects are immutable): metrics.jsonl is
uploaded whole at every logged step, and tensorboardX uploads each event file whole
at every flush (its own gs:// writer, through google-cloud-storage).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402

from apl_jax import storage  # noqa: E402
from apl_jax.files import atomic_write  # noqa: E402

TENSORBOARD_SCALARS = ("loss", "grad_norm", "steps_per_s", "learning_rate", "skipped_steps")


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so it does not start at 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


class TensorBoardLog:
    """The scalars of each record as TensorBoard events in DIR (tensorboard --logdir DIR); no TensorFlow needed."""

    def __init__(self, workdir, first_step: int):
        # TensorBoard drops the events earlier files hold from purge_step on: the steps a resumed run redoes.
        # The suffix keeps a quick resume from reusing the name (the time in it has whole seconds).
        self.writer = SummaryWriter(str(workdir), purge_step=first_step, filename_suffix=f".from{first_step}")

    def log(self, record: dict) -> None:
        for key in TENSORBOARD_SCALARS:
            if key in record:
                self.writer.add_scalar(key, record[key], record["step"])
        self.writer.flush()  # complete on disk at every logged step, as metrics.jsonl is

    def close(self) -> None:
        self.writer.close()


log = logging.getLogger(__name__)


def _record(line: str) -> dict | None:
    """The record on a line, or None if the line is not one (torn, or garbage)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MetricsLog:
    def __init__(self, workdir, resume_step: int):
        self.path = storage.path(workdir) / "metrics.jsonl"
        self.records = []
        if self.path.exists():
            text = self.path.read_bytes().decode(errors="replace")
            lines = [line for line in text.splitlines() if line.strip()]
            records = [_record(line) for line in lines]
            torn = [number for number, record in enumerate(records, 1) if record is None]
            if torn:
                log.warning("%s: dropped %d unreadable line(s) (line %s), as a crash or a full disk leaves them",
                            self.path, len(torn), ", ".join(map(str, torn)))
            # Lines past the checkpoint we resume from were never saved; they are redone.
            self.records = [r for r in records if r is not None and r["step"] <= resume_step]
            self._write_all()
        self.tensorboard = TensorBoardLog(self.path.parent, resume_step + 1)

    def _write_all(self) -> None:
        # A crash now leaves the old file or the new one, never half of it.
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))

    def log(self, record: dict) -> None:
        self.records.append(record)
        if storage.is_remote(self.path):
            self._write_all()
        else:
            with self.path.open("a") as f:  # closed (so flushed) after every line
                f.write(json.dumps(record) + "\n")
        self.tensorboard.log(record)

    def close(self) -> None:
        self.tensorboard.close()

    def plot(self, out: Path | None = None) -> storage.AnyPath:
        out = out or self.path.with_name("loss.png")
        steps = [r["step"] for r in self.records]
        losses = [r["loss"] for r in self.records]
        # An average over about 2% of the run: the per-step loss is noisy (random timesteps and noise).
        weight = 1 - 1 / max(1.0, len(losses) / 50)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, losses, lw=0.8, alpha=0.35, color="C0", label="loss")
        ax.plot(steps, smooth(losses, weight), lw=1.6, color="C0", label=f"smoothed (EMA, weight {weight:.3f})")
        ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("APL loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        return out
