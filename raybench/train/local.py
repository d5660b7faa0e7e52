"""`raybench train --local`: one process, no Ray - the quickest way to see a model learn."""

from __future__ import annotations

import itertools
import json
import time
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
from raybench.train.loop import (build_optimizer, build_scheduler, evaluate_counts, format_eval,
                                 merge_counts, pack_correct, train_step)
from raybench.train.stages import PlannedStage, plan, set_trainable, stage_at

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
                     seed: int) -> Iterator[dict]:
    """Each stage's batches in turn, from its own table (`tables[stage.dataset]`), each stage
    its own seeded shuffle starting at its first epoch."""
    for i, st in enumerate(stages):
        yield from itertools.islice(shuffled_batches(tables[st.dataset], batch_size, seed + i), st.end - st.start)


def val_batches(table: pa.Table, proc: VQAProcessor, batch_size: int) -> list[dict]:
    out = []
    for start in range(0, table.num_rows, batch_size):
        rows = table.slice(start, batch_size).to_pydict()
        batch = proc.collate(rows)
        batch["qtype"] = rows["qtype"]
        out.append(batch)
    return out


def train_local(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, float]:
    torch.manual_seed(cfg.train.seed)
    counts = ensure_data(cfg)
    tok = ensure_tokenizer(cfg)
    model = HybridVLM.for_tokenizer(cfg.model, tok)
    proc = VQAProcessor(tok, cfg.model.num_image_tokens, cfg.model.vision.image_size)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[raybench] {cfg.model.preset}/{cfg.model.size}: {n_params / 1e6:.2f} M parameters, "
        f"{counts['train']} train / {counts['val']} val rows from {cfg.data_path}")

    train = read_split(cfg.data_path, "train", columns=COLUMNS)
    val = read_split(cfg.data_path, "val", columns=COLUMNS).slice(0, cfg.train.eval_samples)
    evals = val_batches(val, proc, cfg.train.batch_size)
    suppressed = [proc.image_token_id, proc.pad_id]
    optimizer, t, stages = build_optimizer(model, cfg.train), cfg.train, plan(cfg)
    scheduler = build_scheduler(optimizer, t, stages)
    logs = cfg.run_path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    history = (logs / "train_local.jsonl").open("w")

    metrics: dict[str, float] = {}
    tables = {"train": train}
    for st in stages:
        if st.data is not None:
            tables[st.dataset] = read_split(st.data_path, "curriculum", columns=COLUMNS)
    if len(stages) > 1:
        log("[raybench] stages: " + ", ".join(_describe(st, tables) for st in stages))
    batches = training_batches(stages, tables, t.batch_size, t.seed)
    window_start, window_samples, losses = time.perf_counter(), 0, []
    stage = None
    for step in range(1, t.steps + 1):
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
        if step % t.eval_every == 0 or step == t.steps:
            rate = window_samples / (time.perf_counter() - window_start)
            counts = evaluate_counts(model, evals, suppressed)
            metrics = merge_counts([counts])
            train_loss = sum(losses) / len(losses)
            log(format_eval(step, t.steps, train_loss, metrics, rate) + (f" | {stage.name}" if len(stages) > 1 else ""))
            _record(history, {"step": step, "stage": stage.name, "train_loss": train_loss, "samples_per_s": rate,
                              **metrics}, counts)
            window_start, window_samples, losses = time.perf_counter(), 0, []
    history.close()

    out = cfg.run_path / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (cfg.run_path / "config.json").write_text(json.dumps(dump_config(cfg), indent=2))
    log(f"[raybench] model saved to {out} (safetensors + config.json + tokenizer)")
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
