"""An imported conversation set trains like the synthetic one: `raybench data import` of the
digits example, `train --local` with `--set data.path=DIR`, and `raybench eval` reporting
first turns and follow-ups, teacher-forced and as served (the model's own answers in the
history)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from raybench.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    try:
        import make_digits
    finally:
        sys.path.pop(0)
    assert make_digits.main(["--out", str(tmp / "src"), "--limit", "120"]) == 0
    assert main(["data", "import", "--format", "llava", str(tmp / "src" / "digits.json"),
                 "--out", str(tmp / "data"), "--val-fraction", "0.25"]) == 0
    return tmp


def test_train_local_on_an_imported_conversation_set_and_eval_it_turn_by_turn(digits, capsys):
    overrides = [f"run_dir={digits / 'run'}", f"data.path={digits / 'data'}", "model.size=tiny",
                 "train.steps=4", "train.batch_size=16", "train.eval_every=2", "train.eval_samples=24",
                 "train.warmup_steps=1"]
    args = [x for o in overrides for x in ("--set", o)]
    assert main(["train", "--local", "--config", str(ROOT / "jobs/configs/smoke.yaml"), *args]) == 0
    history = [json.loads(line) for line in (digits / "run" / "logs" / "train_local.jsonl").read_text().splitlines()]
    evals = [h for h in history if "acc/turn1" in h]
    assert evals and all("acc/followup" in h for h in evals)
    capsys.readouterr()
    assert main(["eval", "--config", str(ROOT / "jobs/configs/smoke.yaml"), *args,
                 "--model", str(digits / "run" / "model")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # A first turn has no history: greedy decoding and the teacher-forced match agree on it.
    assert metrics["served/turn1"] == pytest.approx(metrics["acc/turn1"])
    assert 0.0 <= metrics["served/followup"] <= 1.0 and "served/conversation" in metrics
    # No qtype in the data: no per-type figures, only overall and per turn.
    assert not [k for k in metrics if k.startswith("acc/") and k not in ("acc/turn1", "acc/followup")]
