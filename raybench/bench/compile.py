"""`raybench bench compile`: `torch.compile` against eager, on the same model and inputs.

Three workloads per preset, each timed eager and compiled in the same run:

    prefill      what `bench fusion` measures: ViT + projection + LLM prefill + the first
                 token (`model.generate(..., max_new_tokens=1)`), compiled as one function
    decode       ms per generated token: `model.decode_step` on the static KV cache
                 (`StaticKVCache`), 8 steps after an untimed prefill, eager vs compiled
    train step   `raybench.train.loop.train_step` (forward + backward + clip + AdamW step)
                 on a compiled copy of the same model (same initial weights, same batch)
    served decode  ms per decode step of the LLM stage's continuous-batching engine
                 (serve/engine.py) with `batch` live rows: eager, against `serve.compile`
                 (the step compiled per batch-size bucket, serve/compiled_decode.py)

The compiled first call (tracing + inductor codegen + the C++ build + one run) is reported
on its own as compile time; latencies are median / min / max over repeats after warm-up,
eager and compiled calls interleaved so the machine's drift hits both alike. HybridVLM's
decoder loop keeps token counts as Python ints and selects tokens with shape-static sorts
and gathers, so prefill is meant to trace as one graph; the graph-break count and reasons
come from Dynamo's own counters (tests/unit/test_graph_breaks.py pins prefill at 0), and
`same_tokens` says whether the compiled prefill chose the eager one's greedy tokens. The
seeds claim ~1.8x for inference; this reports what we get.
"""

from __future__ import annotations

import copy
import logging
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch._inductor.utils import fresh_cache

PRESETS = ("hybrid", "llava")  # the searched family, and plain late fusion for contrast
WORKLOADS = ("prefill", "decode", "train_step", "served_decode")
SEEDS_CLAIM = 1.8  # "Overall inference: 1.8x faster vs eager mode" (docs/architecture.md)
SERVED_GOAL = 0.67  # compiled / eager ms per decode step in the LLM stage (issue 31)


def _cxx() -> str | None:
    """The C++ compiler inductor will call on CPU (its config names one, `g++` by default)."""
    import torch._inductor.config as inductor_config

    name = inductor_config.cpp.cxx[-1] or "g++"
    return shutil.which(name)


def _time_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def compare(eager_fn, compiled_fn, repeats: int, warmup: int) -> dict:
    """First calls (compile time), then interleaved timed repeats of both."""
    from torch._dynamo.utils import counters

    from raybench.bench.common import summarize

    eager_first = _time_ms(eager_fn)
    counters.clear()
    compile_s = _time_ms(compiled_fn) / 1000
    breaks = dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(warmup):
        eager_fn()
        compiled_fn()
    eager, compiled = [], []
    for _ in range(repeats):
        eager.append(_time_ms(eager_fn))
        compiled.append(_time_ms(compiled_fn))
    return {"eager_first_ms": eager_first, "compile_s": compile_s,
            "eager_ms": summarize(eager), "compiled_ms": summarize(compiled),
            "speedup": statistics.median(eager) / statistics.median(compiled),
            "recompiles": counters["stats"]["unique_graphs"] - graphs,
            "graphs": graphs, "graph_breaks": sum(breaks.values()),
            # the first line of each reason is its name ("Data-dependent branching", ...)
            "graph_break_reasons": {k.splitlines()[0][:120]: v for k, v in breaks.items()}}


def _train_batch(model, batch: int) -> dict:
    """fusion's prefill inputs plus labels on the last two tokens (the "answer")."""
    from raybench.cost import probe_inputs

    ids, mask, pixels = probe_inputs(model, batch)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


def bench_prefill(preset: str, size: str, batch: int, repeats: int, warmup: int, backend: str) -> dict:
    from raybench.config import validate_config
    from raybench.cost import probe_inputs, probe_model

    model_cfg = validate_config({"model": {"preset": preset, "size": size}}).model
    image_size = model_cfg.vision.image_size
    model = probe_model(model_cfg)
    ids, mask, pixels = probe_inputs(model, batch)

    def prefill():
        with torch.no_grad():
            return model.generate(ids, mask, pixels, max_new_tokens=1)

    compiled = torch.compile(prefill, backend=backend)
    timing = compare(prefill, compiled, repeats, warmup)
    return {"image_size": image_size, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            **timing, "same_tokens": bool(torch.equal(prefill(), compiled()))}


DECODE_STEPS = 8  # tokens per timed decode run (after an untimed prefill)


