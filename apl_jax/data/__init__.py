"""Input pipeline: APL prompt pairs and the host-local batch streams that feed the training step.

Every source implements `HostInput`: this host's slice of each global batch, plus a
JSON-serialisable position that the checkpoint saves, so a resumed run sees exactly
the examples an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class HostInput(Protocol):
    def next_batch(self) -> dict[str, np.ndarray]:
        """This host's examples of the next global batch:
        pixels uint8 [n, H, W, 3], private_ids / neutral_ids int32 [n, 77]."""

    def get_state(self) -> dict[str, Any]:
        """The position after the last batch handed out (JSON-serialisable)."""

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a position that get_state returned (on any host)."""
