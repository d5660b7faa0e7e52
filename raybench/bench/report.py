"""`raybench bench report`: BENCHMARKS.md rendered from the benchmarks' JSON files.

Every number in the page comes from `<out>/<name>.json`; each benchmark module renders its
own section (`markdown_section(result)`: table, reproduce command, fixed prose on what the
baseline is and what the goal is), and goals are judged met / not met from the numbers.
`validate_result` is the JSON schema every benchmark keeps; `bench all` checks it before
rendering and the quick test checks it too, so a module that drops a key fails loudly.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import shutil
import sys
from pathlib import Path

# Page order; each is `raybench.bench.<name>` writing `<name>.json`.
SECTIONS = ("train", "fsdp", "fusion", "pruning", "seeds", "compile", "serve", "sweep")
TITLES = {"train": "Training", "fusion": "Fusion", "pruning": "Dense->sparse at depth", "seeds": "The seeds' comparison",
          "compile": "torch.compile", "serve": "Serving", "sweep": "Sweeps", "fsdp": "FSDP memory per rank"}
MACHINE_KEYS = ("platform", "python", "torch")
STATS_KEYS = ("median", "min", "max", "samples")

# Per benchmark: keys every result has ("rows[]." = in every row) and the latency/throughput
# figures that must carry median, min, max and the raw samples.
SCHEMA: dict[str, dict[str, list[str]]] = {
    "fusion": {"keys": ["size", "batch", "rows[].preset", "rows[].image_size", "rows[].image_tokens",
                        "rows[].gflops_per_sample", "rows[].peak_rss_growth_mib", "rows[].params_m",
                        "rows[].latency_vs_llava"],
               "stats": ["rows[].latency_ms"]},
    "pruning": {"keys": ["size", "runtime_s", "rows[].schedule", "rows[].batch", "rows[].image_tokens",
                         "rows[].kept_after_stages", "rows[].llm_gflops_per_sample", "rows[].kv_cache_mib",
                         "rows[].peak_rss_growth_mib", "rows[].llm_speedup", "rows[].llm_flops_bound",
                         "rows[].efficiency", "rows[].e2e_speedup", "rows[].kv_vs_dense"],
                "stats": ["rows[].llm_ms", "rows[].e2e_ms"]},
    "compile": {"keys": ["seeds_claim_speedup", "rows[].preset", "rows[].prefill.compile_s",
                         "rows[].prefill.speedup", "rows[].prefill.graph_breaks",
                         "rows[].train_step.compile_s", "rows[].train_step.speedup"],
                "stats": ["rows[].prefill.eager_ms", "rows[].prefill.compiled_ms",
                          "rows[].train_step.eager_ms", "rows[].train_step.compiled_ms"]},
    "seeds": {"keys": ["qtypes", "chance", "rows[].preset", "rows[].accuracy", "rows[].acc",
                       "rows[].params_m", "rows[].gflops_per_sample", "rows[].seeds"],
              "stats": ["rows[].prefill_ms", "rows[].train_samples_per_s"]},
    "train": {"keys": ["matmul_peak_gflops", "step_gflops", "ray_samples_per_s", "torchrun_samples_per_s",
                       "ray_over_torchrun", "mfu_ray", "mfu_torchrun", "ray_windows_samples_per_s",
                       "cpu_cores.ray.workers"],
              "stats": ["ray_samples_per_s_stats"]},
    "sweep": {"keys": ["trials[].trial_id", "trials[].startup_s", "trials[].training_s", "sweep_wall_s",
                       "sum_training_s", "wall_over_training", "empty_trainer.train_fn_entry_s",
                       "empty_trainer.fit_s", "empty_trainer_imports.imported_s", "over_floor_s"],
              "stats": ["startup_s"]},
    "fsdp": {"keys": ["size", "rows[].world", "rows[].rank", "rows[].params_mib", "rows[].grads_mib",
                      "rows[].optimizer_mib", "rows[].state_vs_one", "rows[].peak_rss_mib"]},
    "serve": {"keys": ["goals.pipeline_added_ms_at_c1", "goals.batched_over_unbatched_req_s_at_c32",
                       "goals.decode_batched_over_unbatched_req_s", "goals.decode_llm_median_batch",
                       "rows[].config", "rows[].concurrency", "rows[].p50_ms", "rows[].p99_ms",
                       "rows[].req_per_s", "rows[].errors"],
              "stats": ["rows[].latency_ms"]},
}


MISSING = object()


def _lookup(value, path: str) -> list[tuple[str, object]]:
    """(where, value) for every place a dotted path reaches, MISSING where it breaks off;
    `name[]` fans out over a (non-empty) list."""
    found = [("", value)]
    for part in path.split("."):
        key, nxt = part.removesuffix("[]"), []
        for where, v in found:
            if v is MISSING:
                nxt.append((where, v))
                continue
            here = f"{where}.{key}" if where else key
            v = v.get(key, MISSING) if isinstance(v, dict) else MISSING
            if part.endswith("[]") and v is not MISSING:
                nxt += [(f"{here}[{i}]", item) for i, item in enumerate(v)] if isinstance(v, list) and v \
                    else [(here, MISSING)]
            else:
                nxt.append((here, v))
        found = nxt
    return found


def validate_result(name: str, result: dict) -> list[str]:
    """Schema problems of one benchmark result (empty list: fine). Checks keys, not numbers."""
    errs = []
    if result.get("bench") != name:
        errs.append(f"bench = {result.get('bench')!r}, expected {name!r}")
    if not isinstance(result.get("quick"), bool):
        errs.append("quick: missing or not a bool")
    for key, kind in (("command", str), ("config", dict), ("machine", dict)):
        if not isinstance(result.get(key), kind):
            errs.append(f"{key}: missing or not a {kind.__name__}")
    errs += [f"machine.{k}: missing" for k in MACHINE_KEYS if k not in (result.get("machine") or {})]
    if name == "compile" and result.get("error"):
        return errs  # a recorded failure has no complete rows to check
    spec = SCHEMA.get(name, {})
    for path in spec.get("keys", []):
        errs += [f"{where}: missing" for where, v in _lookup(result, path) if v is MISSING]
    for path in spec.get("stats", []):
        for where, v in _lookup(result, path):
            if not isinstance(v, dict):
                errs.append(f"{where}: missing")
                continue
            errs += [f"{where}.{k}: missing" for k in STATS_KEYS if k not in v]
            if not isinstance(v.get("samples", []), list):
                errs.append(f"{where}.samples: not a list")
    return errs


def check_written(out: Path, name: str, quick: bool | None = None) -> list[str]:
    """Problems with what `bench NAME [--quick] --out OUT` left behind (empty list: fine): its
    JSON's schema, a recorded error, its mode, its plot, its row in results.md."""
    path = out / f"{name}.json"
    if not path.is_file():
        return [f"{path}: missing"]
    result = json.loads(path.read_text())
    errs = validate_result(name, result)
    if result.get("error"):
        errs.append(f"{name}: error recorded: {result['error']}")
    if quick is not None and result.get("quick") is not quick:
        errs.append(f"{name}: quick = {result.get('quick')!r}, expected {quick}")
    plot = out / f"{name}.png"
    if not plot.is_file() or plot.stat().st_size == 0:
        errs.append(f"{plot}: missing or empty")
    table = out / "results.md"
    if f"| {name} (" not in (table.read_text() if table.is_file() else ""):
        errs.append(f"{table}: no row for {name}")
    return errs


