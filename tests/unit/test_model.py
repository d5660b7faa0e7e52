"""HybridVLM behaviour: VET, DeepStack, pruning, KV-cache generation, training, save/load."""

import pytest
import torch
from torch import nn

from raybench.config import validate_config
from raybench.model.deepstack import deepstack_process
from raybench.model.presets import PRESETS
from raybench.model.sparsity import keep_counts, keep_ratios, kept_indices, true_positions
from raybench.model.vet import VETProjector, VisualEmbeddingTable
from raybench.model.vlm import HybridVLM
from raybench.train.loop import answer_exact_match

VOCAB, PAD, BOS, EOS, IMG = 60, 0, 1, 2, 3


def make_model(preset: str, **fusion) -> HybridVLM:
    cfg = validate_config({"model": {"preset": preset, "size": "tiny", "fusion": fusion}})
    torch.manual_seed(0)
    return HybridVLM(cfg.model, vocab_size=VOCAB, image_token_id=IMG, pad_token_id=PAD, eos_token_id=EOS)


def batch(model: HybridVLM, b: int = 3, q_len: int = 5, seed: int = 0, answer_len: int = 2):
    """Right-padded training batch: <s> <image>*N question answer </s>, labels on answer+eos."""
    g = torch.Generator().manual_seed(seed)
    n = model.config.num_image_tokens
    q = torch.randint(5, VOCAB, (b, q_len), generator=g)
    a = torch.randint(5, VOCAB, (b, answer_len), generator=g)
    ids = torch.cat([torch.full((b, 1), BOS), torch.full((b, n), IMG), q, a, torch.full((b, 1), EOS)], 1)
    labels = ids.clone()
    labels[:, : 1 + n + q_len] = -100
    size = model.config.vision.image_size
    return ids, torch.ones_like(ids), torch.randn(b, 3, size, size, generator=g), labels


def layer_io(model: HybridVLM, fn):
    """Run fn() and capture every decoder layer's input/output hidden states and position ids."""
    records = []

    def hook(module, args, kwargs, output):
        records.append({"input": args[0].detach().clone(), "output": output.detach().clone(),
                        "position_ids": kwargs["position_ids"].clone()})

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in model.decoder_layers]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return records


# ---------------------------------------------------------------- VET

def test_vet_one_hot_probabilities_equal_embedding_lookup():
    table = VisualEmbeddingTable(10, 6)
    ids = torch.tensor([[0, 3, 9], [7, 7, 1]])
    one_hot = nn.functional.one_hot(ids, 10).float()
    torch.testing.assert_close(table(one_hot), table(ids), rtol=0, atol=0)
    torch.testing.assert_close(table(ids), table.weight[ids])


@pytest.mark.parametrize("function", ["softmax", "gumbel_argmax", "st_argmax"])
def test_indicator_rows_never_receive_patch_probability(function):
    cfg = validate_config({"model": {"preset": "ovis", "size": "tiny",
                                     "fusion": {"vet": {"tokenize_function": function,
                                                        "num_indicator_tokens": 3}}}}).model.fusion.vet
    proj = VETProjector(cfg, vision_hidden=8, llm_hidden=4, merge=2)
    patches = torch.randn(2, 16, 8) * 10
    for training in (True, False):
        proj.train(training)
        probs = proj.visual_probs(patches)
        assert probs.shape == (2, 4, cfg.vocab_size)
        assert torch.equal(probs[..., -3:], torch.zeros_like(probs[..., -3:]))
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4))
    # The visual span is framed by the indicator rows of the table.
    out = proj(patches)
    v = cfg.vocab_size
    assert out.shape == (2, 1 + 4 + 2, 4)
    assert torch.equal(out[0, 0], proj.vte.weight[v - 3])
    assert torch.equal(out[1, -2:], proj.vte.weight[v - 2:])


def test_vet_gradients_reach_the_visual_head_for_hard_tokenizers():
    for function in ("gumbel_argmax", "st_argmax"):
        model = make_model("ovis", vet={"tokenize_function": function})
        ids, mask, px, labels = batch(model)
        model(ids, mask, px, labels).loss.backward()
        assert model.projector.head_linear.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- DeepStack

