"""Prefix files for other tools (DESIGN.md section 3).

diffusers textual inversion: safetensors, one key "<placeholder>" holding float32
[K, D], metadata format=pt. The angle brackets matter: "alz" is already in CLIP's
vocabulary, and diffusers refuses tokens that are. Written without torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import safetensors.numpy


def diffusers_token(placeholder: str) -> str:
    return f"<{placeholder}>"


def save_diffusers_prefix(path: str | Path, prefix: np.ndarray, placeholder: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    safetensors.numpy.save_file(
        {diffusers_token(placeholder): np.ascontiguousarray(prefix, dtype=np.float32)}, tmp, metadata={"format": "pt"}
    )
    tmp.replace(path)  # never leave a half-written file under the real name
    return path
