"""Ray Data input for Ray Train workers.

    read_parquet(split filter) -> map_batches(decode PNG to uint8, tokenize) -> materialize
    -> split equally across workers -> iter_torch_batches on each worker

Decoded images stay uint8 in the object store (4x smaller than float); workers normalise
per batch. Rows (conversations rendered by the chat template) hold a single `<image>`
placeholder, whose column each row carries (`image_pos`), that workers expand to the model's
`num_image_tokens`, so the materialised data does not depend on the model: a sweep builds
it once and every trial (VET indicators, Q-Former queries, ...) trains on the same blocks. The split is deterministic (ordered, materialised, `split(equal=True)`) so a
resumed run sees the same rows in the same order and can skip to the exact batch.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import ray
import torch
from ray.data.expressions import col
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import DataConfig

from raybench.data.conversation import MESSAGES_COLUMN, loads, stable_split
from raybench.data.loader import (VAL_FRACTION, dataset_columns, decode_rgb_uint8, normalize_columns,
                                  normalize_pixels, source_columns)
from raybench.data.processor import IGNORE_INDEX, VQAProcessor, group_rows, shared_images
from raybench.data.synthetic import DESCRIBE, scene_targets
from raybench.data.tokenizer import load_tokenizer

# `answer` is the last assistant turn: a `scene` stage reads its targets from the captions.
COLUMNS = ["image", MESSAGES_COLUMN, "qtype", "answer"]


@functools.lru_cache(maxsize=4)
def _processor(tokenizer_dir: str, num_image_tokens: int, image_size: int) -> VQAProcessor:
    return VQAProcessor(load_tokenizer(tokenizer_dir), num_image_tokens, image_size)


def preprocess(batch: dict[str, np.ndarray], tokenizer_dir: str, image_size: int,
               max_length: int) -> dict[str, np.ndarray]:
    """Image bytes + a conversation (in either stored form) -> uint8 pixels and fixed-width,
    right-padded token arrays with one `<image>` placeholder (see `expand_image_tokens`)."""
    proc = _processor(tokenizer_dir, 1, image_size)
    rows = normalize_columns(batch, COLUMNS)
    enc = proc.encode_conversations([loads(m) for m in rows[MESSAGES_COLUMN]])
    width = enc["input_ids"].shape[1]
    if width > max_length:
        raise ValueError(f"a conversation needs {width} tokens, more than data.max_length={max_length}")
    pad = max_length - width
    # A `scene` stage's targets, read from its `describe` captions (-100: not a caption row).
    scene = np.array([scene_targets(a) if q == DESCRIBE else [IGNORE_INDEX] * 9
                      for q, a in zip(rows["qtype"], rows["answer"])], dtype=np.int64)
    return {
        "pixels": np.stack([decode_rgb_uint8(b, image_size) for b in rows["image"]]),
        "input_ids": np.pad(enc["input_ids"].numpy(), ((0, 0), (0, pad)), constant_values=proc.pad_id),
        "attention_mask": np.pad(enc["attention_mask"].numpy(), ((0, 0), (0, pad))),
        "labels": np.pad(enc["labels"].numpy(), ((0, 0), (0, pad)), constant_values=IGNORE_INDEX),
        "image_pos": (enc["input_ids"] == proc.image_token_id).int().argmax(1).numpy(),
        "qtype": np.array(rows["qtype"], dtype=object),
        "scene_targets": scene,
    }


def build_dataset(path: str | os.PathLike, split: str, tokenizer_dir: Path, image_size: int,
                  max_length: int, limit: int | None = None) -> ray.data.Dataset:
    """`path`: a local path or a URI (`s3://bucket/prefix`, ...), which reaches Ray Data as
    it is (never through `pathlib`)."""
    present = dataset_columns(path)
    read = source_columns(present, COLUMNS)
    ds = ray.data.read_parquet(str(os.fspath(path)), columns=read + (["split"] if "split" in present else []),
                               shuffle=None)
    if "split" in present:  # a predicate expression: Ray pushes it down into the Parquet scan
        ds = ds.filter(expr=col("split") == split).select_columns(read)
    else:  # the loader's hashed split (`raybench.data.loader.split_column`)
        ds = ds.filter(fn=lambda row: stable_split(bytes(row["image"]), VAL_FRACTION) == split)
    if limit is not None:
        ds = ds.limit(limit)
    ds = ds.map_batches(preprocess, batch_format="numpy", batch_size=256, fn_kwargs=dict(
        tokenizer_dir=str(tokenizer_dir), image_size=image_size, max_length=max_length))
    ds.context.execution_options.preserve_order = True  # deterministic order -> exact resume
    return ds.materialize()


class DeterministicSplit(DataConfig):
    """Equal, ordered shards (Ray's default `streaming_split` hands blocks to whichever
    worker asks first, so the rows a worker sees would change from run to run)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for rank, shard in enumerate(ds.split(world_size, equal=True)):
                output[rank][name] = shard.iterator()
        return output


