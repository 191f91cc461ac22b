"""Model configs as frozen dataclasses, read from and written to diffusers/transformers config.json dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from apl_jax.errors import UserError

Config = TypeVar("Config")


def _frozen(value):
    # JSON lists become tuples: configs are hashed, as static parts of jitted functions
    return tuple(value) if isinstance(value, list) else value


def from_json(cls: type[Config], raw: Mapping[str, Any], component: str, supported: Mapping[str, tuple]) -> Config:
    """The fields of `cls` found in `raw`; other keys are ignored, except the keys of `supported`
    (key -> the values our modules implement), whose other values are a clear error."""
    for key, values in supported.items():
        if key in raw and _frozen(raw[key]) not in values:
            allowed = " or ".join(repr(value) for value in values)
            raise UserError(f"the {component} config has {key}={raw[key]!r}, which this project's model code "
                            f"does not implement (it supports {allowed})")
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: _frozen(value) for key, value in raw.items() if key in names})


def to_json(config) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(config).items()}


def check_block_types(component: str, key: str, types: tuple[str, ...], known: tuple[str, ...]) -> None:
    unknown = [name for name in types if name not in known]
    if unknown:
        raise UserError(f"the {component} config's {key} has {unknown[0]!r}, which this project's model code does not "
                        f"implement (it supports {' and '.join(known)})")
