"""Single-process training, the CLI around it, and the distributed trainer's input checks
(which must fail before Ray starts a single process)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from raybench.cli import main
from raybench.config import ConfigError, validate_config
from raybench.data.loader import DataError
from raybench.model.vlm import HybridVLM
from raybench.train.local import train_local
from raybench.train.trainer import fit


def tiny(tmp_path, **sections):
    raw = {"name": "t", "run_dir": str(tmp_path / "run"), "model": {"preset": "hybrid", "size": "tiny"},
           "data": {"num_train": 96, "num_val": 32},
           "train": {"steps": 6, "batch_size": 16, "eval_every": 3, "eval_samples": 32, "warmup_steps": 1}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate_config(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 6-step local run, shared by the tests that read what it leaves behind."""
    cfg = tiny(tmp_path_factory.mktemp("local"))
    lines = []
    metrics = train_local(cfg, log=lines.append)
    return cfg, metrics, lines


def test_local_training_writes_a_loadable_model_and_history(trained):
    cfg, metrics, lines = trained
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "acc/glyph" in metrics
    assert sum(line.startswith("step") for line in lines) == 2
    history = [json.loads(x) for x in (cfg.run_path / "logs" / "train_local.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 6]
    model = HybridVLM.from_pretrained(cfg.run_path / "model")
    assert model.config.fusion == cfg.model.fusion and model.config.vision == cfg.model.vision
    assert (cfg.run_path / "model" / "tokenizer.json").exists()
    assert (cfg.run_path / "data" / "train.parquet").exists()


def test_each_stage_reads_its_own_data_and_trains_only_its_modules(tmp_path):
    from raybench.data.loader import read_split
    from raybench.train.local import training_batches
    from raybench.train.stages import plan

    stages = [{"name": "easy", "steps": 3, "train": ["projector", "llm"], "data": {"num_examples": 48, "max_objects": 1}},
              {"name": "main"}]
    cfg = tiny(tmp_path, train={"stages": stages})
    lines = []
    train_local(cfg, log=lines.append)
    assert any("easy (steps 1-3, training llm+projector, 48 rows)" in line for line in lines), lines
    planned = plan(cfg)
    cur = read_split(planned[0].data_path, "curriculum")
    train = read_split(cfg.data_path, "train")
    batches = training_batches(planned, {"train": train, "stage-easy": cur}, 16, 0)
    first = [next(batches) for _ in range(5)]
    cur_q, train_q = set(cur["question"].to_pylist()), set(train["question"].to_pylist())
    for batch in first[:3]:  # 48 rows, 16 a batch: the stage's scenes, one full epoch
        assert set(batch["question"]) <= cur_q and batch["split"] == ["curriculum"] * 16
    assert sorted(q for b in first[:3] for q in b["question"]) == sorted(cur["question"].to_pylist())
    for batch in first[3:]:
        assert batch["split"] == ["train"] * 16 and set(batch["question"]) <= train_q


def test_ask_answers_from_a_saved_model(trained, tmp_path, capsys):
    """`raybench ask` loads a saved model directory and prints its greedy answer.

    The 6-step model answers every question with <eos> alone (a blank answer would pass any
    comparison), so the directory holds an untrained model of the same config and tokenizer:
    its random weights answer with real tokens."""
    import torch

    from raybench.data.loader import read_split
    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer

    cfg = trained[0]
    model_dir = tmp_path / "untrained"
    tok = load_tokenizer(cfg.run_path / "model")
    torch.manual_seed(0)
    HybridVLM.for_tokenizer(cfg.model, tok).save_pretrained(model_dir)
    tok.save_pretrained(str(model_dir))
    image = tmp_path / "x.png"
    image.write_bytes(read_split(cfg.data_path, "val").column("image")[0].as_py())
    question = "what color is the background?"
    capsys.readouterr()
    assert main(["ask", "--model", str(model_dir), "--image", str(image), "--question", question,
                 "--max-tokens", "4"]) == 0
    answer = capsys.readouterr().out.strip()

    model = HybridVLM.from_pretrained(model_dir)
    proc = VQAProcessor(tok, model.config.num_image_tokens, model.config.vision.image_size)
    prompt = proc.encode_prompts([question])
    with torch.no_grad():
        ids = model.generate(prompt["input_ids"], prompt["attention_mask"], proc.pixel_values([image.read_bytes()]),
                             max_new_tokens=4)[0].tolist()
    assert answer == proc.decode_answer(ids) != ""
    assert "<image>" not in answer and "<pad>" not in answer


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    code = main(["validate", "--set", "model.fusion.sparsity.final_keep_ratio=2"])
    assert code == 2
    assert "final_keep_ratio = 2" in capsys.readouterr().err


def test_distributed_input_errors_fail_before_ray_starts(tmp_path):
    ray.shutdown()
    with pytest.raises(DataError, match="does not exist|not found|no such"):
        fit(tiny(tmp_path, data={"path": str(tmp_path / "missing")}))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({c: pa.array([], pa.binary() if c == "image" else pa.string())
                             for c in ("image", "question", "answer", "qtype", "split")}), empty)
    with pytest.raises(DataError, match="empty|no rows|0 rows"):
        fit(tiny(tmp_path, data={"path": str(empty)}))
    with pytest.raises(ConfigError, match="train.batch_size = 1: smaller than train.num_workers = 2"):
        fit(tiny(tmp_path, train={"batch_size": 1, "num_workers": 2}))
    assert not ray.is_initialized()


def test_a_run_dir_rendered_for_other_data_is_refused(tmp_path):
    """An older config's synthetic data in the run dir is not trained on silently."""
    from raybench.data.prepare import ensure_data

    assert ensure_data(tiny(tmp_path)) == {"train": 96, "val": 32}
    with pytest.raises(DataError, match=r"holds \{'train': 96, 'val': 32\} rows but data asks for "
                                        r"\{'train': 200, 'val': 32\}"):
        ensure_data(tiny(tmp_path, data={"num_train": 200}))
    # Pointing data.path at it is a deliberate choice: accepted as it is.
    assert ensure_data(tiny(tmp_path, data={"num_train": 200, "path": str(tmp_path / "run" / "data")}))["train"] == 96
