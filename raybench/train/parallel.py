"""FSDP2 applied from outside the model (torchtitan's pattern).

`wrap="block"`: `fully_shard` per ViT block, per decoder layer, on the projector (VET /
merger / Q-Former) and the DeepStack mergers, then on the root, so each unit's parameters
are all-gathered just before it runs and freed after. `wrap="root"`: the root only, kept
gathered from forward to backward: one all-gather and one reduce-scatter per step, for
models small enough to hold whole. CPU: gloo, fp32 (gloo has no bf16 collectives). GPU:
bf16 parameters/activations with fp32 gradient reduction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from raybench.data.processor import IGNORE_INDEX
from raybench.model.vlm import HybridVLM


def build_mesh(world_size: int, device_type: str) -> DeviceMesh:
    # An explicit CPU mesh: gloo + fully_shard on a GPU box segfaults otherwise (pytorch#132471).
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp_shard",))


def mixed_precision(device_type: str) -> MixedPrecisionPolicy:
    if device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def resolve_wrap(wrap: str, device_type: str) -> str:
    """`train.fsdp_wrap`'s auto: per block on GPU, the root alone on CPU."""
    if wrap != "auto":
        return wrap
    return "block" if device_type == "cuda" else "root"


def parallelize(model: HybridVLM, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
                compile: bool = False, wrap: str = "block") -> HybridVLM:
    kw = {"mesh": mesh, "mp_policy": mp_policy}
    for unit in model.units():
        if compile:
            # Per block, after sharding decisions: FSDP's hooks stay outside the graph.
            unit.compile()
        if wrap == "block":
            fully_shard(unit, **kw)
    fully_shard(model, reshard_after_forward=wrap == "block", **kw)
    if wrap == "block":
        # Pruning reads the next decoder layer's q/k outside its forward: gather it first
        # (its own forward then reshards it as usual). Root-wrapped, it is gathered already.
        model.before_scoring = lambda layer: layer.unshard()
    return model


def loss_items_per_rank(batch: dict) -> float | None:
    """The answer-token loss divisor for this rank: every rank's answer tokens, over the
    world size. Each rank's loss is then its summed token loss over that, and FSDP's mean
    of the ranks' gradients is the gradient of the whole batch's token mean, as in one
    process (a rank's own token mean would weigh a token on a rank with fewer of them more).
    None for a scene batch: every row carries the same number of targets there, and the
    ranks hold equal rows, so their means already weigh alike. A collective: every rank."""
    if "scene_targets" in batch:
        return None
    labels = batch["labels"]
    n = (labels != IGNORE_INDEX).sum().to(torch.float64).reshape(1)
    dist.all_reduce(n)
    return n.item() / dist.get_world_size()
