"""The real ingress and hops with real payloads, and no models: stages with the real stages'
methods and output shapes that compute nothing (issue 31's overhead question). Against the
no-op 3-hop app it prices the request parsing, tokenising and payloads; against the real
pipeline, the models, their batching and the decode loop."""

from __future__ import annotations

from typing import Any, AsyncIterator

import torch
from ray import serve

from raybench.serve.payloads import GenOut, GenRequest, ProjectionOut, VisionOut, to_wire


class _Shapes:
    """The model's payload shapes, read from its config (the weights are never loaded)."""

    def __init__(self, model_dir: str):
        import json
        from pathlib import Path

        from raybench.model.config import ModelConfig

        meta = json.loads((Path(model_dir) / "config.json").read_text())
        cfg = ModelConfig.model_validate(meta["model"])
        taps = len(cfg.deepstack_visual_indexes)
        self.patches = torch.zeros(cfg.num_patches, cfg.vision.hidden_size)
        self.visual = torch.zeros(cfg.num_image_tokens, cfg.llm.hidden_size)
        self.taps, self.eos = taps, int(meta["eos_token_id"])

    def health(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"stage": type(self).__name__}


class PayloadVision(_Shapes):
    async def encode(self, image: bytes) -> VisionOut:
        return VisionOut(to_wire(self.patches), [to_wire(self.patches) for _ in range(self.taps)])


class PayloadProjection(_Shapes):
    async def project(self, features: VisionOut) -> ProjectionOut:
        return ProjectionOut(to_wire(self.visual), [to_wire(self.visual) for _ in range(self.taps)])


class PayloadLLM(_Shapes):
    async def generate(self, projected: ProjectionOut, gen: GenRequest) -> AsyncIterator[Any]:
        tokens = [self.eos] * gen.max_tokens
        yield tokens[:1]
        yield GenOut(tokens, "length")


def payload_app(ingress, config: dict, model_dir: str, num_cpus: float = 0.2):
    """The real `ChatIngress` (bound as `ingress`) over the payload stages."""
    stages = [serve.deployment(cls, name=f"Payload{key}", ray_actor_options={"num_cpus": num_cpus},
                               max_ongoing_requests=256).bind(model_dir)
              for key, cls in (("Vision", PayloadVision), ("Projection", PayloadProjection), ("LLM", PayloadLLM))]
    return ingress.bind(config, *stages)
