"""A sweep's leading scene stages, run once (raybench/train/shared_stage.py): the key says when
two trials' stages would not differ, and a trial started from the saved end state is exactly
where it would have been had it trained the stages itself (one gloo rank, FSDP2, in process)."""

import json

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from raybench.config import validate_config
from raybench.data.synthetic import SCENE_CLASSES
from raybench.model.vlm import HybridVLM
from raybench.train import checkpoint as ckpt
from raybench.train.loop import build_optimizer, build_scheduler, train_step
from raybench.train.parallel import mixed_precision, parallelize
from raybench.train.stages import SCENE_MODULES, plan, set_trainable, stage_at
from raybench.train.shared_stage import shared_stage, stage_key

VOCAB, PAD, EOS, IMG = 60, 0, 2, 3
SEE = {"name": "see", "steps": 2, "objective": "scene", "train": ["vision"], "lr": 5e-3,
       "data": {"num_examples": 16}}


def config(vocab_size=64, lr=1e-2, see=None, **train):
    return validate_config({
        "name": "t", "model": {"preset": "hybrid", "size": "tiny", "fusion": {"vet": {"vocab_size": vocab_size}}},
        "train": {"steps": 5, "batch_size": 4, "lr": lr, "warmup_steps": 1,
                  "stages": [see or SEE, {"name": "main"}], **train}})


def test_the_key_ignores_the_llm_side_and_a_stage_owned_lr_and_nothing_else(tmp_path):
    base = stage_key(config(), 1)
    assert stage_key(config(vocab_size=128, lr=3e-3, eval_every=7), 1) == base
    assert stage_key(validate_config({**config().model_dump(mode="json"), "name": "other",
                                      "run_dir": str(tmp_path)}), 1) == base
    # What the tower's steps read: its own lr, its seed, its data, its shape, the schedule.
    assert stage_key(config(see={**SEE, "lr": 1e-3}), 1) != base
    assert stage_key(config(seed=1), 1) != base
    assert stage_key(config(see={**SEE, "data": {"num_examples": 32}}), 1) != base
    assert stage_key(config(steps=6), 1) != base  # the cosine's length
    changed = config().model_dump(mode="json")
    changed["model"]["vision"]["stem"] = "conv"
    assert stage_key(validate_config(changed), 1) != base
    # Without a stage lr of its own, the stage runs at train.lr, which then counts.
    plain = {k: v for k, v in SEE.items() if k != "lr"}
    assert stage_key(config(see=plain, lr=3e-3), 1) != stage_key(config(see=plain), 1)

    where = shared_stage(config(), tmp_path)
    assert where["name"] == "see" and where["end"] == 2 and where["path"].endswith(f"see-{base}")
    answer_first = {**SEE, "objective": "answer", "train": ["vision", "llm"], "data": None}
    assert shared_stage(config(see=answer_first), tmp_path) is None  # an answer stage depends on everything


def _batches(cfg, n: int = 5, b: int = 4):
    torch.manual_seed(123)
    model_cfg = cfg.model
    k, size = model_cfg.num_image_tokens, model_cfg.vision.image_size
    out = []
    for _ in range(n):
        ids = torch.cat([torch.full((b, 1), 1), torch.full((b, k), IMG), torch.randint(5, VOCAB, (b, 5)),
                         torch.full((b, 1), EOS)], 1)
        labels = torch.full_like(ids, -100)
        labels[:, -3:] = ids[:, -3:]
        n_bg, n_shape, n_color = SCENE_CLASSES
        targets = torch.cat([torch.randint(0, n_bg, (b, 1)), torch.randint(0, n_shape, (b, 4)),
                             torch.randint(0, n_color, (b, 4))], 1)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "pixel_values": torch.randn(b, 3, size, size), "labels": labels, "scene_targets": targets})
    return out


class Run:
    """What a Ray Train worker holds, on one rank: model, optimizer, schedule, plan."""

    def __init__(self, cfg, mesh):
        torch.manual_seed(cfg.train.seed)
        model = HybridVLM(cfg.model, vocab_size=VOCAB, image_token_id=IMG, pad_token_id=PAD, eos_token_id=EOS)
        self.model = parallelize(model, mesh, mixed_precision("cpu"), wrap="root")
        self.stages = plan(cfg)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.stages)

    def train(self, batches, start: int, end: int) -> None:
        for step in range(start, end):
            stage = stage_at(self.stages, step)
            set_trainable(self.model, stage)
            batch = dict(batches[step])
            if stage.objective != "scene":
                batch.pop("scene_targets")
            train_step(self.model, batch, self.optimizer, self.scheduler, grad_clip=1.0)

    def weights(self) -> dict[str, torch.Tensor]:
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return {k: v.clone() for k, v in full.items()}  # on one rank: views of the live weights

    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


