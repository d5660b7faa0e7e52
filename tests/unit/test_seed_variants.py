"""The research notes' own variants as options beside the defaults: DeepStack through the VET,
interior (Qwen3-VL) tap placement, and the notes' sparsity schedules (`quadratic`, `dense`).
Each builds, trains a step with gradients reaching its parameters, and generates with the KV
cache exactly as with full recompute; bad values fail validation with the field named."""

import math

import pytest
import torch

from raybench.config import ConfigError, validate_config
from raybench.model.sparsity import keep_counts, keep_ratios
from raybench.model.vlm import HybridVLM
from test_model import BOS, EOS, IMG, PAD, VOCAB, batch

# Every new option on its own, and all together. vision.num_layers 4: room for interior taps.
VARIANTS = {
    "through_vet": {"deepstack": {"through_vet": True}},
    "interior": {"deepstack": {"tap_placement": "interior"}},
    "quadratic": {"sparsity": {"schedule": "quadratic"}},
    "dense": {"sparsity": {"schedule": "dense"}},
    "all": {"deepstack": {"through_vet": True, "tap_placement": "interior"},
            "sparsity": {"schedule": "quadratic"}},
}


def model_config(preset: str = "hybrid", vision_layers: int = 4, **fusion):
    return validate_config({"model": {"preset": preset, "size": "tiny", "vision": {"num_layers": vision_layers},
                                      "fusion": fusion}}).model


def build(cfg) -> HybridVLM:
    torch.manual_seed(0)
    return HybridVLM(cfg, vocab_size=VOCAB, image_token_id=IMG, pad_token_id=PAD, eos_token_id=EOS)


