"""`raybench probe --model DIR`: linear probes of shape / position / colour at every stage of a
saved model, against the same architecture at random init, plus the readings that usually
explain a from-scratch VLM that answers colour but not shape or position.

A random-init column is the baseline that matters: a random ViT already keeps much of what
the pixels hold, so "0.6 on shape" means nothing until it is compared with what training
added (or destroyed) at the same stage.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from raybench.probe.features import ATTRIBUTES, CLASSES, Extracted, extract, one_object_scenes
from raybench.probe.linear import L2_GRID, prepare, probe_prepared

COLUMNS = ("trained", "random_init")
LABELS = {"shape": "shape", "position": "position", "color": "colour"}


def _random_twin(model, seed: int):
    """The same architecture and token ids, freshly initialised from a fixed seed."""
    from raybench.model.vlm import HybridVLM

    torch.manual_seed(seed)
    # towers: a checkpoint tower's own config (its rows, tying, rope), as the model was loaded.
    return HybridVLM(model.config, vocab_size=model.vocab_size, image_token_id=model.image_token_id,
                     pad_token_id=model.pad_token_id, eos_token_id=model.eos_token_id,
                     towers=model.towers).eval()


def _probe_rows(train: dict[str, Extracted], test: dict[str, Extracted], y_train, y_test,
                pixels: tuple[torch.Tensor, torch.Tensor], n_layers: int, log,
                l2_grid: tuple[float, ...] = L2_GRID) -> list[dict]:
    """One row per feature set: {'features', 'dim', attribute: {column: accuracy}}."""
    def row(name, get, columns):
        out = {"features": name}
        for col in columns:
            shared = get(col, None)  # vision features: one preparation for all three attributes
            prepared = prepare(*shared) if shared is not None else None
            for a in ATTRIBUTES:
                xtr, xte = prepared if prepared is not None else prepare(*get(col, a))
                res = probe_prepared(xtr, y_train[a], xte, y_test[a], len(CLASSES[a]), l2_grid=l2_grid)
                out.setdefault(a, {})[col] = res["accuracy"]
                out.setdefault("l2", {}).setdefault(a, {})[col] = res["l2"]
            out["dim"] = (shared or get(col, ATTRIBUTES[0]))[0].shape[1]
        log(f"[probe] {name}: " + "  ".join(f"{a} {out[a].get('trained', float('nan')):.2f}" for a in ATTRIBUTES))
        return out

    columns = tuple(train)
    # Pixels do not depend on the weights: one probe, reported in both columns.
    rows = [row("pixels (flat)", lambda c, a: pixels, columns[:1])]
    for a in ATTRIBUTES:
        for col in columns[1:]:
            rows[0][a][col] = rows[0][a][columns[0]]
    for key, name in (("vit_flat", "ViT out (flat)"), ("vit_mean", "ViT out (mean-pooled)"),
                      ("proj_flat", "projector/VET out (flat)"), ("proj_mean", "projector/VET out (mean-pooled)")):
        rows.append(row(name, lambda c, a, k=key: (train[c].vision[k], test[c].vision[k]), columns))
    for i in range(n_layers):
        rows.append(row(f"LLM layer {i} (query token)",
                        lambda c, a, i=i: None if a is None else (train[c].llm[a][i], test[c].llm[a][i]),
                        columns))
    return rows


def _readings(ex: Extracted, answers: dict[str, list[str]]) -> dict:
    r = ex.readings
    mean = lambda t: float(t.float().mean())  # noqa: E731
    return {
        "visual_embed_norm": mean(r["visual_embed_norm"]),
        "text_embed_norm": mean(r["text_embed_norm"]),
        "deepstack_norm": [mean(t) for t in r["deepstack_norm"]],
        "visual_hidden_norm": [mean(t) for t in r["visual_norm"]],
        "attention_on_image": [mean(t) for t in r["attn_image"]],
        "image_key_fraction": [mean(t) for t in r["image_keys"]],
        "image_token_fraction": mean(r["image_token_fraction"]),
        "answer_accuracy": {a: sum(p == t for p, t in zip(ex.predictions[a], answers[a])) / len(answers[a])
                            for a in ATTRIBUTES},
    }


def run_probe(model_dir: str | Path, n_train: int = 1800, n_test: int = 600, seed: int = 0,
              random_init: bool = True, batch_size: int = 200, log=print,
              l2_grid: tuple[float, ...] = L2_GRID) -> dict:
    """The probe table's rows and the readings, as one JSON-able dict (see `format_report`).
    `l2_grid`: the penalties tried per probe (tests pass one to stay fast)."""
    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer
    from raybench.model.vlm import HybridVLM

    t0 = time.perf_counter()
    model = HybridVLM.from_pretrained(model_dir)
    proc = VQAProcessor(load_tokenizer(model_dir), model.config.num_image_tokens,
                        model.config.vision.image_size)
    models = {"trained": model}
    if random_init:
        models["random_init"] = _random_twin(model, seed)
    size = model.config.vision.image_size
    scenes_train = one_object_scenes(n_train, size, seed, "train")
    scenes_test = one_object_scenes(n_test, size, seed, "test")
    train = {c: extract(m, proc, scenes_train, batch_size) for c, m in models.items()}
    test = {c: extract(m, proc, scenes_test, batch_size, generate=True) for c, m in models.items()}
    log(f"[probe] features extracted in {time.perf_counter() - t0:.0f} s")
    rows = _probe_rows(train, test, scenes_train.labels, scenes_test.labels,
                       (scenes_train.pixels.flatten(1), scenes_test.pixels.flatten(1)),
                       len(model.decoder_layers), log, l2_grid)
    return {
        "model": str(model_dir), "n_train": n_train, "n_test": n_test, "seed": seed,
        "chance": {a: 1 / len(CLASSES[a]) for a in ATTRIBUTES},
        "rows": rows,
        "readings": {c: _readings(test[c], scenes_test.answers) for c in models},
        "seconds": time.perf_counter() - t0,
    }


def _pair(d: dict, fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(d[c]) for c in COLUMNS if c in d)


def format_report(report: dict) -> str:
    cols = [c for c in COLUMNS if c in report["readings"]]
    head = " / ".join(c.replace("_", "-") for c in cols)
    lines = ["| features | dim | " + " | ".join(f"{LABELS[a]} {head}" for a in ATTRIBUTES) + " |",
             "|---|---:|" + "---:|" * len(ATTRIBUTES),
             "| chance | | " + " | ".join(f"{report['chance'][a]:.2f}" for a in ATTRIBUTES) + " |"]
    for row in report["rows"]:
        lines.append(f"| {row['features']} | {row['dim']} | " + " | ".join(_pair(row[a]) for a in ATTRIBUTES) + " |")
    rd = report["readings"]
    lines += ["", "| reading | " + " | ".join(c.replace("_", "-") for c in cols) + " |",
              "|---|" + "---:|" * len(cols)]

    def add(name, get):
        lines.append(f"| {name} | " + " | ".join(get(rd[c]) for c in cols) + " |")

    add("visual embeds at LLM input, mean L2 norm", lambda r: f"{r['visual_embed_norm']:.2f}")
    add("text token embeds at LLM input, mean L2 norm", lambda r: f"{r['text_embed_norm']:.2f}")
    for k in range(len(rd["trained"]["deepstack_norm"])):
        add(f"DeepStack injection {k} norm (visual hidden norm after layer {k})",
            lambda r, k=k: f"{r['deepstack_norm'][k]:.2f} ({r['visual_hidden_norm'][k]:.2f})")
    for i in range(len(rd["trained"]["attention_on_image"])):
        add(f"query attention on image tokens, layer {i} (image share of keys)",
            lambda r, i=i: f"{r['attention_on_image'][i]:.3f} ({r['image_key_fraction'][i]:.2f})")
    add("image tokens / prompt tokens", lambda r: f"{r['image_token_fraction']:.2f}")
    for a in ATTRIBUTES:
        add(f"greedy answer accuracy, {LABELS[a]}", lambda r, a=a: f"{r['answer_accuracy'][a]:.2f}")
    return "\n".join(lines)


def cmd_probe(args) -> int:
    with torch.no_grad():  # scoped: the CLI runs in-process in tests, beside training
        report = run_probe(args.model, args.n_train, args.n_test, args.seed, args.random_init,
                           args.batch_size, log=lambda m: print(m, file=sys.stderr))
    print(format_report(report))
    print(f"\n({report['seconds']:.0f} s, {args.n_train} train / {args.n_test} test one-object scenes)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
