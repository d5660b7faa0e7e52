"""Staged training (`train.stages`): which modules learn, at what learning rate, by step."""

import re

import pytest
import torch
from safetensors.torch import load_file

from raybench.config import ConfigError, validate_config
from raybench.data.loader import read_split
from raybench.data.processor import VQAProcessor
from raybench.data.synthetic import scene_targets
from raybench.data.tokenizer import load_tokenizer
from raybench.model.vlm import HybridVLM
from raybench.train.local import train_local
from raybench.train.loop import build_optimizer, build_scheduler, lr_factor, train_step
from raybench.train.stages import plan, set_trainable, stage_at


def tiny(tmp_path, stages, steps=6):
    return validate_config({
        "name": "t", "run_dir": str(tmp_path / "run"), "model": {"preset": "hybrid", "size": "tiny"},
        "data": {"num_train": 96, "num_val": 32},
        "train": {"steps": steps, "batch_size": 16, "eval_every": steps, "eval_samples": 32, "warmup_steps": 1,
                  "stages": stages}})


def test_a_frozen_module_keeps_its_weights_and_gets_no_optimizer_state(tmp_path):
    cfg = tiny(tmp_path, [{"name": "align", "train": ["projector", "deepstack"]}])
    train_local(cfg, log=lambda _: None)
    torch.manual_seed(cfg.train.seed)  # train_local's initial weights
    initial = HybridVLM.for_tokenizer(cfg.model, load_tokenizer(cfg.run_path / "model")).state_dict()
    trained = load_file(str(cfg.run_path / "model" / "model.safetensors"))
    changed = {k.split(".")[0] for k, v in trained.items() if not torch.equal(v, initial[k])}
    assert changed == {"projector", "deepstack"}

    # AdamW keeps moments only for what learns: a frozen tower costs no optimizer memory.
    tok = load_tokenizer(cfg.run_path / "model")
    model = HybridVLM.for_tokenizer(cfg.model, tok)
    proc = VQAProcessor(tok, cfg.model.num_image_tokens, cfg.model.vision.image_size)
    batch = proc.collate(read_split(cfg.data_path, "train").slice(0, 8).to_pydict())
    stages = plan(cfg)
    optimizer = build_optimizer(model, cfg.train)
    set_trainable(model, stages[0])
    train_step(model, batch, optimizer, build_scheduler(optimizer, cfg.train, stages), grad_clip=1.0)
    with_state = {g["module"] for g in optimizer.param_groups for p in g["params"] if optimizer.state.get(p)}
    assert with_state == {"projector", "deepstack"}


def test_each_module_learns_at_its_stage_scale_and_a_resumed_schedule_agrees(tmp_path):
    cfg = tiny(tmp_path, [{"name": "align", "steps": 4, "train": ["projector", "llm"], "lr_scale": {"llm": 0.25}},
                          {"name": "tune", "lr_scale": {"vision": 0.5}}], steps=10)
    stages = plan(cfg)
    assert [(s.name, s.start, s.end) for s in stages] == [("align", 0, 4), ("tune", 4, 10)]
    assert stage_at(stages, 3).name == "align" and stage_at(stages, 4).name == "tune"
    model = HybridVLM(cfg.model, vocab_size=64, image_token_id=3, pad_token_id=0, eos_token_id=2)

    def lrs(scheduler):
        return {g["module"]: g["lr"] for g in scheduler.optimizer.param_groups}

    scheduler = build_scheduler(build_optimizer(model, cfg.train), cfg.train, stages)
    seen = []
    for step in range(10):
        seen.append(lrs(scheduler))
        scheduler.optimizer.step()
        scheduler.step()
    base = [cfg.train.lr * lr_factor(s, cfg.train) for s in range(10)]
    assert seen[2] == {"vision": 0.0, "projector": base[2], "deepstack": 0.0, "llm": 0.25 * base[2]}
    assert seen[6] == {"vision": 0.5 * base[6], "projector": base[6], "deepstack": base[6], "llm": base[6]}
    # A run resumed at step 7 (a new optimizer and scheduler loading the saved states, as a
    # checkpoint does) continues identically into the next steps.
    scheduler = build_scheduler(build_optimizer(model, cfg.train), cfg.train, stages)
    for _ in range(7):
        scheduler.optimizer.step()
        scheduler.step()
    again = build_scheduler(build_optimizer(model, cfg.train), cfg.train, stages)
    again.optimizer.load_state_dict(scheduler.optimizer.state_dict())
    again.load_state_dict(scheduler.state_dict())
    assert lrs(again) == seen[7]
    again.optimizer.step()
    again.step()
    assert lrs(again) == seen[8]


def test_a_stage_lr_replaces_train_lr_there_and_keeps_the_schedule_shape(tmp_path):
    cfg = tiny(tmp_path, [{"name": "align", "steps": 4, "train": ["projector", "llm"], "lr": 1e-3,
                           "lr_scale": {"llm": 0.5}}, {"name": "tune"}], steps=10)
    model = HybridVLM(cfg.model, vocab_size=64, image_token_id=3, pad_token_id=0, eos_token_id=2)
    scheduler = build_scheduler(build_optimizer(model, cfg.train), cfg.train, plan(cfg))
    seen = []
    for _ in range(10):
        seen.append({g["module"]: g["lr"] for g in scheduler.optimizer.param_groups})
        scheduler.optimizer.step()
        scheduler.step()
    factor = [lr_factor(s, cfg.train) for s in range(10)]
    assert seen[2]["projector"] == pytest.approx(1e-3 * factor[2]) and seen[2]["vision"] == 0.0
    assert seen[2]["llm"] == pytest.approx(0.5e-3 * factor[2])
    assert seen[6]["projector"] == pytest.approx(cfg.train.lr * factor[6])  # the next stage: train.lr


