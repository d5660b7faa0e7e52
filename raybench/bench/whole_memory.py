"""Whole-process peak memory of one prefill: the memory claim measured whole.

`bench pruning`'s RSS column is the growth during the LLM prefill alone; the seeds' "-40%
memory" is about what serving a model takes, weights and vision tower included. Each
schedule runs in a fresh interpreter (a peak cannot be reset in one): build the model, run one
end-to-end prefill (ViT, projection, LLM with pruning), report the process's peak RSS
(`ru_maxrss`) after the build and after the prefill.

    python -m raybench.bench.whole_memory --size gpu --tokens 576 --batch 4 --schedule pyramiddrop --random-init
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def whole_process_peak(size: str, tokens: int, batch: int, schedule: str, random_init: bool) -> dict:
    """{build_peak_mib, peak_mib, prefill_added_mib} of a fresh process running one prefill."""
    cmd = [sys.executable, "-m", "raybench.bench.whole_memory", "--size", size, "--tokens", str(tokens),
           "--batch", str(batch), "--schedule", schedule] + (["--random-init"] if random_init else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--schedule", required=True, help="dense, or a name in bench pruning's schedules()")
    p.add_argument("--random-init", action="store_true")
    args = p.parse_args()

    import torch

    from raybench.bench.pruning import Prefill, build, schedules
    from raybench.model.config import SparsityConfig

    model = build(args.size, args.tokens, args.random_init).requires_grad_(False)
    sp = SparsityConfig() if args.schedule == "dense" else schedules(len(model.decoder_layers))[args.schedule]
    model.set_pruning(sp)
    run = Prefill(model, args.batch)
    built = _peak_mib()
    with torch.no_grad():
        run.llm(run.visual())
    peak = _peak_mib()
    print(json.dumps({"schedule": args.schedule, "batch": args.batch, "image_tokens": args.tokens,
                      "build_peak_mib": built, "peak_mib": peak, "prefill_added_mib": peak - built}))


if __name__ == "__main__":
    main()
