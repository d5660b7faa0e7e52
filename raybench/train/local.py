"""`raybench train --local`: one process, no Ray - the quickest way to see a model learn."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import torch

from raybench.config import RunConfig, dump_config
from raybench.data.loader import read_split
from raybench.data.prepare import ensure_data, ensure_tokenizer
from raybench.data.processor import VQAProcessor, group_rows, shared_images
from raybench.data.synthetic import scene_targets
from raybench.model.vlm import HybridVLM
from raybench.train import checkpoint as ckpt
from raybench.train.loop import (build_optimizer, build_scheduler, evaluate_counts, format_eval,
                                 merge_counts, pack_correct, train_step)
from raybench.train.stages import SCENE_MODULES, PlannedStage, plan, set_trainable, stage_at
from raybench.train.shared_stage import shared_stage

# `answer` is the last assistant turn: a `scene` stage reads its targets from the captions.
COLUMNS = ["image", "messages", "qtype", "answer"]


def shuffled_batches(table: pa.Table, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless epochs of seeded permutations, `batch_size` rows at a time (drop the tail).
    Consecutive rows about one image (`data.questions_per_image`) move together, so a batch
    holds whole groups (but for the one it is cut through) and encodes each image once."""
    gen = torch.Generator().manual_seed(seed)
    images = table.column("image")
    same = pc.equal(images.slice(1), images.slice(0, len(images) - 1)).to_numpy(zero_copy_only=False)
    first, _ = shared_images(torch.from_numpy(same))
    n = table.num_rows
    while True:
        perm = torch.randperm(len(first), generator=gen)
        # One question per image: the row permutation itself (no per-group work).
        rows = (perm if len(first) == n else group_rows(first, n, perm.tolist())).numpy()
        for start in range(0, n - batch_size + 1, batch_size):
            yield table.take(pa.array(rows[start:start + batch_size])).to_pydict()


def training_batches(stages: list[PlannedStage], tables: dict[str, pa.Table], batch_size: int,
                     seed: int, start: int = 0) -> Iterator[dict]:
    """Each stage's batches in turn, from its own table (`tables[stage.dataset]`), each stage
    its own seeded shuffle starting at its first epoch. `start`: a stage boundary to begin at
    (a run that starts after shared stages draws exactly the batches it would have)."""
    for i, st in enumerate(stages):
        if st.end > start:
            yield from itertools.islice(shuffled_batches(tables[st.dataset], batch_size, seed + i), st.end - st.start)


def val_batches(table: pa.Table, proc: VQAProcessor, batch_size: int) -> list[dict]:
    out = []
    for start in range(0, table.num_rows, batch_size):
        rows = table.slice(start, batch_size).to_pydict()
        batch = proc.collate(rows)
        batch["qtype"] = rows["qtype"]
        out.append(batch)
    return out


