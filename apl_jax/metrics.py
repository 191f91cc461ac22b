"""Training metrics: DIR/metrics.jsonl (one JSON object per logged step) and a loss-curve PNG.

Each record is appended and flushed as its own line, so a crash or a full disk tears
at most the last line; on resume an unreadable line is dropped with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)


def _record(line: str) -> dict | None:
    """The record on a line, or None if the line is not one (torn, or garbage)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MetricsLog:
    def __init__(self, workdir: Path, resume_step: int):
        self.path = Path(workdir) / "metrics.jsonl"
        self.records = []
        if self.path.exists():
            lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
            records = [_record(line) for line in lines]
            torn = [number for number, record in enumerate(records, 1) if record is None]
            if torn:
                log.warning("%s: dropped %d unreadable line(s) (line %s), as a crash or a full disk leaves them",
                            self.path, len(torn), ", ".join(map(str, torn)))
            # Lines past the checkpoint we resume from were never saved; they are redone.
            self.records = [r for r in records if r is not None and r["step"] <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            tmp.replace(self.path)  # a crash now leaves the old file or the new one, never half of it

    def log(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:  # closed (so flushed) after every line
            f.write(json.dumps(record) + "\n")

    def plot(self, out: Path | None = None) -> Path:
        out = out or self.path.with_name("loss.png")
        steps = [r["step"] for r in self.records]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [r["loss"] for r in self.records], lw=1, label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("APL loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
