"""Accuracy x prefill cost at each keep ratio, on one trained model's own weights.

The dense->sparse claim is "2-3x faster, -40% memory, preserves accuracy". Speed at depth is
`bench pruning`'s; what pruning costs in accuracy needs a model that sees. A trained model
with pruning on is evaluated again with its schedule ending at each keep ratio
(`HybridVLM.set_pruning`: the same weights, only how many visual tokens survive each stage
changes), on every validation question, and its prefill timed as `bench fusion` times it:
the Pareto curve of accuracy against prefill cost, 1.0 (nothing pruned) included.
"""

from __future__ import annotations

KEEP_RATIOS = (1.0, 0.75, 0.5, 0.25, 0.125)


def keep_curve(model, cfg, batch: int, repeats: int, ratios=KEEP_RATIOS) -> list[dict]:
    """[{keep, accuracy, acc per qtype, kept tokens per stage, prefill ms, GFLOP/sample}] for
    each ratio, the model's own schedule and stage layers; the model is left as trained."""
    from raybench.bench.fusion import measure
    from raybench.data.loader import read_split
    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer
    from raybench.train.local import COLUMNS, val_batches
    from raybench.train.loop import evaluate_counts, merge_counts

    trained = model.config.fusion.sparsity
    tok = load_tokenizer(cfg.run_path / "model")
    proc = VQAProcessor(tok, cfg.model.num_image_tokens, cfg.model.vision.image_size)
    val = read_split(cfg.data_path, "val", columns=COLUMNS)
    evals = val_batches(val, proc, cfg.train.batch_size)
    out = []
    try:
        for keep in ratios:
            model.set_pruning(trained.model_copy(update={"final_keep_ratio": keep}))
            metrics = merge_counts([evaluate_counts(model, evals, [proc.image_token_id, proc.pad_id])])
            cost = measure(model, batch, repeats)
            out.append({"keep": keep, "trained_keep": trained.final_keep_ratio, "accuracy": metrics["accuracy"],
                        "acc": {k[4:]: v for k, v in metrics.items() if k.startswith("acc/")},
                        "kept_after_stages": list(model.stage_keep), "prefill_ms": cost["latency_ms"],
                        "gflops_per_sample": cost["gflops_per_sample"]})
    finally:
        model.set_pruning(trained)
    return out