def test_a_scene_stage_trains_the_tower_directly_and_the_export_drops_its_head(tmp_path):
    cfg = tiny(tmp_path, [{"name": "see", "steps": 3, "objective": "scene", "data": {"num_examples": 48}},
                          {"name": "main"}])
    assert cfg.model.vision.scene_head and cfg.stage_qtypes(cfg.train.stages[0]) == ["describe"]
    lines = []
    train_local(cfg, log=lines.append)
    torch.manual_seed(cfg.train.seed)
    initial = HybridVLM.for_tokenizer(cfg.model, load_tokenizer(cfg.run_path / "model")).state_dict()
    trained = load_file(str(cfg.run_path / "model" / "model.safetensors"))
    assert not any(k.startswith("scene_head.") for k in trained)
    exported = HybridVLM.from_pretrained(cfg.run_path / "model")
    assert exported.scene_head is None and not exported.config.vision.scene_head
    assert {k.split(".")[0] for k, v in trained.items() if not torch.equal(v, initial[k])} == {
        "vision", "projector", "deepstack", "llm"}

    # In the scene stage itself only the tower (and its head) get gradients.
    tok = load_tokenizer(cfg.run_path / "model")
    model = HybridVLM.for_tokenizer(cfg.model, tok)
    proc = VQAProcessor(tok, cfg.model.num_image_tokens, cfg.model.vision.image_size)
    rows = read_split(cfg.stage_path(cfg.train.stages[0]), "curriculum").slice(0, 8).to_pydict()
    assert set(rows["qtype"]) == {"describe"}
    batch = proc.collate(rows)
    batch["scene_targets"] = torch.tensor([scene_targets(a) for a in rows["answer"]])
    stages = plan(cfg)
    optimizer = build_optimizer(model, cfg.train)
    set_trainable(model, stages[0])
    loss = train_step(model, batch, optimizer, build_scheduler(optimizer, cfg.train, stages), grad_clip=1.0)
    assert loss > 0
    with_state = {name.split(".")[0] for name, p in model.named_parameters() if optimizer.state.get(p)}
    assert with_state == {"vision", "scene_head"}


def test_scene_stage_config_errors():
    base = {"model": {"size": "tiny"}, "train": {"steps": 10, "batch_size": 8}}
    for stage, expected in [({"name": "s", "steps": 5, "objective": "scene"}, "train.stages.0.data = None"),
                            ({"name": "s", "steps": 5, "objective": "scene", "train": ["llm"], "data": {}},
                             "train.stages.0.train = ['llm']: a scene stage trains the vision tower"),
                            ({"name": "s", "steps": 5, "objective": "scene", "data": {"qtypes": ["color"]}},
                             "train.stages.0.data.qtypes = ['color']: a scene stage needs [describe]")]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            validate_config({**base, "train": {**base["train"], "stages": [stage, {"name": "main"}]}})


def test_letter_share_names_its_own_scenes_and_needs_describe(tmp_path):
    stage = {"name": "see", "steps": 4, "objective": "scene", "train": ["vision"],
             "data": {"num_examples": 64, "letter_share": 0.5}}
    cfg = validate_config({"run_dir": str(tmp_path), "train": {"steps": 8, "batch_size": 16,
                                                               "stages": [stage, {"name": "main"}]}})
    assert cfg.stage_path(cfg.train.stages[0]).name == "see-4obj-64-describe-letters0.5"
    answer = {**stage, "objective": "answer", "train": ["llm"]}
    with pytest.raises(ConfigError, match=r"train.stages.0.data.letter_share = 0.5: it shapes `describe` scenes"):
        validate_config({"train": {"steps": 8, "batch_size": 16, "stages": [answer, {"name": "main"}]}})
    with pytest.raises(ConfigError, match="letter_share"):
        validate_config({"train": {"steps": 8, "batch_size": 16, "stages": [
            {**stage, "data": {"num_examples": 64, "letter_share": 1.5}}, {"name": "main"}]}})


def test_a_stage_warm_up_ramps_its_modules_from_the_stage_start(tmp_path):
    cfg = tiny(tmp_path, [{"name": "align", "steps": 4, "train": ["projector"]},
                          {"name": "tune", "warmup_steps": 3}], steps=10)
    stages = plan(cfg)
    model = HybridVLM(cfg.model, vocab_size=64, image_token_id=3, pad_token_id=0, eos_token_id=2)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, stages)
    peak = cfg.train.lr
    seen = []
    for step in range(10):
        seen.append({g["module"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    # The first stage has no warm-up of its own: the run's schedule alone.
    assert seen[1]["projector"] == pytest.approx(peak * lr_factor(1, cfg.train))
    # The second ramps 1/3, 2/3, 3/3 of the run's schedule over its first three steps, then follows it.
    for k, step in enumerate(range(4, 8)):
        ramp = min(1.0, (k + 1) / 3)
        assert seen[step]["llm"] == pytest.approx(peak * lr_factor(step, cfg.train) * ramp)
        assert seen[step]["projector"] == pytest.approx(peak * lr_factor(step, cfg.train) * ramp)


def test_a_stage_warm_up_longer_than_the_stage_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.stages\.0\.warmup_steps = 5: longer than the stage \(4 steps\)"):
        tiny(tmp_path, [{"name": "align", "steps": 4, "warmup_steps": 5}, {"name": "tune"}], steps=10)
