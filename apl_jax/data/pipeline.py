"""The real APL input: identity faces and caption pairs from local folders, through grain.

Example g of the global stream is a function of (seed, g) alone: its rng decides
identity or generic (probability data.identity_prob) and the templates, and it takes
element g of that dataset's shuffled, endlessly repeated order (a new permutation per
epoch). So any host can make any slice of any global batch: this host makes examples
b*G + first .. b*G + first + count - 1 of global batch b, the hosts' slices are disjoint
and cover the batch, and the position {"next_example": b*G} means the same on every host.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Sequence, TypeVar

import grain
import jax
import numpy as np

from apl_jax import parallel, storage
from apl_jax.config import NEUTRAL_MODES, DataConfig
from apl_jax.data import builders
from apl_jax.data.prompts import Templates, generic_pair, identity_pair
from apl_jax.errors import UserError
from apl_jax.tokenizer import tokenize

T = TypeVar("T")


class ShuffledForever:
    """Element i of endless epochs of a source, each epoch a new permutation seeded by (seed, stream, epoch).

    (grain's MapDataset.shuffle does the same per index, but costs milliseconds per lookup on the
    small datasets APL uses: 6 ms at 3 elements, 0.5 ms at 64.)
    """

    def __init__(self, source: Sequence[dict], seed: int, stream: int):
        self.source, self.seed, self.stream = source, seed, stream
        self._order = functools.lru_cache(maxsize=2)(self._permutation)  # threads read near the same epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.stream, epoch]).permutation(len(self.source))

    def __getitem__(self, index: int) -> dict:
        epoch, offset = divmod(index, len(self.source))
        return self.source[int(self._order(epoch)[offset])]


class FolderExamples:
    """Random access to the APL example stream over the built datasets: example g is a function of (seed, g)."""

    def __init__(self, identity: Sequence[dict] | None, captions: Sequence[dict] | None, tokenizer, placeholder: str,
                 templates: Templates, *, identity_prob: float, neutral_mode: str, seed: int, num_vectors: int = 1,
                 neutral_prompt: str = "", private_templates: bool = False):
        self.identity = ShuffledForever(identity, seed, 1) if identity is not None else None
        self.captions = ShuffledForever(captions, seed, 2) if captions is not None else None
        self.tokenizer, self.placeholder, self.templates = tokenizer, placeholder, templates
        self.identity_prob, self.seed = identity_prob, seed
        self.neutral_mode, self.neutral_prompt, self.private_templates = neutral_mode, neutral_prompt, private_templates
        self.prefix_extra = num_vectors - 1  # tokens the prefix adds at the placeholder (for the too-long warning)

    def prompts(self, index: int) -> tuple[dict[str, Any], str, str]:
        """(record, private prompt, neutral prompt) of example `index`; tfds gives text features as bytes."""
        rng = np.random.default_rng([self.seed, index])
        if rng.random() < self.identity_prob:
            record = self.identity[index]
            private, neutral = identity_pair(record["name"].decode(), self.placeholder, rng, self.templates,
                                             neutral_mode=self.neutral_mode, attribute=record["attribute"].decode(),
                                             neutral_prompt=self.neutral_prompt,
                                             private_templates=self.private_templates)
        else:
            record = self.captions[index]
            private, neutral = generic_pair(record["caption"].decode(), self.placeholder)
        return record, private, neutral

    def example(self, index: int) -> dict[str, np.ndarray]:
        record, private, neutral = self.prompts(index)
        private_ids, neutral_ids = tokenize(self.tokenizer, [private, neutral], extra_tokens=[self.prefix_extra, 0])
        return {"pixels": record["image"], "private_ids": private_ids, "neutral_ids": neutral_ids}


class StreamInput:
    """HostInput over any example stream with example(g) -> dict (folders or synthetic):
    this host's slice of each global batch, made ahead in grain threads."""

    def __init__(self, examples, global_batch: int, host_first: int, host_count: int, *, threads: int):
        self.examples, self.global_batch = examples, global_batch
        self.host_first, self.host_count, self.threads = host_first, host_count, threads
        self.next_global = 0  # index of the first example of the next global batch
        self._batches = None  # grain iterator from next_global on; made on first use

    def _example_at(self, start: int, position: int) -> dict[str, np.ndarray]:
        """Example `position` of this host's own stream, which starts at global example `start`."""
        batch, offset = divmod(position, self.host_count)
        return self.examples.example(start + batch * self.global_batch + self.host_first + offset)

    def _start(self) -> None:
        start = self.next_global
        examples = grain.MapDataset.range(sys.maxsize).map(lambda position: self._example_at(start, position))
        # Threads decode, look up and tokenize about two batches ahead of the training step.
        options = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=max(2 * self.host_count, self.threads))
        self._batches = iter(examples.to_iter_dataset(options).batch(self.host_count))

    def next_batch(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            self._start()
        batch = next(self._batches)
        self.next_global += self.global_batch
        return batch

    def get_state(self) -> dict:
        return {"next_example": self.next_global}

    def set_state(self, state: dict) -> None:
        self.next_global = int(state["next_example"])
        self._batches = None


def _process_zero_first(build: Callable[[], T]) -> T:
    """Process 0 builds first, the other hosts after it: on a shared cache_dir they then find its
    build instead of racing it, on local disks they build their own (the build is deterministic)."""
    if jax.process_count() == 1:
        return build()
    failure = None
    if jax.process_index() == 0:
        try:
            result = build()
        except UserError as err:
            failure = str(err)
    failure = parallel.broadcast_json(failure)
    if failure is not None:
        raise UserError(failure)
    return result if jax.process_index() == 0 else build()


def check_data_config(data: DataConfig) -> None:
    """Refuse settings that cannot work before anything is scanned or built."""
    if data.neutral_mode not in NEUTRAL_MODES:
        raise UserError(f"data.neutral_mode must be one of {', '.join(NEUTRAL_MODES)}, got {data.neutral_mode!r}")
    if data.neutral_mode == "prompt" and not data.neutral_prompt.strip():
        raise UserError("data.neutral_mode=prompt needs a data.neutral_prompt (for the empty one, use data.neutral_mode=empty)")
    if not 0 <= data.identity_prob <= 1:
        raise UserError(f"data.identity_prob must be in [0, 1], got {data.identity_prob}")
    if data.identity_prob > 0 and not data.identity_dir:
        raise UserError(f"data.identity_prob={data.identity_prob} needs data.identity_dir (a folder of face images)")
    if data.identity_prob < 1 and not data.caption_dir:
        raise UserError(f"data.identity_prob={data.identity_prob} needs data.caption_dir (a folder of captioned images)")
    if data.loader_threads < 1:
        raise UserError(f"data.loader_threads must be at least 1, got {data.loader_threads}")


def load_datasets(data: DataConfig) -> tuple[Sequence[dict] | None, Sequence[dict] | None]:
    """(identity faces, caption pairs) data sources, built on first use; None where identity_prob rules one out."""
    check_data_config(data)
    # array_record files are read and written with local file I/O: a gs:// cache_dir stands for a folder
    # on each host's disk (each host builds it once; the build is deterministic).
    cache_dir = storage.mirror_folder(data.cache_dir) if storage.is_remote(data.cache_dir) else data.cache_dir

    def build():
        identity = captions = None
        if data.identity_prob > 0:
            folder = storage.local_copy(data.identity_dir)  # gs://: mirrored to this host once
            items = builders.scan_identity_folder(folder, need_attributes=data.neutral_mode == "attributes")
            identity = builders.load(builders.IdentityFaces, folder, items, data.resolution, cache_dir)
        if data.identity_prob < 1:
            folder = storage.local_copy(data.caption_dir)
            items = builders.scan_caption_folder(folder)
            captions = builders.load(builders.CaptionPairs, folder, items, data.resolution, cache_dir)
        return identity, captions

    return _process_zero_first(build)


def folder_input(data: DataConfig, tokenizer, placeholder: str, seed: int, global_batch: int, host_first: int,
                 host_count: int, num_vectors: int = 1) -> StreamInput:
    """This host's batch stream over the folder datasets of `data`."""
    identity, captions = load_datasets(data)
    examples = FolderExamples(identity, captions, tokenizer, placeholder, Templates.load(data.templates),
                              identity_prob=data.identity_prob, neutral_mode=data.neutral_mode, seed=seed,
                              num_vectors=num_vectors, neutral_prompt=data.neutral_prompt,
                              private_templates=data.private_templates)
    return StreamInput(examples, global_batch, host_first, host_count, threads=data.loader_threads)