# ----------------------------------------------------------------- shared rendering helpers

def claim(ok: bool | None) -> str:
    """A goal's verdict from the numbers (None or a NaN comparison: not measured)."""
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def heading(r: dict, detail: str) -> str:
    quick = "\n\n*Quick run (`--quick`): tiny inputs, few repeats — a smoke figure, noisy.*" if r["quick"] else ""
    return f"## {TITLES[r['bench']]} — `{r['command']}` ({detail}){quick}"


# ----------------------------------------------------------------- loading and the page

def normalize(name: str, r: dict) -> dict:
    """Results written before the common schema (fusion/serve used `benchmark`, train/sweep
    had no `command`): fill the identity fields the renderer needs, nothing else."""
    r = dict(r)
    r.setdefault("bench", r.pop("benchmark", name))
    cmd = r.get("command") or ""
    r.setdefault("quick", "--quick" in cmd)
    if not cmd:
        size = (r.get("config", {}).get("model") or {}).get("size")
        r["command"] = f"raybench bench {name}" + (f" --size {size}" if size and name == "train" else "") \
            + (" --quick" if r["quick"] else "")
    if "config" not in r:
        r["config"] = {k: r[k] for k in ("size", "batch", "repeats", "max_tokens") if k in r}
    return r


def load_results(out: Path) -> dict[str, dict]:
    return {name: normalize(name, json.loads((out / f"{name}.json").read_text()))
            for name in SECTIONS if (out / f"{name}.json").is_file()}


