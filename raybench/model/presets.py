"""Model sizes and fusion presets as plain dicts.

A model config is `size defaults  <-  preset toggles  <-  the user's own fields`, merged in
that order (see `raybench.model.config.expand_model`). Sizes carry the architecture and the
per-size defaults of each fusion family (how many DeepStack taps, which LLM layers end a
pruning stage); presets only switch families on and off. This module imports nothing
heavy so configs validate in milliseconds.
"""

from __future__ import annotations

from typing import Any

PRESETS = ("llava", "blip2", "ovis", "deepstack", "dense_sparse", "hybrid")
SIZES = ("tiny", "small", "gpu")

_SIZES: dict[str, dict[str, Any]] = {
    # tests: a forward in milliseconds. 32px / patch 8 -> 16 patches -> 4 merged tokens.
    "tiny": {
        "vision": dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                       intermediate_size=64),
        "llm": dict(arch="qwen3", hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=8, intermediate_size=64, initializer_range=0.06),
        "fusion": {
            "vet": {"vocab_size": 64},
            "qformer": {"num_queries": 4, "num_layers": 1, "num_heads": 2},
            "deepstack": {"num_injections": 0},
            "sparsity": {"stage_layers": [1, 2], "final_keep_ratio": 0.5},
        },
        "_family": {"num_injections": 2},
    },
    # the CPU default: 64px / patch 8 -> 64 patches -> 16 merged tokens, ~2 M parameters.
    "small": {
        "vision": dict(image_size=64, patch_size=8, hidden_size=128, num_layers=4, num_heads=4,
                       intermediate_size=256),
        "llm": dict(arch="qwen3", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=32, intermediate_size=384, initializer_range=0.06),
        "fusion": {
            "vet": {"vocab_size": 1024},
            "qformer": {"num_queries": 16, "num_layers": 2, "num_heads": 4},
            "deepstack": {"num_injections": 0},
            "sparsity": {"stage_layers": [0, 1, 2], "final_keep_ratio": 0.25},
        },
        "_family": {"num_injections": 3},
    },
    # a GPU cluster: SigLIP-base/16 at 224px and Qwen3-0.6B, both loaded from local
    # checkpoints (nothing is fetched at run time; put them on shared storage).
    "gpu": {
        "vision": dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                       intermediate_size=3072, pretrained_path="/models/siglip-base-patch16-224"),
        "llm": dict(arch="qwen3", hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                    head_dim=128, intermediate_size=3072, rope_theta=1_000_000.0,
                    max_position_embeddings=4096, pretrained_path="/models/Qwen3-0.6B"),
        "fusion": {
            "vet": {"vocab_size": 16384},
            "qformer": {"num_queries": 32, "num_layers": 2, "num_heads": 8},
            "deepstack": {"num_injections": 0},
            # PyramidDrop's layout: four equal stages of 7 layers, lambda = 0.5 (keep 1, 1/2,
            # 1/4, 1/8); `bench pruning` measures it against the other schedules.
            "sparsity": {"stage_layers": [6, 13, 20], "final_keep_ratio": 0.125},
        },
        "_family": {"num_injections": 3},
    },
}


def _preset_toggles(preset: str, family: dict[str, Any]) -> dict[str, Any]:
    k = family["num_injections"]
    return {
        "llava": {"projector": "mlp"},
        "blip2": {"projector": "qformer"},
        "ovis": {"projector": "vet"},
        "deepstack": {"projector": "mlp", "deepstack": {"num_injections": k}},
        "dense_sparse": {"projector": "mlp", "sparsity": {"enabled": True}},
        "hybrid": {"projector": "vet", "deepstack": {"num_injections": k},
                   "sparsity": {"enabled": True}},
    }[preset]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `override` wins, nested dicts merge key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def model_defaults(preset: str, size: str) -> dict[str, Any]:
    """The fully expanded `model` section for a preset at a size (before user overrides)."""
    spec = _SIZES[size]
    fusion = deep_merge(spec["fusion"], _preset_toggles(preset, spec["_family"]))
    return {"preset": preset, "size": size, "vision": dict(spec["vision"]),
            "llm": dict(spec["llm"]), "fusion": fusion}