def bench_decode(preset: str, size: str, batch: int, repeats: int, warmup: int, backend: str) -> dict:
    """ms per generated token: eager `decode_step` vs a compiled one, both on the static KV
    cache (the growing cache changes shapes every step; a compiled step would recompile)."""
    from raybench.config import validate_config
    from raybench.cost import probe_inputs, probe_model
    from raybench.model.llm import StaticKVCache

    model = probe_model(validate_config({"model": {"preset": preset, "size": size}}).model)
    ids, mask, pixels = probe_inputs(model, batch)
    with torch.no_grad():
        visual, deepstack = model.project(*model.encode_images(pixels))
    compiled = torch.compile(model.decode_step, backend=backend)

    @torch.no_grad()
    def per_token_ms(step) -> float:
        cache = StaticKVCache(len(model.decoder_layers), DECODE_STEPS)
        logits, pos = model.prefill(ids, mask, visual, deepstack, cache)
        token = logits.argmax(-1)
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            token = step(token, pos, cache).argmax(-1)
            cache.advance()
            pos = pos + 1
        return (time.perf_counter() - t0) * 1000 / DECODE_STEPS

    return _interleaved(per_token_ms, model.decode_step, compiled, repeats, warmup)


def bench_served_decode(preset: str, size: str, batch: int, repeats: int, warmup: int, backend: str) -> dict:
    """ms per decode step of the serving engine's pool, `batch` rows: eager vs compiled."""
    from raybench.config import validate_config
    from raybench.cost import probe_inputs, probe_model
    from raybench.serve.compiled_decode import CompiledDecode
    from raybench.serve.engine import DecodeEngine, Row
    from raybench.serve.payloads import GenRequest

    model = probe_model(validate_config({"model": {"preset": preset, "size": size}}).model)
    ids, mask, pixels = probe_inputs(model, batch)
    with torch.no_grad():
        visual, deepstack = model.project(*model.encode_images(pixels))
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    cpu = torch.device("cpu")

    def per_step_ms(engine: DecodeEngine) -> float:
        engine.reset()
        engine.step([Row(GenRequest(p, DECODE_STEPS + 1, ignore_eos=True), visual[i], [d[i] for d in deepstack])
                     for i, p in enumerate(prompts)])  # prefill: untimed
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            engine.step([])
        return (time.perf_counter() - t0) * 1000 / DECODE_STEPS

    return _interleaved(per_step_ms, DecodeEngine(model, cpu),
                        DecodeEngine(model, cpu, compiled=CompiledDecode(model, batch, backend=backend)),
                        repeats, warmup)


def _interleaved(per_step_ms, eager, compiled, repeats: int, warmup: int) -> dict:
    """`per_step_ms(x)` for the eager and the compiled `x`: the compiled first call (compile
    time), then interleaved repeats, as `compare` does for whole calls."""
    from torch._dynamo.utils import counters

    from raybench.bench.common import summarize

    counters.clear()
    t0 = time.perf_counter()
    per_step_ms(compiled)
    compile_s = time.perf_counter() - t0
    breaks, graphs = dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
    for _ in range(warmup):
        per_step_ms(eager)
        per_step_ms(compiled)
    slow, fast = [], []
    for _ in range(repeats):
        slow.append(per_step_ms(eager))
        fast.append(per_step_ms(compiled))
    return {"steps": DECODE_STEPS, "compile_s": compile_s, "eager_ms": summarize(slow),
            "compiled_ms": summarize(fast), "speedup": statistics.median(slow) / statistics.median(fast),
            "graphs": graphs, "graph_breaks": sum(breaks.values()),
            "recompiles": counters["stats"]["unique_graphs"] - graphs,
            "graph_break_reasons": {k.splitlines()[0][:120]: v for k, v in breaks.items()}}


def bench_train_step(preset: str, size: str, batch: int, repeats: int, warmup: int, backend: str) -> dict:
    from raybench.config import TrainConfig, validate_config
    from raybench.model.vlm import HybridVLM
    from raybench.train.loop import build_optimizer, build_scheduler, train_step

    cfg = validate_config({"model": {"preset": preset, "size": size}})
    torch.manual_seed(0)
    eager = HybridVLM(cfg.model, vocab_size=512, image_token_id=3, pad_token_id=0, eos_token_id=2)
    compiled = torch.compile(copy.deepcopy(eager), backend=backend)  # same initial weights
    data = _train_batch(eager, batch)
    t = TrainConfig(steps=10_000, warmup_steps=0)  # a flat LR: the schedule plays no part

    def stepper(model):
        optimizer = build_optimizer(model, t)
        scheduler = build_scheduler(optimizer, t)
        return lambda: train_step(model, data, optimizer, scheduler, t.grad_clip)

    return compare(stepper(eager), stepper(compiled), repeats, warmup)