def train_local(cfg: RunConfig, log: Callable[[str], None] = print,
                shared_root: Path | None = None) -> dict[str, float]:
    """Train `cfg` in this process; the final model goes to `<run_dir>/model`. With
    `shared_root`, leading `scene` stages are shared as a sweep's trials share them
    (raybench/train/shared_stage.py): the first run with their key saves their end state
    there, a later one starts from it, exactly where it would have been."""
    torch.manual_seed(cfg.train.seed)
    counts = ensure_data(cfg)
    tok = ensure_tokenizer(cfg)
    model = HybridVLM.for_tokenizer(cfg.model, tok)
    proc = VQAProcessor(tok, cfg.model.num_image_tokens, cfg.model.vision.image_size)
    log(f"[raybench] {cfg.model.preset}/{cfg.model.size}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
        f"parameters, {counts['train']} train / {counts['val']} val rows from {cfg.data_path}")

    train = read_split(cfg.data_path, "train", columns=COLUMNS)
    val = read_split(cfg.data_path, "val", columns=COLUMNS).slice(0, cfg.train.eval_samples)
    evals = val_batches(val, proc, cfg.train.batch_size)
    optimizer, t, stages = build_optimizer(model, cfg.train), cfg.train, plan(cfg)
    scheduler = build_scheduler(optimizer, t, stages)
    shared = shared_stage(cfg, shared_root) if shared_root is not None else None
    start = _start_shared(shared, model, optimizer, scheduler, log)
    logs = cfg.run_path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    history = (logs / "train_local.jsonl").open("w")

    metrics: dict[str, float] = {}
    tables = {"train": train, **{st.dataset: read_split(st.data_path, "curriculum", columns=COLUMNS)
                                 for st in stages if st.data is not None and st.end > start}}
    if len(stages) > 1:
        log("[raybench] stages: " + ", ".join(_describe(st, tables) for st in stages if st.end > start))
    batches = training_batches(stages, tables, t.batch_size, t.seed, start)
    window_start, window_samples, losses = time.perf_counter(), 0, []
    stage = None
    for step in range(start + 1, t.steps + 1):
        current = stage_at(stages, step - 1)
        if current is not stage:  # a new stage: its modules learn, the others freeze
            stage = current
            set_trainable(model, stage)
        rows = next(batches)
        batch = proc.collate(rows)
        if stage.objective == "scene":  # the tower learns the scene the caption spells out
            batch["scene_targets"] = torch.tensor([scene_targets(a) for a in rows["answer"]])
        loss = train_step(model, batch, optimizer, scheduler, t.grad_clip)
        losses.append(loss)
        window_samples += t.batch_size
        if shared and step == shared["end"]:
            _save_shared(shared, model, optimizer, cfg.name, log)
        if step % t.eval_every == 0 or step == t.steps:
            rate = window_samples / (time.perf_counter() - window_start)
            metrics = _evaluate(model, evals, [proc.image_token_id, proc.pad_id], history, log, step, t.steps,
                                sum(losses) / len(losses), rate, stage.name, len(stages) > 1)
            window_start, window_samples, losses = time.perf_counter(), 0, []
    history.close()
    out = cfg.run_path / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (cfg.run_path / "config.json").write_text(json.dumps(dump_config(cfg), indent=2))
    log(f"[raybench] model saved to {out} (safetensors + config.json + tokenizer)")
    return metrics


def _start_shared(shared: dict | None, model, optimizer, scheduler, log) -> int:
    """The step this run starts at: the shared stages' end when another run left them, else 0."""
    if not shared or not (Path(shared["path"]) / ckpt.SHARED_READY).is_file():
        return 0
    with warnings.catch_warnings():  # DCP without a process group: "assuming ... a single process", as meant
        warnings.simplefilter("ignore", UserWarning)
        state = ckpt.load_shared(Path(shared["path"]), model, optimizer, scheduler)
    log(f"[raybench] starting at step {state.step}, after stages up to {shared['name']} from {shared['path']}")
    return state.step


def _save_shared(shared: dict, model, optimizer, name: str, log) -> None:
    """Leave the shared stages' end state for later runs: written aside and renamed into
    place, so a reader sees a whole state or none."""
    final = Path(shared["path"])
    if (final / ckpt.SHARED_READY).is_file():
        return
    tmp = final.with_name(f".{final.name}.{name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ckpt.save_shared(tmp, model, optimizer, SCENE_MODULES, 0, {"stage": shared["name"], "step": shared["end"],
                                                                 "trial": name})
    try:
        tmp.rename(final)
        log(f"[raybench] step {shared['end']}: stages up to {shared['name']} saved for later runs at {final}")
    except OSError:  # another run got there first: theirs is the same state
        shutil.rmtree(tmp, ignore_errors=True)


def _evaluate(model, evals, suppressed, history, log, step: int, steps: int, train_loss: float, rate: float,
              stage: str, staged: bool) -> dict[str, float]:
    """One evaluation: logged, and recorded in logs/train_local.jsonl."""
    counts = evaluate_counts(model, evals, suppressed)
    metrics = merge_counts([counts])
    log(format_eval(step, steps, train_loss, metrics, rate) + (f" | {stage}" if staged else ""))
    _record(history, {"step": step, "stage": stage, "train_loss": train_loss, "samples_per_s": rate,
                      **metrics}, counts)
    return metrics


def _record(history, record: dict, counts: dict) -> None:
    """One eval's line in logs/train_local.jsonl, with each val question's outcome (`correct`),
    as the Ray trainer's logs/evals.jsonl has it."""
    history.write(json.dumps({**record, "n": counts["n"], "correct": pack_correct(counts["correct"])}) + "\n")
    history.flush()


def _describe(st: PlannedStage, tables: dict[str, pa.Table]) -> str:
    scale = ",".join(f"{m}x{v:g}" for m, v in st.lr_scale.items() if v != 1)
    return (f"{st.name} (steps {st.start + 1}-{st.end}, training {'+'.join(sorted(st.train))}"
            + (f", lr {scale}" if scale else "") + f", {tables[st.dataset].num_rows} rows)")
