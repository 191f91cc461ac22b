"""Training metrics: DIR/metrics.jsonl (one JSON object per logged step) and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MetricsLog:
    def __init__(self, workdir: Path, resume_step: int):
        self.path = Path(workdir) / "metrics.jsonl"
        self.records = []
        if self.path.exists():
            # Lines past the checkpoint we resume from were never saved; they are redone.
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in lines if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
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
