"""APL prompt pairs (private, neutral), as the official train.py builds them.

- identity, neutral mode "empty" (official default): private = "alz NAME", neutral = "".
  (The official code draws a pre-template here but only uses it with templates on.)
- identity, neutral mode "prompt" (ours): private = "alz NAME", neutral = data.neutral_prompt.
- with data.private_templates (the official template_enabled), private = "alz PRE NAME TEMPLATE" in
  every mode.
- identity, neutral mode "attributes": private = "alz PRE NAME TEMPLATE",
  neutral = "PRE ATTR_FIRST TEMPLATE, ATTR_REST" where ATTR splits at its first comma.
- generic: private = "alz CAPTION", neutral = CAPTION.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import yaml

from apl_jax.config import NEUTRAL_MODES
from apl_jax.errors import UserError



@dataclasses.dataclass(frozen=True)
class Templates:
    pre_templates: tuple[str, ...]
    templates: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path) -> "Templates":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"template file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        try:
            return cls(tuple(values["pre_templates"]), tuple(values["templates"]))
        except (KeyError, TypeError):
            raise UserError(f"{path} must define the lists pre_templates and templates") from None


def identity_pair(name: str, placeholder: str, rng: np.random.Generator, templates: Templates,
                  neutral_mode: str = "empty", attribute: str | None = None, neutral_prompt: str = "",
                  private_templates: bool = False) -> tuple[str, str]:
    """private_templates: "alz PRE NAME TEMPLATE" in every mode (the official template_enabled); attributes
    mode always has them, since its neutral prompt is joined with the same ones."""
    if neutral_mode not in NEUTRAL_MODES:
        raise UserError(f"data.neutral_mode must be one of {NEUTRAL_MODES}, got {neutral_mode!r}")
    if neutral_mode == "attributes" and not attribute:
        raise UserError(f"neutral_mode 'attributes' needs an attribute description for {name!r}")
    if neutral_mode == "attributes" or private_templates:
        pre = templates.pre_templates[rng.integers(len(templates.pre_templates))]
        template = templates.templates[rng.integers(len(templates.templates))]
        private = f"{placeholder} {pre}{name} {template}"
    else:
        private = f"{placeholder} {name}"
    if neutral_mode == "empty":
        return private, ""
    if neutral_mode == "prompt":
        return private, neutral_prompt
    first, _, rest = attribute.partition(",")
    return private, f"{pre}{first} {template}, {rest.strip()}"


def generic_pair(caption: str, placeholder: str) -> tuple[str, str]:
    return f"{placeholder} {caption}", caption