def run_compile_bench(size: str = "small", quick: bool = False, repeats: int = 7,
                      presets: tuple[str, ...] = PRESETS, backend: str = "inductor") -> dict:
    """`backend="eager"` runs the same code with Dynamo tracing only (no codegen): the
    schema test uses it, as inductor's C++ builds take minutes on 2 cores."""
    batch, warmup = 8, 2
    if quick:
        size, repeats, batch, presets = "tiny", 3, 2, presets[:1]
    result = {"bench": "compile", "quick": quick,
              "command": f"raybench bench compile --size {size}" + (" --quick" if quick else ""),
              "config": {"presets": list(presets), "size": size, "batch": batch, "repeats": repeats,
                         "warmup": warmup, "backend": backend, "mode": "default", "dynamic": False,
                         "cold_cache": True,
                         "torch_threads": torch.get_num_threads()},
              "seeds_claim_speedup": SEEDS_CLAIM, "rows": [], "error": None}
    result["cxx"] = _cxx()
    if backend == "inductor" and result["cxx"] is None:
        result["error"] = ("no C++ compiler on PATH: torch.compile's inductor backend builds C++ "
                           "kernels on CPU (install g++, e.g. `apt-get install g++`)")
        return result
    # Dynamo logs every graph break as a multi-line warning; the counts land in the JSON.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    for preset in presets:
        row = {"preset": preset}
        for name, fn in (("prefill", bench_prefill), ("decode", bench_decode), ("train_step", bench_train_step),
                         ("served_decode", bench_served_decode)):
            torch._dynamo.reset()
            try:
                # A cold compile every time: inductor's on-disk caches (kept across runs in
                # /tmp) would otherwise turn a second run's compile time into a cache lookup.
                with fresh_cache(), warnings.catch_warnings():
                    # AOTAutograd traces backward under anomaly mode; the boolean-mask index_put
                    # in DeepStack's injection trips it (handled) and it prints a scary warning.
                    warnings.filterwarnings("ignore", message="Error detected in", category=UserWarning)
                    row[name] = fn(preset, size, batch, repeats, warmup, backend)
            except Exception as err:  # a compiler failure is a result, not a crash
                first = (str(err).strip().splitlines() or [""])[0]
                result["error"] = f"{preset} {name}: {type(err).__name__}: {first[:300]}"
                result["rows"].append(row)
                return result
            r = row[name]
            print(f"  {preset:>8} {name:<10} eager {r['eager_ms']['median']:8.2f} ms  compiled "
                  f"{r['compiled_ms']['median']:8.2f} ms  = {r['speedup']:.2f}x  (compile "
                  f"{r['compile_s']:.1f} s, {r['graphs']} graphs, {r['graph_breaks']} breaks)", flush=True)
        result["rows"].append(row)
    return result


COMPILE_COLUMNS = {"preset": "preset", "workload": "workload", "eager": "eager ms (median, min-max)",
                   "compiled": "compiled ms (median, min-max)", "speedup": "eager / compiled",
                   "compile_s": "compile s (first call)", "graphs": "graphs", "breaks": "graph breaks"}


def markdown_table(r: dict) -> str:
    from raybench.bench.common import markdown_table as table, spread

    cells = [{"preset": row["preset"], "workload": name.replace("_", " "), "eager": spread(w["eager_ms"]),
              "compiled": spread(w["compiled_ms"]), "speedup": f"**{w['speedup']:.2f}x**",
              "compile_s": f"{w['compile_s']:.1f}", "graphs": w["graphs"], "breaks": w["graph_breaks"]}
             for row in r["rows"] for name, w in ((n, row.get(n)) for n in WORKLOADS) if w]
    return table(cells, COMPILE_COLUMNS)


def markdown_row(r: dict) -> str:
    if r["error"]:
        return f"| compile | failed: {r['error']} |"
    parts = [f"{row['preset']} {name.replace('_', ' ')} {row[name]['speedup']:.2f}x "
             f"(compile {row[name]['compile_s']:.0f} s)"
             for row in r["rows"] for name in WORKLOADS if name in row]
    return f"| compile ({r['config']['size']}, eager/compiled) | " + ", ".join(parts) + " |"


