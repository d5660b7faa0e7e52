"""`raybench bench fusion`: what each fusion preset costs at inference, on the same input.

For every preset (and image size): prefill latency (ViT + projection + LLM prefill + the
first token, i.e. what a served request waits before its first token), FLOPs per sample
(torch's FlopCounterMode: matmuls, convs, attention) and the process's peak-RSS growth
during prefill (Linux VmHWM, reset through /proc/self/clear_refs). Latencies are medians
over repeats after warm-up; ratios are against `llava` measured in the same run, and
dense->sparse is also compared with the identical model with sparsity switched off.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from raybench.bench.common import peak_rss_growth_mib, timed_ms, markdown_table as table, spread, summarize, write_result
from raybench.config import validate_config
from raybench.cost import PROMPT_TEXT_TOKENS, gflops_per_sample, prefill_fn, probe_model
from raybench.model.presets import PRESETS
from raybench.model.vlm import HybridVLM

def _build(preset: str, size: str, image_size: int, sparsity: bool | None = None) -> HybridVLM:
    model: dict = {"preset": preset, "size": size, "vision": {"image_size": image_size}}
    if sparsity is not None:
        model["fusion"] = {"sparsity": {"enabled": sparsity}}
    return probe_model(validate_config({"model": model}).model)


def measure(model: HybridVLM, batch: int, repeats: int, warmup: int = 2) -> dict:
    prefill = prefill_fn(model, batch)
    samples = timed_ms(prefill, repeats, warmup)
    flops = gflops_per_sample(prefill, batch)
    mem = [peak_rss_growth_mib(prefill) for _ in range(3)]
    return {"latency_ms": summarize(samples),
            "gflops_per_sample": flops,
            "peak_rss_growth_mib": statistics.median(mem),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "image_tokens": model.config.num_image_tokens,
            "kept_after_stages": model.stage_keep}


def run_fusion_bench(out_dir: Path, size: str = "small", quick: bool = False, repeats: int = 7,
                     image_sizes: list[int] | None = None, batch: int = 8) -> dict:
    torch.manual_seed(0)
    if quick:
        size, repeats, image_sizes, batch = "tiny", 3, [32], 2
    image_sizes = image_sizes or [64, 256]
    rows = []
    for image_size in image_sizes:
        variants = [(p, None) for p in PRESETS] + [("dense_sparse", False), ("hybrid", False)]
        for preset, sparsity in variants:
            name = preset if sparsity is None else f"{preset}-nosparse"
            result = measure(_build(preset, size, image_size, sparsity), batch, repeats)
            rows.append({"preset": name, "image_size": image_size, **result})
            print(f"  {name:>18} @ {image_size}px: {result['latency_ms']['median']:8.2f} ms  "
                  f"{result['gflops_per_sample']:7.3f} GFLOP/sample  "
                  f"{result['peak_rss_growth_mib']:7.1f} MiB", flush=True)
    _add_ratios(rows)
    report = {"bench": "fusion", "quick": quick, "size": size, "batch": batch, "repeats": repeats,
              "command": f"raybench bench fusion --size {size}" + (" --quick" if quick else ""),
              "config": {"size": size, "batch": batch, "repeats": repeats, "image_sizes": image_sizes,
                         "prompt_text_tokens": PROMPT_TEXT_TOKENS},
              "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out_dir / "fusion.md").write_text(table + "\n")
    write_result(out_dir, "fusion", report, markdown_row(report), lambda r, path: _plot(r["rows"], path))
    print(table)
    return report


def markdown_row(r: dict) -> str:
    big = max(row["image_size"] for row in r["rows"])
    at = {row["preset"]: row for row in r["rows"] if row["image_size"] == big}
    return (f"| fusion ({r['size']}, {big}px) | prefill ms " + ", ".join(
        f"{p} {row['latency_ms']['median']:.1f}" for p, row in at.items() if p in PRESETS) + " |")


def _add_ratios(rows: list[dict]) -> None:
    by_key = {(r["preset"], r["image_size"]): r for r in rows}
    for r in rows:
        base = by_key[("llava", r["image_size"])]
        r["latency_vs_llava"] = r["latency_ms"]["median"] / base["latency_ms"]["median"]
        r["flops_vs_llava"] = r["gflops_per_sample"] / base["gflops_per_sample"]
        dense = by_key.get((r["preset"] + "-nosparse", r["image_size"]))
        if dense:  # the same model with sparsity off: the seeds' "2-3x faster, -40% memory" claim
            r["speedup_vs_dense"] = dense["latency_ms"]["median"] / r["latency_ms"]["median"]
            r["flops_vs_dense"] = r["gflops_per_sample"] / dense["gflops_per_sample"]
            r["memory_vs_dense"] = r["peak_rss_growth_mib"] / max(dense["peak_rss_growth_mib"], 1e-9)


FUSION_COLUMNS = {"preset": "preset", "image_size": "image px", "image_tokens": "image tokens",
                  "latency": "prefill ms (median, min-max)", "vs_llava": "vs llava", "gflops": "GFLOP/sample",
                  "rss": "peak RSS growth MiB", "sparse": "sparse vs dense (speed-up / FLOPs / memory)"}


def markdown_table(rows: list[dict]) -> str:
    cells = [{"preset": r["preset"], "image_size": r["image_size"], "image_tokens": r["image_tokens"],
              "latency": spread(r["latency_ms"]), "vs_llava": f"{r['latency_vs_llava']:.2f}",
              "gflops": f"{r['gflops_per_sample']:.3f}", "rss": f"{r['peak_rss_growth_mib']:.1f}",
              "sparse": (f"{r['speedup_vs_dense']:.2f}x / {r['flops_vs_dense']:.2f} / {r['memory_vs_dense']:.2f}"
                         if "speedup_vs_dense" in r else "")} for r in rows]
    return table(cells, FUSION_COLUMNS)


def markdown_section(r: dict) -> str:
    from raybench.bench.report import claim, heading
    from raybench.model.presets import model_defaults

    head = heading(r, f"size `{r['size']}`, batch {r['batch']}, {r['repeats']} "
                   "repeats; prefill = ViT + projection + LLM prefill + first token")
    lines = [head, "", markdown_table(r["rows"]), "",
             "`vs llava` is prefill latency against `llava` at the same image size; the last column is "
             "the same model with sparsity switched off vs on: speed-up (dense ms / sparse ms), FLOPs "
             "ratio, peak-RSS ratio (sparse / dense).", "",
             "The seeds claim dense->sparse is **2-3x faster with 40% less memory** than dense fusion "
             "(claim met here if >= 2x and peak RSS <= 0.6x):"]
    for row in r["rows"]:
        if "speedup_vs_dense" in row:
            ok = row["speedup_vs_dense"] >= 2 and row["memory_vs_dense"] <= 0.6
            lines.append(f"- {row['preset']} at {row['image_size']} px ({row['image_tokens']} visual tokens, "
                         f"kept {row.get('kept_after_stages')}): {row['speedup_vs_dense']:.2f}x, FLOPs "
                         f"x{row['flops_vs_dense']:.2f}, peak RSS x{row['memory_vs_dense']:.2f} — {claim(ok)}")
    m = model_defaults("dense_sparse", r["size"])
    lines += ["", f"Why our regime differs from the seeds': the `{r['size']}` LLM has {m['llm']['num_layers']} "
              f"layers and pruning ends stages after layers {m['fusion']['sparsity']['stage_layers']}, so the "
              "first layers always see every token, and the ViT (unchanged by pruning) is a large share of "
              "prefill; with few visual tokens the text dominates and scoring can cost more than it saves. "
              "The seeds' regime is long visual sequences in deep LLMs. Accuracy of the same presets is in "
              "the seeds' comparison below."]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["image_size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, s in zip(axes[0], sizes):
        sel = [r for r in rows if r["image_size"] == s]
        ax.bar([r["preset"] for r in sel], [r["latency_ms"]["median"] for r in sel],
               yerr=[[r["latency_ms"]["median"] - r["latency_ms"]["min"] for r in sel],
                     [r["latency_ms"]["max"] - r["latency_ms"]["median"] for r in sel]])
        ax.set_title(f"prefill latency, {s}px images")
        ax.set_ylabel("ms (median, min-max)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    run_fusion_bench(out_dir=Path(args.out), size=args.size, quick=args.quick, repeats=args.repeats)
    return 0

