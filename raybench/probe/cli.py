"""`raybench probe`'s arguments. Kept apart from `run.py` so that `raybench --help` and every
other command start without importing torch and the model code."""

from __future__ import annotations

import argparse


def _cmd_probe(args) -> int:
    from raybench.probe.run import cmd_probe

    return cmd_probe(args)


def register(sub) -> None:
    p = sub.add_parser("probe", help="linear probes of shape / position / colour at every stage of a "
                                     "saved model vs the same architecture at random init, plus readings")
    p.add_argument("--model", required=True, help="model directory (safetensors + config.json + tokenizer)")
    p.add_argument("--random-init", action=argparse.BooleanOptionalAction, default=True,
                   help="also probe the same architecture at random init, seeded by --seed (default: on)")
    p.add_argument("--n-train", type=int, default=1800, help="one-object scenes to fit the probes on")
    p.add_argument("--n-test", type=int, default=600, help="disjoint one-object scenes to score them on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--json", help="write the whole report (rows, readings, chosen L2) to this file")
    p.set_defaults(fn=_cmd_probe)