def markdown_section(r: dict) -> str:
    from raybench.bench.report import claim, heading

    c = r["config"]
    head = heading(r, f"{', '.join(c['presets'])} `{c['size']}`, batch {c['batch']}, "
                   f"{c['repeats']} repeats, backend {c['backend']}")
    if r["error"]:
        return f"{head}\n\n**Failed:** {r['error']}\n"
    prefill = [row["prefill"]["speedup"] for row in r["rows"] if "prefill" in row]
    served = [row["served_decode"]["speedup"] for row in r["rows"] if "served_decode" in row]
    text = [head, "", markdown_table(r), "",
            "Eager and compiled run the same model on the same inputs in one process, calls "
            "interleaved; `compile s` is the compiled function's first call (Dynamo tracing, "
            "inductor code generation, the C++ build and one run). Prefill is the function "
            "`bench fusion` times; decode is ms per generated token, `decode_step` on the static "
            "KV cache (fixed-size buffers written in place: the same shapes every step), 8 steps "
            "after an untimed prefill; the train step is `train_step` (forward, backward, clip, "
            "AdamW) on a compiled copy of the model, the optimizer step itself eager. Served "
            "decode is ms per decode step of the LLM stage's continuous-batching engine "
            "(serve/engine.py) with `batch` live rows, eager against `serve.compile` (the step "
            "compiled per batch-size bucket, the pool's key capacity dynamic: "
            "serve/compiled_decode.py).",
            "",
            f"- seeds' claim, inference {r['seeds_claim_speedup']}x faster compiled: measured "
            + ", ".join(f"{s:.2f}x" for s in prefill) + " — "
            + claim(bool(prefill) and min(prefill) >= r["seeds_claim_speedup"]),
            *([f"- serving goal, compiled decode step ≤ {SERVED_GOAL}x eager at batch {c['batch']}: measured "
               + ", ".join(f"{1 / s:.2f}x" for s in served) + " — " + claim(max(1 / s for s in served) <= SERVED_GOAL)]
              if served else []),
            "",
            "Prefill is one graph: the decoder loop keeps token counts as Python ints (from the "
            "embeds' shape and the keep schedule) and selects tokens with shape-static sorts, "
            "gathers and scatters, never `.item()`, `nonzero` or a Python `if` on a tensor "
            "(tests/unit/test_graph_breaks.py holds it at 0). The train step's breaks are the "
            "loss's: it projects only the answer positions onto the vocabulary (a boolean-mask "
            "select whose size depends on the batch), which costs far less than projecting "
            "every position."]
    recompiles = [f"{row['preset']} {row['decode']['recompiles']}" for row in r["rows"] if "decode" in row]
    if recompiles:
        text.append("\nCompiled decode, graphs compiled after its first call (a recompile per step "
                    "would show here): " + ", ".join(recompiles) + ".")
    same = [f"{row['preset']} {row['prefill']['same_tokens']}" for row in r["rows"]
            if "same_tokens" in row.get("prefill", {})]
    if same:
        text.append("\nCompiled prefill chose the same greedy tokens as eager: " + ", ".join(same) + ".")
    reasons: dict[str, int] = {}
    for row in r["rows"]:
        for name in WORKLOADS:
            for k, v in row.get(name, {}).get("graph_break_reasons", {}).items():
                reasons[k] = reasons.get(k, 0) + v
    if reasons:
        text.append("\nBreak reasons (all rows): " + "; ".join(f"{k} x{v}" for k, v in reasons.items()) + ".")
    return "\n".join(text) + "\n"


def _plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in WORKLOADS if any(n in row for row in r["rows"])] or list(WORKLOADS)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [row for row in r["rows"] if name in row]
        for k, mode in enumerate(("eager_ms", "compiled_ms")):
            xs = [i + 0.4 * k for i in range(len(rows))]
            med = [row[name][mode]["median"] for row in rows]
            err = [[m - row[name][mode]["min"] for m, row in zip(med, rows)],
                   [row[name][mode]["max"] - m for m, row in zip(med, rows)]]
            ax.bar(xs, med, 0.4, yerr=err, label=mode.split("_")[0])
        ax.set_xticks([i + 0.2 for i in range(len(rows))])
        ax.set_xticklabels([f"{row['preset']}\n{row[name]['speedup']:.2f}x" for row in rows])
        ax.set_title(f"{name.replace('_', ' ')} (ms, median, min-max)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    from raybench.bench.common import write_result

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_compile_bench(size=args.size, quick=args.quick, repeats=args.repeats)
    write_result(out, "compile", result, markdown_row(result), _plot)
    if result["error"]:
        print(f"raybench: bench compile failed: {result['error']} (recorded in {out / 'compile.json'})",
              file=sys.stderr)
        return 1
    return 0