class CollateNumpy(NumpyBatchCollateFn):
    """`iter_torch_batches` collate: numeric columns to tensors, qtype stays a list of str.
    Ray hands read-only views of the object store; a tensor over one would be written in
    place by nothing today, but torch warns (rightly): copy those, a few MB per batch."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        return {k: (list(v) if k == "qtype" else torch.from_numpy(np.require(v, requirements=["C", "W"])))
                for k, v in batch.items()}


def group_shuffled(chunks: Iterable[dict], batch_size: int, seed: int) -> Iterator[dict]:
    """A seeded local shuffle that moves whole groups of consecutive rows about one image
    (`data.questions_per_image`), so the groups reach `to_model_batch` intact and the vision
    tower still runs once per image. Ray Data's `local_shuffle_buffer_size` shuffles rows and
    would scatter them. Each chunk (a whole number of batches) is permuted by group and cut
    into `batch_size` batches; a group cut by a batch boundary is merely encoded twice."""
    rng = np.random.default_rng(seed)
    for chunk in chunks:
        pixels = chunk["pixels"]
        first, _ = shared_images((pixels[1:] == pixels[:-1]).flatten(1).all(1))
        order = group_rows(first, len(pixels), rng.permutation(len(first)).tolist())
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            yield {k: ([v[i] for i in rows.tolist()] if k == "qtype" else v[rows]) for k, v in chunk.items()}


def expand_image_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                        num_image_tokens: int, image_pos: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's one `<image>` placeholder (at column `image_pos`; default 1, right after
    `<s>`) -> num_image_tokens copies of it: one gather, no per-row work."""
    b, width = input_ids.shape
    pos = torch.ones(b, 1, dtype=torch.long) if image_pos is None else image_pos.long().view(b, 1)
    j = torch.arange(width + num_image_tokens - 1).unsqueeze(0)
    src = torch.where(j < pos, j, torch.where(j < pos + num_image_tokens, pos, j - num_image_tokens + 1))
    return tuple(t.gather(1, src.expand(b, -1)) for t in (input_ids, attention_mask, labels))


def to_model_batch(batch: dict, device: torch.device, num_image_tokens: int, scene: bool = False) -> dict:
    """uint8 pixels -> SigLIP-normalised floats; trim padding columns no row uses; expand the
    `<image>` placeholder to the model's image tokens. `scene`: a `scene` stage's batch, which
    carries the scene targets (the model then trains its tower on those, not on answers)."""
    width = int(batch["attention_mask"].sum(1).max())
    ids, mask, labels = expand_image_tokens(batch["input_ids"][:, :width], batch["attention_mask"][:, :width],
                                            batch["labels"][:, :width], num_image_tokens, batch.get("image_pos"))
    pixels = batch["pixels"]
    # Consecutive rows about one image (data.questions_per_image): normalise and encode it once.
    first, image_index = shared_images((pixels[1:] == pixels[:-1]).flatten(1).all(1))
    out = {
        "pixel_values": normalize_pixels(pixels[first] if len(first) < len(pixels) else pixels).to(device),
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
        "qtype": list(batch["qtype"]),
    }
    if len(first) < len(pixels):
        out["image_index"] = image_index.to(device)
    if scene:
        out["scene_targets"] = batch["scene_targets"].to(device)
    return out