def test_deepstack_process_touches_only_visual_positions():
    hidden = torch.randn(2, 7, 4)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, 1:4] = True
    embeds = torch.randn(2, 3, 4)
    out = deepstack_process(hidden, true_positions(mask, 3), embeds)
    assert torch.equal(out[~mask], hidden[~mask])
    # Bit-identical to the boolean-mask form it replaced (one float add per visual position).
    assert torch.equal(out[mask], hidden[mask] + embeds.reshape(-1, 4))


def test_deepstack_injects_after_layers_0_to_k_minus_1_at_visual_positions_only():
    model = make_model("deepstack").eval()
    k = len(model.deepstack_visual_indexes)
    assert k == 2
    ids, mask, px, labels = batch(model)
    visual = ids == IMG
    with torch.no_grad():
        _, ds = model.project(*model.encode_images(px))
    io = layer_io(model, lambda: model(ids, mask, px, labels))
    for i in range(len(io) - 1):
        delta = io[i + 1]["input"] - io[i]["output"]
        assert torch.equal(delta[~visual], torch.zeros_like(delta[~visual])), f"text changed after layer {i}"
        if i < k:
            torch.testing.assert_close(delta[visual], ds[i].reshape(-1, ds[i].shape[-1]))
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), f"unexpected injection after layer {i}"


def test_zeroed_mergers_give_bit_identical_text_positions():
    model = make_model("deepstack").eval()
    ids, mask, px, labels = batch(model)
    with_ds = layer_io(model, lambda: model(ids, mask, px, labels))
    with torch.no_grad():
        for p in model.deepstack.parameters():
            p.zero_()
    zeroed = layer_io(model, lambda: model(ids, mask, px, labels))
    # A zero merger contributes nothing: every layer's output is bit-identical to a plain model...
    plain = make_model("llava").eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("deepstack")})
    plain_io = layer_io(plain, lambda: plain(ids, mask, px, labels))
    for a, b in zip(zeroed, plain_io):
        assert torch.equal(a["output"], b["output"])
    # ...and with real mergers the text positions are untouched up to the first layer that
    # reads the injected visual tokens (layer 0's output; injection happens after it).
    text = ids != IMG
    assert torch.equal(with_ds[0]["output"][text], zeroed[0]["output"][text])
    assert not torch.equal(with_ds[1]["input"][~text], zeroed[1]["input"][~text])


# ---------------------------------------------------------------- dense -> sparse

@pytest.mark.parametrize("schedule,expected", [
    ("constant", [16, 16, 16]), ("linear", [48, 32, 16]), ("exponential", [32, 16, 8]), ("step", [64, 16, 16]),
])
def test_keep_counts_follow_the_schedule(schedule, expected):
    ratio = {"exponential": 0.125}.get(schedule, 0.25)  # 0.125 ** (1/3) = 0.5
    counts = keep_counts(64, schedule, ratio, 3)
    assert counts == expected
    assert counts == sorted(counts, reverse=True) and counts[-1] == max(1, round(64 * ratio))
    assert len(keep_ratios(schedule, ratio, 3)) == 3


def test_kept_indices_never_drop_text_and_keep_order():
    visual = torch.zeros(2, 9, dtype=torch.bool)
    visual[:, 2:7] = True  # 5 visual tokens at positions 2..6
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1]])
    kept_vis, seq = kept_indices(scores, 2, true_positions(visual, 5), 9)
    assert kept_vis.tolist() == [[1, 3], [0, 1]]
    assert seq.tolist() == [[0, 1, 3, 5, 7, 8], [0, 1, 2, 3, 7, 8]]


def _kept_indices_with_nonzero(scores, keep, visual_pos_masks):
    """The boolean-mask / `nonzero` implementation the shape-static one replaced."""
    b, t = visual_pos_masks.shape
    kept_vis = scores.topk(keep, dim=-1).indices.sort(-1).values
    vis_pos = visual_pos_masks.nonzero()[:, 1].view(b, -1)
    drop = torch.ones_like(vis_pos, dtype=torch.bool).scatter_(1, kept_vis, False)
    keep_seq = torch.ones(b, t, dtype=torch.bool)
    keep_seq[torch.arange(b)[:, None].expand_as(vis_pos)[drop], vis_pos[drop]] = False
    return kept_vis, keep_seq.nonzero()[:, 1].view(b, -1)


