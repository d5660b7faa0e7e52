"""`raybench probe`: the linear probe is right (trivial features -> ~1, random -> ~chance), and
the whole diagnostic runs end to end on a tiny random model saved to disk."""

import json

import pytest
import torch

from raybench.cli import main
from raybench.probe.features import ATTRIBUTES, one_object_scenes
from raybench.probe.linear import probe_accuracy
from raybench.probe.run import format_report, run_probe


def _labels(n, k, seed):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dim", [12, 400])  # 400 > 300 training rows: the row-space path
def test_probe_decodes_a_one_hot_label_under_noise(dim):
    g = torch.Generator().manual_seed(1)
    y = _labels(400, 4, 0)
    # one-hot label along 4 random unit directions, plus unit noise in every dimension
    directions = torch.randn(4, dim, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    x = torch.randn(400, dim, generator=g) + 6.0 * torch.nn.functional.one_hot(y, 4).float() @ directions
    assert probe_accuracy(x[:300], y[:300], x[300:], y[300:], 4)["accuracy"] > 0.9


@pytest.mark.parametrize("dim", [12, 400])
def test_probe_on_random_features_is_near_chance(dim):
    y = _labels(1000, 3, 2)
    x = torch.randn(1000, dim, generator=torch.Generator().manual_seed(3))
    assert abs(probe_accuracy(x[:700], y[:700], x[700:], y[700:], 3)["accuracy"] - 1 / 3) < 0.1


def test_one_object_scenes_carry_their_labels_and_split_streams():
    a, b = one_object_scenes(8, 32, 0, "train"), one_object_scenes(8, 32, 0, "test")
    assert a.pixels.shape == (8, 3, 32, 32) and not torch.equal(a.pixels, b.pixels)
    assert a.questions["shape"][0].startswith("what shape is ")
    assert a.questions["position"][0].startswith("where is the ")
    assert a.questions["color"][0].startswith("what color is the ")
    for attr in ATTRIBUTES:  # the question never names the attribute it asks for
        assert all(ans not in q for q, ans in zip(a.questions[attr], a.answers[attr]))


def test_probe_runs_end_to_end_on_a_tiny_saved_model(tiny_model_dir):
    report = run_probe(tiny_model_dir, n_train=60, n_test=30, batch_size=32, log=lambda _: None,
                       l2_grid=(0.1,))
    names = [r["features"] for r in report["rows"]]
    assert names[0] == "pixels (flat)" and "ViT out (mean-pooled)" in names
    assert sum(n.startswith("LLM layer") for n in names) == 4  # tiny: 4 decoder layers
    for row in report["rows"]:
        for attr in ATTRIBUTES:
            assert set(row[attr]) == {"trained", "random_init"}
            assert all(0.0 <= v <= 1.0 for v in row[attr].values())
    for col in ("trained", "random_init"):
        r = report["readings"][col]
        assert len(r["deepstack_norm"]) == 2 and all(v > 0 for v in r["deepstack_norm"])
        assert all(0.0 <= v <= 1.0 for v in r["attention_on_image"])
        assert all(0.0 <= v <= 1.0 for v in r["answer_accuracy"].values())
        # tiny prunes after layer 1 (and 2): later layers see fewer image keys than layer 0
        assert r["image_key_fraction"][-1] < r["image_key_fraction"][0]
    # The saved model *is* the seed-0 random init here, so both columns agree exactly.
    assert report["rows"][1]["shape"]["trained"] == report["rows"][1]["shape"]["random_init"]
    table = format_report(report)
    assert table.startswith("| features | dim | shape trained / random-init")
    assert "query attention on image tokens, layer 3" in table


def test_probe_cli_prints_the_table_and_writes_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["probe", "--model", str(tiny_model_dir), "--n-train", "40", "--n-test", "20",
                 "--no-random-init", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| LLM layer 0 (query token) |" in printed
    report = json.loads(out.read_text())
    assert set(report["readings"]) == {"trained"} and len(report["rows"]) == 9
