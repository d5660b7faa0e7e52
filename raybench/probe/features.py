"""Frozen features and readings of a HybridVLM on one-object synthetic scenes.

Everything goes through the model's own stages (`encode_images`, `project`,
`_prefill_state` + `run_decoder`, `generate_from_visual`) with hooks on the decoder layers,
so pruning and DeepStack act exactly as in evaluation and serving: nothing is re-implemented.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

import torch

from raybench.data.loader import decode_images
from raybench.data.processor import VQAProcessor
from raybench.data.synthetic import COLORS, POSITIONS, SHAPES, render_scene, sample_scene
from raybench.model.sparsity import visual_relevance
from raybench.model.vlm import HybridVLM

# The generator's question types whose answer is one attribute of the single object; each
# one's question names the *other* attributes ("what shape is red?"), never its own, so the
# query token cannot read the label off the text.
CLASSES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "position": POSITIONS, "color": tuple(COLORS)}
ATTRIBUTES = tuple(CLASSES)


@dataclass
class ProbeScenes:
    pixels: torch.Tensor                      # [N, 3, H, W] as the model sees them
    questions: dict[str, list[str]]           # per attribute, the generator's question
    answers: dict[str, list[str]]
    labels: dict[str, torch.Tensor]           # per attribute, class index [N]


def one_object_scenes(n: int, image_size: int, seed: int, split: str) -> ProbeScenes:
    """`n` one-object scenes; `split` names a separate random stream, so train and test
    scenes are disjoint draws (and none is a training-set image: another stream prefix)."""
    pngs: list[bytes] = []
    questions = {a: [] for a in ATTRIBUTES}
    answers = {a: [] for a in ATTRIBUTES}
    labels = {a: [] for a in ATTRIBUTES}
    for i in range(n):
        key = f"raybench-probe:{seed}:{split}:{i}"
        drawn = {a: sample_scene(random.Random(key), a, max_objects=1) for a in ATTRIBUTES}
        scene = drawn["shape"][0]
        # With one object the three question types consume the stream identically, so one
        # scene gets all three of the generator's own questions.
        if any(s != scene for s, _, _ in drawn.values()):
            raise RuntimeError("sample_scene drew different scenes per question type for one object")
        obj = scene.objects[0]
        label = {"shape": SHAPES.index(obj.shape), "position": obj.cell, "color": list(COLORS).index(obj.color)}
        for a, (_, q, ans) in drawn.items():
            assert ans == CLASSES[a][label[a]], (a, ans, label[a])  # label from the scene = answer
            questions[a].append(q)
            answers[a].append(ans)
            labels[a].append(label[a])
        buf = io.BytesIO()
        render_scene(scene, image_size).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    # PNG bytes through the loader's decode: the exact pixels training and serving use.
    return ProbeScenes(decode_images(pngs, image_size), questions, answers,
                       {a: torch.tensor(v) for a, v in labels.items()})


@dataclass
class Extracted:
    vision: dict[str, torch.Tensor] = field(default_factory=dict)          # name -> [N, D]
    llm: dict[str, list[torch.Tensor]] = field(default_factory=dict)       # attribute -> per layer [N, D]
    readings: dict[str, list] = field(default_factory=dict)                # name -> per-sample values
    predictions: dict[str, list[str]] = field(default_factory=dict)        # attribute -> greedy answers


class _DecoderTap:
    """Hooks on every decoder layer, reading the live `DecoderState` that `run_decoder`
    mutates in place: before layer i, the query token's attention over the (already pruned)
    image tokens with layer i's own q/k (`visual_relevance`: input norm, q/k norm, RoPE,
    causal and padding masks, mean over heads); after it, the query token's hidden state and
    the norm of the visual hidden states (what a DeepStack injection is added to)."""

    def __init__(self, model: HybridVLM):
        self.state = None
        self.rows: dict[str, list[list[torch.Tensor]]] = {}
        n = len(model.decoder_layers)
        for key in ("attn_image", "image_keys", "query", "visual_norm"):
            self.rows[key] = [[] for _ in range(n)]
        self.handles = []
        for i, layer in enumerate(model.decoder_layers):
            self.handles.append(layer.register_forward_pre_hook(self._before(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._after(i), with_kwargs=True))

    def _before(self, i):
        def hook(module, args, kwargs):
            s = self.state
            if s is None:  # not a probed prefill (greedy generation runs through the layers too)
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            vis = s.visual_pos_masks
            mass = visual_relevance(module, hidden, kwargs["position_embeddings"],
                                    s.query_mask.float().argmax(1), s.key_valid, s.visual_positions()).sum(-1)
            self.rows["attn_image"][i].append(mass)
            # What uniform attention would give: the image share of the keys the query sees.
            self.rows["image_keys"][i].append((vis & s.key_valid).sum(1) / s.key_valid.sum(1))
        return hook

    def _after(self, i):
        def hook(module, args, kwargs, output):
            s = self.state
            if s is None:
                return
            h = output[0] if isinstance(output, tuple) else output
            self.rows["query"][i].append(h[s.query_mask])
            b = h.shape[0]
            self.rows["visual_norm"][i].append(h[s.visual_pos_masks].norm(dim=-1).view(b, -1).mean(1))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _mean_row_norm(x: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean L2 norm of the non-zero rows of [B, N, D] (DeepStack pads the
    VET's indicator positions with zero rows that receive nothing)."""
    norms = x.norm(dim=-1)
    real = norms > 0
    return (norms * real).sum(1) / real.sum(1).clamp(min=1)