@pytest.mark.parametrize("seed", range(5))
def test_shape_static_pruning_selects_what_nonzero_selected(seed):
    g = torch.Generator().manual_seed(seed)
    b, t, n_vis = 3, 40, 12
    visual = torch.zeros(b, t, dtype=torch.bool)
    for row in range(b):  # scattered, not one span: each row's image tokens anywhere
        visual[row, torch.randperm(t, generator=g)[:n_vis]] = True
    pos = true_positions(visual, n_vis)
    assert torch.equal(pos, visual.nonzero()[:, 1].view(b, -1))
    for keep in (1, 5, n_vis - 1):
        scores = torch.rand(b, n_vis, generator=g)
        new, old = kept_indices(scores, keep, pos, t), _kept_indices_with_nonzero(scores, keep, visual)
        assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])


@pytest.mark.parametrize("schedule", ["constant", "linear", "exponential", "step"])
def test_pruning_keeps_scheduled_count_and_gathers_consistently(schedule):
    # Stages end after layers 0 and 2; DeepStack injects after layers 0 and 1, so the second
    # injection happens after pruning and its embeds must be gathered with the same indices.
    model = make_model("hybrid", deepstack={"num_injections": 2, "visual_indexes": [0, 1]},
                       sparsity={"schedule": schedule, "stage_layers": [0, 2], "final_keep_ratio": 0.5})
    model.eval()
    ids, mask, px, labels = batch(model, b=2)
    n = model.config.num_image_tokens
    t = ids.shape[1]
    with torch.no_grad():
        _, ds = model.project(*model.encode_images(px))
    io = layer_io(model, lambda: model(ids, mask, px, labels))
    counts = model.stage_keep
    alive = [n, counts[0], counts[0], counts[1]]  # visual tokens seen by layers 0..3
    text_positions = set(range(t)) - set(range(1, 1 + n))
    for i, rec in enumerate(io):
        pos = rec["position_ids"]
        assert pos.shape[1] == t - (n - alive[i]), f"layer {i}"
        for row in pos.tolist():
            assert text_positions <= set(row), "a text token was dropped"
            assert row == sorted(row), "order changed"
    # Injection after layer 1 lands on the kept visual tokens with their own embeds.
    kept_pos = io[2]["position_ids"]
    visual_kept = (kept_pos >= 1) & (kept_pos <= n)
    kept_vis = (kept_pos[visual_kept].view(2, -1) - 1)
    delta = io[2]["input"] - io[1]["output"]
    expected = torch.stack([ds[1][b, kept_vis[b]] for b in range(2)])
    torch.testing.assert_close(delta[visual_kept].view(2, -1, delta.shape[-1]), expected)
    assert torch.equal(delta[~visual_kept], torch.zeros_like(delta[~visual_kept]))


# ---------------------------------------------------------------- generation

@pytest.mark.parametrize("preset", PRESETS)
def test_kv_cache_greedy_equals_full_recompute(preset):
    model = make_model(preset).eval()
    _, _, px, _ = batch(model, b=3)
    n = model.config.num_image_tokens
    g = torch.Generator().manual_seed(1)
    # Left-padded prompts of different lengths.
    lengths = [6, 3, 4]
    ids = torch.full((3, 1 + n + 6), PAD)
    mask = torch.zeros_like(ids)
    for i, q in enumerate(lengths):
        row = [BOS] + [IMG] * n + torch.randint(5, VOCAB, (q,), generator=g).tolist()
        ids[i, -len(row):] = torch.tensor(row)
        mask[i, -len(row):] = 1
    cached = model.generate(ids, mask, px, max_new_tokens=6)
    recomputed = model.generate(ids, mask, px, max_new_tokens=6, use_cache=False)
    static = model.generate(ids, mask, px, max_new_tokens=6, static_cache=True)
    assert cached.shape[1] >= 1
    assert torch.equal(cached, recomputed) and torch.equal(static, cached)
    assert not (cached == IMG).any()