def test_a_trial_started_from_the_shared_stage_is_where_running_it_would_have_left_it(one_rank, tmp_path):
    a_cfg = config()
    data = _batches(a_cfg)
    a = Run(a_cfg, one_rank)
    a.train(data, 0, 2)
    ckpt.save_shared(tmp_path / "see", a.model, a.optimizer, SCENE_MODULES, 0, {"stage": "see", "step": 2})
    at_end = a.weights()
    a.train(data, 2, 5)

    # The same config started from the saved state: bit for bit what training on gives,
    # which needs the tower's AdamW moments and the schedule's step back too.
    again = Run(a_cfg, one_rank)
    assert ckpt.load_shared(tmp_path / "see", again.model, again.optimizer, again.scheduler).step == 2
    again.train(data, 2, 5)
    assert again.lrs() == a.lrs()
    for k, v in a.weights().items():
        assert torch.equal(again.weights()[k], v), k

    # Another trial: a bigger visual vocabulary (other projector shapes) and its own train.lr.
    b_cfg = config(vocab_size=128, lr=3e-3)
    assert stage_key(b_cfg, 1) == stage_key(a_cfg, 1)
    own = Run(b_cfg, one_rank)
    initial = own.weights()
    own.train(data, 0, 2)
    b = Run(b_cfg, one_rank)
    ckpt.load_shared(tmp_path / "see", b.model, b.optimizer, b.scheduler)
    loaded = b.weights()
    for k, v in own.weights().items():
        if k.split(".")[0] in SCENE_MODULES:  # the tower it would have trained itself
            assert torch.equal(loaded[k], v) and torch.equal(loaded[k], at_end[k]), k
        else:  # its own LLM side, as initialised (the stage never ran it)
            assert torch.equal(loaded[k], initial[k]), k
    assert b.lrs() == own.lrs()  # from its own train.lr at step 2
    b.train(data, 2, 5)
    own.train(data, 2, 5)
    for k, v in own.weights().items():
        assert torch.equal(b.weights()[k], v), k


def _local(tmp_path, name: str, preset: str):
    return validate_config({
        "name": name, "run_dir": str(tmp_path / name), "model": {"preset": preset, "size": "tiny"},
        "data": {"num_train": 96, "num_val": 32, "path": str(tmp_path / "data")},
        "train": {"steps": 5, "batch_size": 8, "eval_every": 5, "eval_samples": 32, "warmup_steps": 1,
                  "stages": [{**SEE, "data": {"num_examples": 32, "path": str(tmp_path / "see")}}, {"name": "main"}]}})


def test_in_process_runs_share_the_scene_stage_and_end_where_their_own_would(tmp_path):
    from safetensors.torch import load_file

    from raybench.train.local import train_local

    def weights(cfg):
        return load_file(str(cfg.run_path / "model" / "model.safetensors"))

    from raybench.data.synthetic import write_curriculum, write_synthetic

    root, lines = tmp_path / "shared", []
    first = _local(tmp_path, "first", "hybrid")
    write_synthetic(tmp_path / "data", num_train=96, num_val=32, image_size=first.image_size, seed=0)
    write_curriculum(tmp_path / "see", 32, image_size=first.image_size, seed=0, qtypes=["describe"], name="see")
    train_local(first, log=lines.append, shared_root=root)
    assert any("saved for later runs" in x for x in lines)
    # Another preset (another LLM side) starts after the stage the first run left ...
    lines.clear()
    later = _local(tmp_path, "later", "llava")
    train_local(later, log=lines.append, shared_root=root)
    assert any("starting at step 2" in x for x in lines)
    history = (later.run_path / "logs" / "train_local.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in history] == [5]
    # ... and ends bit for bit where training the stage itself leaves it.
    alone = _local(tmp_path, "alone", "llava")
    train_local(alone, log=lambda _: None)
    mine = weights(later)
    for k, v in weights(alone).items():
        assert torch.equal(mine[k], v), k
