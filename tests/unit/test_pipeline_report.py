"""What `raybench pipeline` says at the end: never a dead endpoint presented as live, and the
one command that serves the champion again is a command the CLI accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from raybench.cli import build_parser
from raybench.pipeline import serve_again_command, where_to_look

RUN_DIR = Path("/tmp/runs/smoke")
ENDPOINT = "http://127.0.0.1:8000/v1/chat/completions"


def _result(live: bool) -> dict:
    return {"endpoint": ENDPOINT, "endpoint_live": live, "model_uri": "models:/raybench-vlm@champion",
            "serve_again": serve_again_command("models:/raybench-vlm@champion", RUN_DIR, "jobs/configs/serve.yaml"),
            "model_version": "1", "champion": "t1", "champion_accuracy": 0.5, "question": "q?",
            "answer": "red", "expected": "red"}


def _text(state: str) -> str:
    return where_to_look(_result(state != "stopped"), state, "sqlite:///x.db", "sqlite:///o.db", RUN_DIR)


def test_stopped_says_nothing_runs_and_how_to_serve_again():
    text = _text("stopped")
    assert ENDPOINT not in text and "8265" not in text  # both died with the local Ray
    assert "nothing is running now" in text
    assert f"raybench deploy --model models:/raybench-vlm@champion --run-dir {RUN_DIR}" in text


@pytest.mark.parametrize("state, words", [("kept", "until Ctrl-C"), ("cluster", "after this job ends")])
def test_live_endpoint_says_how_long_it_lives(state, words):
    text = _text(state)
    assert f"endpoint: {ENDPOINT}" in text and words in text and "nothing is running" not in text


def test_serve_again_is_a_valid_deploy_command():
    argv = shlex.split(_result(False)["serve_again"])
    assert argv[0] == "raybench"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.model, args.run_dir, args.config) == (
        "deploy", "models:/raybench-vlm@champion", str(RUN_DIR), "jobs/configs/serve.yaml")
