"""The `raybench` command line. Every command validates its config before doing any work
and writes into the run directory (`runs/<name>` unless `run_dir` says otherwise)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raybench.config import ConfigError, dump_config, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (e.g. jobs/configs/smoke.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=50 (repeatable)")


def _cmd_validate(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(dump_config(cfg), indent=2))
    return 0


def _cmd_data_synth(args) -> int:
    from raybench.data.loader import validate_dataset
    from raybench.data.synthetic import write_synthetic

    from raybench.config import URI

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else cfg.data_path
    if isinstance(out, URI):
        print(f"error: data synth writes to a local directory, not {out}: render it locally "
              "(--out DIR), then copy it there", file=sys.stderr)
        return 2
    write_synthetic(out, num_train=cfg.data.num_train, num_val=cfg.data.num_val,
                    image_size=cfg.image_size, seed=cfg.data.seed, qtypes=cfg.data.qtypes,
                    questions_per_image=cfg.data.questions_per_image, mix=cfg.data.mix)
    print(f"wrote {validate_dataset(out)} rows to {out}")
    return 0


def _cmd_data_import(args) -> int:
    from raybench.data.importer import REPORT_NAME, import_dataset

    report = import_dataset(args.src, args.format, args.out, image_root=args.image_root,
                            strict=args.strict, split=args.split, val_fraction=args.val_fraction,
                            overwrite=args.overwrite,
                            progress=lambda n: print(f"[raybench] {n} records read", file=sys.stderr))
    print(report.summary())
    print(f"report: {Path(args.out) / REPORT_NAME}")
    missing = [s for s in ("train", "val") if not report.rows.get(s)]
    if missing:
        print(f"note: no {' or '.join(missing)} rows (training reads split == 'train', eval 'val')")
    print(f"train on it with --set data.path={args.out}")
    return 0


def _cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.local:
        from raybench.train.local import train_local

        metrics = train_local(cfg)
    else:
        from raybench.train.trainer import fit, model_dir

        result = fit(cfg)
        if result.error:
            print(f"raybench: training failed: {result.error}", file=sys.stderr)
            return 1
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        print(f"[raybench] checkpoints in {result.path}; model in {model_dir(cfg)}")
    print(json.dumps({"final": metrics}, indent=2))
    return 0


def _cmd_eval(args) -> int:
    from raybench.data.loader import read_split
    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer
    from raybench.model.vlm import HybridVLM
    from raybench.train.local import COLUMNS, val_batches
    from raybench.train.loop import evaluate

    cfg = load_config(args.config, args.overrides)
    model = HybridVLM.from_pretrained(args.model)
    proc = VQAProcessor(load_tokenizer(args.model), model.config.num_image_tokens,
                        model.config.vision.image_size)
    val = read_split(cfg.data_path, "val", columns=COLUMNS + ["question"]).slice(0, cfg.train.eval_samples)
    metrics = evaluate(model, val_batches(val, proc, cfg.train.batch_size), [proc.image_token_id, proc.pad_id])
    if "acc/followup" in metrics:  # conversations: also answered as served, own answers in the history
        from raybench.data.chat_eval import served_turn_accuracy

        metrics.update(served_turn_accuracy(model, proc, val.column("image").to_pylist(),
                                            val.column("messages").to_pylist()))
    if args.by_objects:
        metrics["scenes"] = _scene_report(model, proc, val.to_pydict(), cfg)
    print(json.dumps(metrics, indent=2))
    return 0


def _scene_report(model, proc, rows: dict, cfg) -> dict:
    """Greedy answers (as served) to the validation rows, split by what the scene holds."""
    from raybench.data.scene_eval import format_report, greedy_scene_report

    report = greedy_scene_report(model, proc, rows, cfg.data.seed, cfg.image_size, cfg.train.batch_size)
    print(format_report(report), file=sys.stderr)  # stdout stays one JSON document
    return report


def _cmd_ask(args) -> int:
    import torch

    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer
    from raybench.model.vlm import HybridVLM

    from raybench.data.conversation import conversation_errors, one_turn

    if args.messages:
        messages = json.loads(Path(args.messages).read_text())
        errors = conversation_errors(messages, for_training=False)
        if errors:
            print(f"error: {args.messages}: {'; '.join(errors)}", file=sys.stderr)
            return 2
    else:
        messages = one_turn(args.question)
    model = HybridVLM.from_pretrained(args.model)
    tok = load_tokenizer(args.model)
    proc = VQAProcessor(tok, model.config.num_image_tokens, model.config.vision.image_size)
    prompt = proc.encode_prompt_conversations([messages])
    if args.print_ids:
        print(json.dumps(prompt["input_ids"][0].tolist()))
    pixels = proc.pixel_values([Path(args.image).read_bytes()])
    with torch.no_grad():
        out = model.generate(prompt["input_ids"], prompt["attention_mask"], pixels,
                             max_new_tokens=args.max_tokens)
    print(proc.decode_answer(out[0].tolist()))
    return 0


# Each benchmark is a module `raybench.bench.<name>` with `main(args) -> int`; `report`
# renders BENCHMARKS.md from their JSON files and `all` runs every benchmark, then `report`.
BENCHMARKS = ("fusion", "pruning", "train", "fsdp", "sweep", "serve", "compile", "seeds")


def _cmd_bench(args) -> int:
    import importlib

    names = BENCHMARKS if args.which == "all" else (args.which,)
    if args.size == "gpu" and args.which != "pruning":
        raise ConfigError("bench --size gpu: only `bench pruning` measures the gpu architecture "
                          "(with --random-init); the others run CPU-sized models (tiny, small)")
    rc = 0
    for name in names:
        # pruning measures the gpu architecture (random weights: costs do not depend on them),
        # each repeat a full prefill of a 28-layer LLM: fewer repeats
        pruning = name == "pruning"
        bench_args = argparse.Namespace(**{**vars(args), "size": args.size or ("gpu" if pruning else "small"),
                                           "repeats": args.repeats or (3 if pruning else 7),
                                           "random_init": args.random_init or args.which == "all"})
        try:
            module = importlib.import_module(f"raybench.bench.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"raybench.bench.{name}":
                raise
            if args.which != "all":
                raise ConfigError(f"bench {name!r} is not in this build yet") from None
            continue
        rc = module.main(bench_args) or rc
    if args.which == "all":
        from raybench.bench.report import write_report

        # strict: results this run just wrote must keep the schema, or the page is not written
        copy_to = Path("BENCHMARKS.md") if args.write_benchmarks_md else None
        rc = write_report(Path(args.out), copy_to, strict=True) or rc
    return rc


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (ratios measured in the same run)")
    p.add_argument("which", choices=[*BENCHMARKS, "curves", "search", "report", "all"],
                   help="report: render DIR/BENCHMARKS.md from the JSON files already in --out; "
                        "curves (hours, resumable, not in `all`): learning curves of the default's space; "
                        "search: schedulers replayed on those curves (no training)")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--size", default=None, choices=["tiny", "small", "gpu"],
                   help="model size (default: small; pruning: gpu)")
    p.add_argument("--random-init", action="store_true",
                   help="pruning: the size's architecture with random weights, no checkpoint needed")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 7; pruning: 3)")
    p.add_argument("--quick", action="store_true", help="fewer repeats, tiny inputs (a minute or two)")
    p.add_argument("--steps", type=int, default=None,
                   help="seeds: training steps per preset (default: jobs/configs/default.yaml's train.steps)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds / curves: train every preset / config on this many seeds (train.seed 0..N-1; "
                        "default: 2; seeds --quick 1)")
    p.add_argument("--units", default=None,
                   help="curves / search / seeds: where each finished (config, seed) / (preset, seed, mix) unit "
                        "is stored and found again (default: the checkout's benchmarks/curves or benchmarks/seeds; "
                        "--quick: OUT/curves/units-quick or OUT/seeds/units-quick)")
    p.add_argument("--presets", nargs="+", default=None,
                   help="seeds: record and render only these presets and variants (default: all, --quick: the presets; names in raybench/bench/seeds.py MODELS)")
    p.add_argument("--mixes", nargs="+", default=None,
                   help="seeds: data mixes (names in raybench/bench/seeds.py MIXES; default: all of them, --quick: default)")
    p.add_argument("--max-units", type=int, default=None,
                   help="seeds: train at most N units not yet recorded, then render what is there "
                        "(0: render only; a session's worth at a time)")
    p.add_argument("--configs", nargs="+", default=None,
                   help="curves: record only these configs (names in raybench/bench/curves.py)")
    p.add_argument("--write-benchmarks-md", action="store_true",
                   help="all / report: also copy the rendered page over ./BENCHMARKS.md; seeds / search / fsdp / pruning / serve: "
                        "write their section into it (the others kept)")
    p.set_defaults(fn=_cmd_bench)


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="render the synthetic VQA set to Parquet")
    _add_config_args(p)
    p.add_argument("--out", help="output directory (default: <run_dir>/data)")
    p.set_defaults(fn=_cmd_data_synth)

    p = data.add_parser("import", help="import a conversation dataset (messages / sharegpt / llava; "
                                       "JSON, JSONL or Parquet) as raybench Parquet")
    p.add_argument("src", metavar="SRC", help="a .json (list of records), .jsonl or .parquet file")
    p.add_argument("--format", required=True, choices=("messages", "sharegpt", "llava"))
    p.add_argument("--out", required=True, help="output directory (must be empty, or --overwrite)")
    p.add_argument("--image-root", help="where relative image paths resolve (default: SRC's directory)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (default: "
                   "skip bad records and report them by number)")
    p.add_argument("--split", help="split for records without their own (default: a stable hash of "
                   "the image picks train or val)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of images hashed to val when neither record nor --split says (default 0.1)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous import in --out")
    p.set_defaults(fn=_cmd_data_import)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raybench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate a config and print it fully expanded")
    _add_config_args(p)
    p.set_defaults(fn=_cmd_validate)

    _add_data_parser(sub)

    p = sub.add_parser("train", help="train a model (Ray Train workers under FSDP2; --local: one process)")
    _add_config_args(p)
    p.add_argument("--local", action="store_true", help="single process, no Ray")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("eval", help="validation loss and accuracy per qtype of a saved model")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="model directory (safetensors + config.json)")
    p.add_argument("--by-objects", action="store_true",
                   help="synthetic data: right / another object's attribute / neither, and accuracy "
                        "by object count, per question type (greedy answers)")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("ask", help="answer a question about an image with a saved model")
    p.add_argument("--model", required=True, help="model directory (safetensors + config.json)")
    p.add_argument("--image", required=True)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--question", help="one question (a one-turn conversation)")
    q.add_argument("--messages", metavar="FILE", help="a conversation as JSON: [{role, content}, ...] "
                   "(optional system first, user / assistant alternating, ending with the user's question)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--print-ids", action="store_true", help="print the prompt's token ids (JSON) before the answer")
    p.set_defaults(fn=_cmd_ask)

    _add_bench_parser(sub)

    # Commands that live with their subsystem register themselves.
    from raybench.serve.cli import register as register_serve
    from raybench.tune.cli import register as register_sweep

    from raybench.pipeline import register as register_pipeline
    from raybench.probe.cli import register as register_probe

    register_sweep(sub)
    register_serve(sub)
    register_pipeline(sub)
    register_probe(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"raybench: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # data errors are user errors too: no traceback for those
        from raybench.data.loader import DataError
        if isinstance(err, DataError):
            print(f"raybench: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
