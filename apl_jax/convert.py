"""Weight layouts: PyTorch state dicts <-> Flax param trees, without torch.

Our modules (apl_jax/nn) name their params as diffusers'/transformers' former Flax
classes did, so the two are one rename table: pt_name maps every Flax param path to
its PyTorch name, and loading PyTorch weights inverts that table over the *shapes*
of the expected params (jax.eval_shape), so nothing is initialised just to learn names.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

# Flax names list elements "<list>_<i>" where PyTorch's ModuleLists say "<list>.<i>".
# Other "_<digit>" names (linear_1, conv_1...) are real attribute names in both.
_LIST_SEGMENT = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers|net|to_out)_(\d+)$")
# our VAE attention keeps the old attribute names (as the shipped weights have them); PyTorch now uses to_q/...
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def pt_name(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict name of the Flax param at `path`."""
    *modules, leaf = path
    names = []
    for segment in modules:
        match = _LIST_SEGMENT.match(segment)
        names.append(f"{match[1]}.{match[2]}" if match else _VAE_ATTENTION.get(segment, segment))
    return ".".join(names + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])


def to_pt_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """A Flax param's array in PyTorch's layout (a view where numpy can make one)."""
    if path[-1] != "kernel":
        return value
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T  # HWIO -> OIHW; (in, out) -> (out, in)


def to_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """The inverse of to_pt_layout."""
    if path[-1] != "kernel":
        return value
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def flax_to_pt(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A Flax param tree -> a PyTorch-named state dict of numpy arrays."""
    return {
        pt_name(path): np.ascontiguousarray(to_pt_layout(path, np.asarray(value, dtype=np.float32)))
        for path, value in flatten_dict(params).items()
    }


def pt_names(expected: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """PyTorch name -> Flax path, for every param of a tree (of arrays or of shapes)."""
    return {pt_name(path): path for path in flatten_dict(expected)}


def pt_to_flax(tensors: Iterable[tuple[str, np.ndarray]], expected: Mapping[str, Any],
               leaf: Callable[[np.ndarray], Any] = np.asarray) -> dict[str, Any]:
    """PyTorch-named (name, tensor) pairs -> a Flax tree, named after `expected` (a tree of shapes).

    Each tensor goes through `leaf` as soon as it is in the Flax layout, so a lazy source (one
    tensor read at a time) never holds more than one tensor in PyTorch's layout.
    Names the table does not know stay as they are, so shape_mismatches reports them as unexpected.
    """
    table = pt_names(expected)
    flat = {}
    for name, value in tensors:
        if name.endswith("position_ids"):  # a buffer older transformers saved beside the weights
            continue
        path = table.get(name, tuple(name.split(".")))
        flat[path] = leaf(to_flax_layout(path, np.asarray(value)))
    return unflatten_dict(flat)


def shape_mismatches(params: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a param tree and the shapes a config implies."""
    got, want = flatten_dict(params, sep="/"), flatten_dict(expected, sep="/")
    problems = [f"missing {k}" for k in want if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in want]
    problems += [
        f"{k} has shape {tuple(np.shape(got[k]))}, config expects {tuple(want[k].shape)}"
        for k in want
        if k in got and tuple(np.shape(got[k])) != tuple(want[k].shape)
    ]
    return problems