def test_teacher_forced_exact_match_agrees_with_greedy_generation():
    model = make_model("llava")
    ids, mask, px, labels = batch(model, b=4, answer_len=1)
    # Train on this batch until it is memorised, then compare both ways of scoring it.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        model(ids, mask, px, labels).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(ids, mask, px, labels, return_logits=True)
    tf = answer_exact_match(out.logits, out.labels, [IMG, PAD])
    prompt_len = 1 + model.config.num_image_tokens + 5
    gen = model.generate(ids[:, :prompt_len], mask[:, :prompt_len], px, max_new_tokens=3)
    target = ids[:, prompt_len:]
    greedy = torch.tensor([torch.equal(gen[i, : target.shape[1]], target[i]) for i in range(4)])
    assert torch.equal(tf, greedy)
    assert tf.any()


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_trains_and_loss_falls(preset):
    model = make_model(preset)
    ids, mask, px, labels = batch(model, b=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(ids, mask, px, labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses
    grads = [p.grad for n, p in model.named_parameters() if "vision" in n or "projector" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the visual side"


def test_loss_is_only_on_answer_tokens():
    model = make_model("hybrid")
    ids, mask, px, labels = batch(model, b=3, answer_len=2)
    out = model(ids, mask, px, labels, return_logits=True)
    targets = out.labels != -100
    assert targets.sum(1).tolist() == [3, 3, 3]  # two answer tokens + </s>, nothing else
    assert torch.equal(out.labels[targets].view(3, 3), ids[:, -3:])
    manual = nn.functional.cross_entropy(out.logits[targets], out.labels[targets])
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("preset", ["hybrid", "blip2"])
def test_questions_sharing_an_image_equal_repeating_it(preset):
    """`image_index`: one vision pass per image gives the loss and the gradients of feeding
    each row its own copy of that image."""
    model = make_model(preset)
    ids, mask, px, labels = batch(model, b=5)
    image_index = torch.tensor([0, 0, 0, 1, 1])
    shared = model(ids, mask, px[:2], labels, image_index=image_index)
    shared.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    repeated = model(ids, mask, px[:2][image_index], labels)
    repeated.loss.backward()
    torch.testing.assert_close(shared.loss, repeated.loss)
    assert any("vision" in n for n in grads)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, msg=n)


# ---------------------------------------------------------------- save / load

def test_save_and_load_round_trip(tmp_path):
    model = make_model("hybrid").eval()
    ids, mask, px, labels = batch(model)
    expected = model(ids, mask, px, labels).loss
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.json"}
    loaded = HybridVLM.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded(ids, mask, px, labels).loss, expected)


def test_from_pretrained_local_transformers_checkpoints(tmp_path):
    model = make_model("llava")
    model.vision.siglip.save_pretrained(tmp_path / "vit")
    model.llm.save_pretrained(tmp_path / "lm")
    cfg = validate_config({"model": {"preset": "llava", "size": "tiny",
                                     "vision": {"pretrained_path": str(tmp_path / "vit")},
                                     "llm": {"pretrained_path": str(tmp_path / "lm")}}})
    loaded = HybridVLM(cfg.model, vocab_size=VOCAB, image_token_id=IMG, pad_token_id=PAD, eos_token_id=EOS)
    for name, p in model.vision.siglip.state_dict().items():
        assert torch.equal(p, loaded.vision.siglip.state_dict()[name])
    assert torch.equal(model.llm.lm_head.weight, loaded.llm.lm_head.weight)


def _compiled_frames(model: HybridVLM, compile_with) -> int:
    """Frames dynamo compiled while `model` generates, after `compile_with(backend)`."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()  # a backend that counts what reaches it and runs it eagerly
    compile_with(counter)
    ids, mask, pixels, _ = batch(model)
    with torch.no_grad():
        model.generate(ids, mask, pixels, max_new_tokens=2)
    torch._dynamo.reset()
    return counter.frame_count


@pytest.mark.parametrize("parts", [("vision",), ("projector", "deepstack"), ("llm",)])  # the serving stages
def test_each_stage_units_run_compiled(parts):
    model = make_model("hybrid").eval()

    def compile_units(backend):
        for unit in model.units(parts):
            unit.compile(backend=backend, dynamic=True)

    assert model.units(parts) and _compiled_frames(model, compile_units) > 0


def test_wrapping_the_llm_in_torch_compile_never_runs_it_compiled():
    # Why serving compiles per unit: the decoder calls the LLM's layers one by one, so a
    # torch.compile wrapper around `model.llm` (what serving used to set) is never called.
    model = make_model("hybrid").eval()

    def wrap_llm(backend):
        model.llm = torch.compile(model.llm, backend=backend)

    assert _compiled_frames(model, wrap_llm) == 0
