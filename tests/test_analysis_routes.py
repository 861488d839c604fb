"""Factor-selection patterns (issue #6): statistics on hand-written traces, collapse detection, `cmlora routes`."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from cmlora import vlm
from cmlora.analysis.common import load_analysis_model
from cmlora.analysis.routes import (
    RoutedLayer,
    TaskRouting,
    collapse_statistics,
    embed_tsne,
    jaccard,
    layer_statistics,
    routed_layers,
    selection_features,
    selection_histogram,
    usage_entropy,
    used_factors,
    weighted_jaccard,
)
from cmlora.cli import main

from .synthetic_data import write_records

# 3 instances, E = 4, r = 2 (indices in router-score order, as traced)
TASK_X = np.array([[0, 1], [1, 0], [0, 2]])  # factor 0: 3 times, 1: 2, 2: 1, 3: 0
TASK_Y = np.array([[2, 3], [3, 2], [1, 3]])  # factor 0: 0, 1: 1, 2: 2, 3: 3


def test_histogram_entropy_and_used_factors_by_hand():
    assert selection_histogram(TASK_X, 4).tolist() == [3, 2, 1, 0]
    assert selection_histogram(torch.tensor(TASK_Y), 4).tolist() == [0, 1, 2, 3]
    entropy, normalised = usage_entropy([3, 2, 1, 0])
    expected = -(0.5 * math.log(0.5) + (1 / 3) * math.log(1 / 3) + (1 / 6) * math.log(1 / 6))
    assert entropy == pytest.approx(expected) and entropy == pytest.approx(1.011404, abs=1e-6)
    assert normalised == pytest.approx(expected / math.log(4))
    assert usage_entropy([5, 5, 5, 5]) == pytest.approx((math.log(4), 1.0))
    assert usage_entropy([4, 4, 0, 0])[1] == pytest.approx(math.log(2) / math.log(4))
    # instance shares: factor 0 in 3/3 instances, 1 in 2/3, 2 in 1/3, 3 in none
    assert used_factors(TASK_X, 4, min_share=0.05) == [0, 1, 2]
    assert used_factors(TASK_X, 4, min_share=0.5) == [0, 1]
    assert used_factors(TASK_X, 4, min_share=0.0) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        selection_histogram(np.array([[0, 4]]), 4)


def test_jaccard_values_by_hand():
    assert jaccard([0, 1, 2], [1, 2, 3]) == pytest.approx(2 / 4)
    assert jaccard([0, 1], [2, 3]) == 0.0 and jaccard([], []) == 1.0
    # p_X = [3, 2, 1, 0] / 6, p_Y = [0, 1, 2, 3] / 6: sum min = 2/6, sum max = 10/6
    assert weighted_jaccard([3, 2, 1, 0], [0, 1, 2, 3]) == pytest.approx(0.2)
    assert weighted_jaccard([3, 2, 1, 0], [6, 4, 2, 0]) == pytest.approx(1.0)  # scale-free


def test_layer_statistics_of_a_hand_written_trace():
    layer = RoutedLayer("model.layers.0.self_attn.q_proj", 0, num_factors=4, r=2)
    tasks = [TaskRouting("x", "seen", {layer.name: (TASK_X, TASK_Y)}),
             TaskRouting("y", "unseen", {layer.name: (TASK_Y, TASK_Y)})]
    stats = layer_statistics(tasks, layer, min_share=0.05)
    assert stats["labels"] == ["x", "y (unseen)"]
    x = stats["tasks"]["x"]
    assert x["instances"] == 3 and x["split"] == "seen"
    assert x["a"]["histogram"] == [3, 2, 1, 0] and x["a"]["used"] == [0, 1, 2]
    assert x["a"]["entropy"] == pytest.approx(1.011404, abs=1e-6)
    assert stats["jaccard"]["a"] == [[1.0, 0.5], [0.5, 1.0]]
    assert stats["jaccard"]["b"] == [[1.0, 1.0], [1.0, 1.0]]
    assert stats["weighted_jaccard"]["a"][0][1] == pytest.approx(0.2)
    # pooled A selections: [3, 3, 3, 3] -> top-2 share 1/2, no collapse
    assert stats["collapse"]["a"]["top_r_share"] == pytest.approx(0.5)
    assert not stats["collapse"]["a"]["collapsed"]


def test_collapse_detected_on_a_collapsed_trace_not_on_a_spread_one():
    collapsed = np.array([[1, 2], [2, 1]] * 5)
    check = collapse_statistics(collapsed, 8)
    assert check["collapsed"] and check["top_r_share"] == 1.0 and check["mode_set_share"] == 1.0
    assert check["uniform_top_r_share"] == pytest.approx(2 / 8)
    nearly = np.array([[1, 2]] * 9 + [[0, 3]])  # top-2 share 18/20 = 0.9
    assert collapse_statistics(nearly, 8)["collapsed"]
    assert not collapse_statistics(nearly, 8, threshold=0.95)["collapsed"]
    spread = np.array([[i % 8, (i + 3) % 8] for i in range(16)])  # every factor used 4 times
    check = collapse_statistics(spread, 8)
    assert not check["collapsed"] and check["top_r_share"] == pytest.approx(0.25)
    assert check["normalised_entropy"] == pytest.approx(1.0)
    check = collapse_statistics(TASK_X, 4)  # top-2 share 5/6, sets {0,1} twice of 3
    assert not check["collapsed"] and check["top_r_share"] == pytest.approx(5 / 6)
    assert check["mode_set_share"] == pytest.approx(2 / 3)


def test_tsne_features_and_small_samples():
    features = selection_features(TASK_X, TASK_Y, 4)
    assert features.dtype == bool and features.shape == (3, 8)
    assert features[0].tolist() == [True, True, False, False, False, False, True, True]
    points, perplexity, note = embed_tsne(features)
    assert points is None and perplexity is None and "too few" in note
    many = selection_features(np.array([[i % 4, (i + 1) % 4] for i in range(7)]), np.array([[0, 1]] * 7), 4)
    points, perplexity, note = embed_tsne(many, seed=1)
    assert points.shape == (7, 2) and perplexity == pytest.approx(2.0) and note is None
    assert np.array_equal(points, embed_tsne(many, seed=1)[0])  # deterministic


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    model_dir = vlm.tiny(root / "tiny-llava", vlm.TinySpec(text_layers=3))
    seen = write_records(root / "seen", count=16)  # 8 instances each of colour, yes_no
    unseen = write_records(root / "unseen", count=12)  # 6 each
    return root, model_dir, seen, unseen


def test_routes_command_end_to_end(workspace, capsys):
    root, model_dir, seen, unseen = workspace
    out = root / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["routes", "--base", str(model_dir), "--fresh", "mixlora", "--num-factors", "8", "--rank", "2",
              "--data", str(seen), "--image-folder", str(seen.parent / "images"), "--unseen", str(unseen),
              "--unseen-image-folder", str(unseen.parent / "images"), "--batches", "2", "--batch-size", "4",
              "--max-length", "128", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "normalised entropy A/B" in printed and "routes written to" in printed
    report = json.loads((out / "routes.json").read_text())
    assert report["blocks"] == [0, 1, 2]
    names = list(report["layers"])
    assert all(name.endswith("self_attn.q_proj") for name in names)
    assert [report["layers"][n]["depth"] for n in names] == ["shallow", "middle", "deep"]
    assert [(t["label"], t["instances"]) for t in report["tasks"]] == [
        ("colour", 8), ("yes_no", 8), ("colour (unseen)", 6), ("yes_no (unseen)", 6)]
    for layer in report["layers"].values():
        assert layer["num_factors"] == 8 and layer["r"] == 2
        for entry in layer["tasks"].values():
            for pool in ("a", "b"):
                assert sum(entry[pool]["histogram"]) == entry["instances"] * 2
                assert 0 <= entry[pool]["normalised_entropy"] <= 1
        assert np.allclose(np.diag(layer["jaccard"]["a"]), 1.0) and len(layer["jaccard"]["b"]) == 4
    assert {split: panel["instances"] for split, panel in report["tsne"][names[0]].items()} == {"seen": 16,
                                                                                                "unseen": 12}
    assert all(p["skipped"] is None for panels in report["tsne"].values() for p in panels.values())
    flagged = [(name, pool.upper()) for name, layer in report["layers"].items() for pool in ("a", "b")
               if layer["collapse"][pool]["collapsed"]]
    assert [(item["layer"], item["pool"]) for item in report["collapsed"]] == flagged
    for figure in ("histograms.png", "jaccard.png", "tsne.png"):
        assert (out / figure).stat().st_size > 10_000


def test_module_choice_and_errors(workspace, tmp_path):
    _, model_dir, seen, _ = workspace
    analysis = load_analysis_model(base=str(model_dir), fresh="mixlora", num_factors=8, r=2)
    layers = routed_layers(analysis.model, "v_proj")
    assert sorted(layers) == [0, 1, 2] and layers[2].name.endswith("layers.2.self_attn.v_proj")
    assert routed_layers(analysis.model)[1].name.endswith("layers.1.self_attn.q_proj")
    with pytest.raises(ValueError, match="no MixLoRA-routed module named 'w_proj'"):
        routed_layers(analysis.model, "w_proj")
    lora = load_analysis_model(base=str(model_dir), fresh="lora", r=2)
    with pytest.raises(ValueError, match="routes needs a MixLoRA adapter"):
        routed_layers(lora.model)
    with pytest.raises(SystemExit, match="routes needs a MixLoRA adapter"):
        main(["routes", "--base", str(model_dir), "--fresh", "lora", "--data", str(seen)])
    with pytest.raises(SystemExit, match="routes needs a MixLoRA adapter"):
        main(["routes", "--base", str(model_dir), "--data", str(seen)])