@torch.no_grad()
def extract(model: HybridVLM, proc: VQAProcessor, scenes: ProbeScenes, batch_size: int = 200,
            generate: bool = False) -> Extracted:
    """Features at every stage, the readings, and (`generate`) greedy answers, batch by batch."""
    model.eval()
    out = Extracted()
    vision = {"vit_flat": [], "vit_mean": [], "proj_flat": [], "proj_mean": []}
    r = {k: [] for k in ("visual_embed_norm", "text_embed_norm", "image_token_fraction")}
    n_ds = len(model.deepstack_visual_indexes) if model.deepstack is not None else 0
    ds_norms = [[] for _ in range(n_ds)]
    taps = {a: _DecoderTap(model) for a in ATTRIBUTES}
    preds = {a: [] for a in ATTRIBUTES}
    embed = model.llm.get_input_embeddings()
    try:
        for start in range(0, len(scenes.pixels), batch_size):
            sl = slice(start, start + batch_size)
            patches, vit_taps = model.encode_images(scenes.pixels[sl])
            visual, deepstack = model.project(patches, vit_taps)
            vision["vit_flat"].append(patches.flatten(1))
            vision["vit_mean"].append(patches.mean(1))
            vision["proj_flat"].append(visual.flatten(1))
            vision["proj_mean"].append(visual.mean(1))
            r["visual_embed_norm"].append(visual.norm(dim=-1).mean(1))
            for k, e in enumerate(deepstack):
                ds_norms[k].append(_mean_row_norm(e))
            for a in ATTRIBUTES:
                # The prompt exactly as generation builds it: left-padded, query = last column.
                prompt = proc.encode_prompts(scenes.questions[a][sl])
                ids, mask = prompt["input_ids"], prompt["attention_mask"]
                text = mask.bool() & (ids != model.image_token_id)
                norms = embed(ids).norm(dim=-1)
                r["text_embed_norm"].append((norms * text).sum(1) / text.sum(1))
                r["image_token_fraction"].append((ids == model.image_token_id).sum(1) / mask.sum(1))
                query = torch.full((ids.shape[0],), ids.shape[1] - 1)
                tap = taps[a]
                tap.state = model._prefill_state(ids, mask, visual, deepstack, query)
                model.run_decoder(tap.state)
                tap.state = None
                if generate:
                    new = model.generate_from_visual(ids, mask, visual, deepstack, max_new_tokens=4)
                    preds[a] += [proc.decode_answer(t.tolist()) for t in new]
    finally:
        for tap in taps.values():
            tap.remove()
    out.vision = {k: torch.cat(v) for k, v in vision.items()}
    out.llm = {a: [torch.cat(rows) for rows in taps[a].rows["query"]] for a in ATTRIBUTES}
    n_layers = len(model.decoder_layers)
    out.readings = {k: torch.cat(v) for k, v in r.items()}
    out.readings["deepstack_norm"] = [torch.cat(v) for v in ds_norms]
    for key in ("attn_image", "image_keys", "visual_norm"):
        out.readings[key] = [torch.cat([c for a in ATTRIBUTES for c in taps[a].rows[key][i]])
                             for i in range(n_layers)]
    if generate:
        out.predictions = preds
    return out