def _intro(results: dict[str, dict]) -> str:
    machines: dict[str, list[str]] = {}
    for name, r in results.items():
        m = r.get("machine", {})
        desc = ", ".join(f"{k} {m[k]}" for k in ("platform", "python", "torch", "ray", "cpus", "memory_gib",
                                                  "gpu", "threads") if m.get(k) is not None)
        machines.setdefault(desc or "not recorded", []).append(name)
    lines = ["# Benchmarks", "",
             "Generated by `raybench bench report` from the JSON files each benchmark writes "
             "(`raybench bench all --out DIR` runs them all and renders this page); do not edit by "
             "hand, re-render. Every figure comes with the command that produced it. Ratios are "
             "against a baseline measured **in the same run** (the reference machine is shared and "
             "noisy); latencies are medians (p50) over repeats after warm-up. Raw samples and "
             "min-max are in each benchmark's JSON next to its PNG.", "", "Machines:"]
    lines += [f"- {', '.join(names)}: {desc}" for desc, names in machines.items()]
    return "\n".join(lines)


def build_markdown(results: dict[str, dict]) -> str:
    parts = [_intro(results)]
    for name in SECTIONS:
        if name in results:
            module = importlib.import_module(f"raybench.bench.{name}")
            parts.append(module.markdown_section(results[name]).rstrip())
        else:
            parts.append(f"## {TITLES[name]} — `raybench bench {name}`\n\nNot in this report: no `{name}.json` in the "
                         f"results directory (run `raybench bench {name} --out DIR`).")
    return "\n\n".join(parts) + "\n"


def check(results: dict[str, dict]) -> list[str]:
    """Schema problems of every result, one line per kind (rows[0..n] folded into rows[])."""
    counts: dict[str, int] = {}
    for name, r in results.items():
        for e in validate_result(name, r):
            key = f"{name}.json: " + re.sub(r"\[\d+\]", "[]", e)
            counts[key] = counts.get(key, 0) + 1
    return [k + (f" ({n} places)" if n > 1 else "") for k, n in counts.items()]


def write_report(out: Path, copy_to: Path | None = None, strict: bool = False) -> int:
    """DIR/BENCHMARKS.md (and a copy, e.g. the repo's BENCHMARKS.md). strict: schema problems
    stop the render (fresh results); otherwise they are warnings (older JSON files)."""
    results = load_results(out)
    if not results:
        print(f"raybench: no benchmark JSON files in {out}", file=sys.stderr)
        return 1
    problems = check(results)
    for p in problems:
        print(f"raybench: schema: {p}", file=sys.stderr)
    if problems and strict:
        print("raybench: benchmark results break the schema; report not written", file=sys.stderr)
        return 1
    page = out / "BENCHMARKS.md"
    page.write_text(build_markdown(results))
    print(f"[bench report] wrote {page} from {', '.join(f'{n}.json' for n in results)}")
    if copy_to is not None:
        shutil.copyfile(page, copy_to)
        print(f"[bench report] copied to {copy_to}")
    return 0


def splice_section(page: Path, heading: str, section: str) -> None:
    """Put one benchmark's rendered section into a page in place of the section whose heading
    starts with `heading` (up to the next `## `), or at the end: a benchmark whose inputs are
    a recording (`bench search`) updates its own section without re-rendering the others."""
    text = page.read_text() if page.is_file() else "# Benchmarks\n"
    start = text.find("\n" + heading)
    if start < 0:
        page.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = text.find("\n## ", start + 1)
    page.write_text(text[:start + 1] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else ""))
    print(f"[bench report] {heading.lstrip('# ')} section written into {page}")


def main(args) -> int:
    copy_to = Path("BENCHMARKS.md") if getattr(args, "write_benchmarks_md", False) else None
    return write_report(Path(args.out), copy_to)