def left_padded_prompts(model: HybridVLM, lengths=(6, 3, 4)):
    """As test_model's KV-cache test: prompts of different lengths, left-padded."""
    g = torch.Generator().manual_seed(1)
    n = model.config.num_image_tokens
    ids = torch.full((len(lengths), 1 + n + max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for i, q in enumerate(lengths):
        row = [BOS] + [IMG] * n + torch.randint(5, VOCAB, (q,), generator=g).tolist()
        ids[i, -len(row):] = torch.tensor(row)
        mask[i, -len(row):] = 1
    return ids, mask


# ---------------------------------------------------------------- each variant, whole

@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_a_step_with_gradients_on_its_parameters(variant):
    model = build(model_config(**VARIANTS[variant]))
    ids, mask, px, labels = batch(model, b=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(ids, mask, px, labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    ds = [(n, p) for n, p in model.named_parameters() if n.startswith("deepstack.")]
    assert ds and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in ds), \
        [n for n, p in ds if p.grad is None or not p.grad.abs().sum() > 0]
    assert model.projector.vte.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_kv_cache_greedy_equals_full_recompute(variant):
    model = build(model_config(**VARIANTS[variant])).eval()
    _, _, px, _ = batch(model, b=3)
    ids, mask = left_padded_prompts(model)
    cached = model.generate(ids, mask, px, max_new_tokens=6)
    recomputed = model.generate(ids, mask, px, max_new_tokens=6, use_cache=False)
    static = model.generate(ids, mask, px, max_new_tokens=6, static_cache=True)
    assert cached.shape[1] >= 1
    assert torch.equal(cached, recomputed) and torch.equal(static, cached)


# ---------------------------------------------------------------- DeepStack through the VET

def test_through_vet_taps_are_rows_of_the_shared_table():
    # A hard tokenizer at eval: every tap embed at a patch position is exactly one table row,
    # the table the main projector reads; the indicator positions receive nothing.
    cfg = model_config(vet={"tokenize_function": "st_argmax"}, deepstack={"through_vet": True})
    model = build(cfg).eval()
    _, _, px, _ = batch(model, b=2)
    with torch.no_grad():
        visual, taps = model.project(*model.encode_images(px))
    table = model.projector.vte.weight
    assert len(taps) == len(model.deepstack_visual_indexes) == 2
    for e in taps:
        assert e.shape == visual.shape
        assert torch.equal(e[:, 0], torch.zeros_like(e[:, 0])) and torch.equal(e[:, -1], torch.zeros_like(e[:, -1]))
        # Straight-through one-hots are 1 up to rounding (hard - soft + soft).
        atoms = e[:, 1:-1].reshape(-1, e.shape[-1])
        nearest = table[torch.cdist(atoms, table).argmin(1)]
        torch.testing.assert_close(atoms, nearest, rtol=1e-5, atol=1e-6)


def test_through_vet_replaces_the_mergers_and_only_then_adds_parameters():
    names = {n for n, _ in build(model_config()).named_parameters()}
    vet = {n for n, _ in build(model_config(deepstack={"through_vet": True})).named_parameters()}
    assert not any("visual_heads" in n for n in names)
    assert any(n.startswith("deepstack.deepstack_merger_list.") for n in names)
    assert {n for n in vet if n.startswith("deepstack.")} == {
        f"deepstack.visual_heads.{k}.{p}" for k in range(2)
        for p in ("head_linear.weight", "head_norm.weight", "head_norm.bias")}
    rest = lambda ns: {n for n in ns if not n.startswith("deepstack.")}  # noqa: E731
    assert rest(names) == rest(vet)


def test_through_vet_trains_sharded_per_block_as_unsharded(one_rank):
    # The taps' lookup runs inside the projector's forward, so a per-block shard of the
    # projector has its table gathered for them (a lookup from outside would see a shard).
    import copy

    from raybench.train.parallel import mixed_precision, parallelize
    plain = build(model_config(deepstack={"through_vet": True}))
    data = batch(plain, b=3)
    sharded = parallelize(copy.deepcopy(plain), one_rank, mixed_precision("cpu"), wrap="block")
    losses = []
    for model in (plain, sharded):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            loss = model(*data).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[2:] == pytest.approx(losses[:2], rel=1e-5)


def test_through_vet_round_trips_through_save_and_load(tmp_path):
    model = build(model_config(deepstack={"through_vet": True})).eval()
    ids, mask, px, labels = batch(model, b=2)
    loaded = HybridVLM.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.config.fusion.deepstack.through_vet
    with torch.no_grad():
        assert torch.equal(model(ids, mask, px, labels).loss, loaded(ids, mask, px, labels).loss)


# ---------------------------------------------------------------- tap placement

def test_default_placement_is_first_to_last():
    assert validate_config({}).model.deepstack_visual_indexes == [0, 2, 3]  # small hybrid
    assert validate_config({"model": {"size": "gpu"}}).model.deepstack_visual_indexes == [0, 6, 11]


@pytest.mark.parametrize("depth,k,expected", [(24, 3, [5, 11, 17]), (4, 3, [0, 1, 2]), (12, 3, [2, 5, 8]),
                                              (4, 1, [1]), (2, 1, [0])])
def test_interior_taps(depth, k, expected):
    cfg = validate_config({"model": {"size": "small", "vision": {"num_layers": depth},
                                     "fusion": {"deepstack": {"num_injections": k,
                                                              "tap_placement": "interior"}}}}).model
    assert cfg.deepstack_visual_indexes == expected  # (24, 3): Qwen3-VL-4B's


def test_interior_taps_are_distinct_and_never_the_last_block():
    for depth in range(2, 33):
        for k in range(1, depth):
            taps = validate_config({"model": {
                "size": "tiny", "vision": {"num_layers": depth}, "llm": {"num_layers": 32},
                "fusion": {"deepstack": {"num_injections": k, "tap_placement": "interior"}}}}
            ).model.deepstack_visual_indexes
            assert len(set(taps)) == k and taps == sorted(taps) and 0 <= taps[0] and taps[-1] <= depth - 2


def test_interior_placement_taps_other_blocks_with_the_same_parameters():
    spread, interior = build(model_config()), build(model_config(deepstack={"tap_placement": "interior"}))
    assert spread.deepstack_visual_indexes == [0, 3] and interior.deepstack_visual_indexes == [0, 2]
    assert [n for n, _ in spread.named_parameters()] == [n for n, _ in interior.named_parameters()]


# ---------------------------------------------------------------- the notes' schedules

def test_notes_schedules():
    r, s = 0.25, 3
    for got, want in zip(keep_ratios("quadratic", r, s), [1 - 0.75 / 9, 1 - 0.75 * 4 / 9, 0.25]):
        assert math.isclose(got, want)
    assert keep_ratios("dense", r, s) == [1.0, 1.0, 1.0]
    # The notes' exponential keeps more early than ours (PyramidDrop's geometric one).
    assert all(q > e for q, e in zip(keep_ratios("quadratic", r, s)[:-1], keep_ratios("exponential", r, s)[:-1]))
    assert keep_counts(64, "quadratic", r, s) == [59, 43, 16]
    assert keep_counts(64, "dense", r, s) == [64, 64, 64]


def test_dense_schedule_prunes_nothing():
    model = build(model_config(sparsity={"schedule": "dense"}))
    n = model.config.num_image_tokens
    assert model.stage_keep == [n] * len(model.stage_layers)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("model,needle", [
    ({"preset": "deepstack", "fusion": {"deepstack": {"through_vet": True}}},
     "model.fusion.deepstack.through_vet = true: the taps go through the main projector's Visual "
     "Embedding Table, so it needs projector vet (got 'mlp'"),
    ({"vision": {"num_layers": 2}, "fusion": {"deepstack": {"tap_placement": "interior"}}},
     "model.fusion.deepstack.num_injections = 2: interior taps leave the last ViT block to the main "
     "projector, so at most model.vision.num_layers - 1 = 1"),
    ({"fusion": {"deepstack": {"tap_placement": "interior", "visual_indexes": [0, 1]}}},
     "model.fusion.deepstack.tap_placement = 'interior': visual_indexes = [0, 1] already places the taps"),
    ({"fusion": {"deepstack": {"tap_placement": "middle"}}}, "model.fusion.deepstack.tap_placement"),
    ({"fusion": {"deepstack": {"through_vet": "sometimes"}}}, "model.fusion.deepstack.through_vet"),
    ({"fusion": {"sparsity": {"schedule": "cubic"}}}, "model.fusion.sparsity.schedule"),
])
def test_bad_values_fail_with_the_field_named(model, needle):
    with pytest.raises(ConfigError) as err:
        validate_config({"model": {"size": "tiny", **model}})
    assert needle in str(err.value), str(err.value)


def test_bad_schedule_lists_the_new_names():
    with pytest.raises(ConfigError) as err:
        validate_config({"model": {"fusion": {"sparsity": {"schedule": "cubic"}}}})
    assert "quadratic" in str(err.value) and "dense" in str(err.value)
