"""Task interference (issue #6, method.md section 5): the estimator, a constructed conflict, runs, the command."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from cmlora import vlm
from cmlora.analysis.common import load_analysis_model, task_batches
from cmlora.analysis.interference import (
    first_order_interference,
    negative_offdiagonal,
    parameter_groups,
    run_interference,
    task_interference,
)
from cmlora.cli import main
from cmlora.train import TrainConfig, train

from .synthetic_data import COLOURS, write_records

ADAPTER_OPTIONS = dict(r=2, num_factors=4, lora_dropout=0.0)


def write_opposite_answers(folder: Path, count: int = 8) -> Path:
    """Tasks "yes" and "no": the same images and questions, and "yes" always answers yes, "no" always no."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for index in range(count):
        image = f"img{index}.png"
        Image.new("RGB", (32, 32), COLOURS[names[index % len(names)]]).save(images / image)
        question = f"<image>\nIs the image {names[(index // 2) % len(names)]}?"
        for task in ("yes", "no"):
            records.append({"id": f"{task}{index}", "image": image, "task_name": task,
                            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": task}]})
    path = folder / "train.json"
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("interference")
    return root, vlm.tiny(root / "tiny-llava"), write_opposite_answers(root / "opposite")


def test_estimator_on_hand_made_gradients():
    # One batch per task: the cosine of the two gradients.
    opposite = first_order_interference([torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, 0.0]])])
    assert torch.equal(opposite, torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))
    orthogonal = first_order_interference([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])])
    assert torch.equal(orthogonal, torch.eye(2, dtype=torch.float64))
    # Several batches: I_ij = mean_b (u_j . g_i^(b)) / (u_i . g_i^(b)), u_t the unit mean gradient of task t.
    # Task 1: batches (1,0), (1,2), mean (1,1), u_1 = (1,1)/sqrt2; task 2: (0,1), u_2 = (0,1).
    # I_12 = mean(0 / (1/sqrt2), 2 / (3/sqrt2)) = sqrt2/3;  I_21 = (1/sqrt2) / 1.
    matrix = first_order_interference([torch.tensor([[1.0, 0.0], [1.0, 2.0]]), torch.tensor([[0.0, 1.0]])])
    assert matrix[0, 1].item() == pytest.approx(math.sqrt(2) / 3)
    assert matrix[1, 0].item() == pytest.approx(1 / math.sqrt(2))
    assert torch.equal(matrix.diagonal(), torch.ones(2, dtype=torch.float64))
    # A task without gradient has no direction: its row and column are NaN, the rest stays defined.
    zero = first_order_interference([torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])])
    assert zero[1].isnan().all() and zero[:, 1].isnan().all()
    assert zero[0, 2].item() == pytest.approx(1 / math.sqrt(2)) == zero[2, 0].item()  # cosine of (1,0), (1,1)
    assert negative_offdiagonal(opposite) == {"negative_share": 1.0, "negative_mean": -1.0, "entries": 2}
    assert negative_offdiagonal(zero)["entries"] == 2


@pytest.mark.parametrize("adapter", ["lora", "mixlora"])
def test_opposite_answers_interfere_negatively(workspace, adapter):
    """The known case. Tasks "yes" and "no" share every input and differ only in the answer token. The tiny model's
    unembedding rows of the two answer tokens are set to w and -w, so raising one answer's logit lowers the other's
    by the same amount through any parameter: the two tasks pull every adapter parameter in opposite directions and
    I_yes,no, I_no,yes must be close to -1 (the shared end-of-answer token keeps them a little above -1). B is
    drawn non-zero so that the A side has a gradient too. The model runs in float64, so that the exact form's loss
    differences at lambda = 1e-4 are free of rounding: first-order and exact then differ by the second-order term
    only, measured at most 5e-4 here; the test allows 0.05."""
    _, model_dir, data = workspace
    analysis = load_analysis_model(base=str(model_dir), fresh=adapter, seed=1, **ADAPTER_OPTIONS)
    analysis.model.double()
    batches = task_batches(analysis, data, ["yes", "no"], image_folder=data.parent / "images", batch_size=4,
                           max_batches=2)
    answer = {task: int(b[0]["labels"][0][b[0]["labels"][0] != -100][0]) for task, b in batches.items()}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head = analysis.model.get_base_model().lm_head.weight
        direction = torch.randn(head.shape[1], generator=generator, dtype=head.dtype)
        head[answer["yes"]] = 2 * direction / direction.norm()
        head[answer["no"]] = -head[answer["yes"]]
        for group in parameter_groups(analysis.model, "first,last"):
            for param in group.params if group.side == "B" else []:
                param.normal_(0.0, 0.02, generator=generator)
    before = {name: (param.detach().clone(), param.requires_grad) for name, param in analysis.model.named_parameters()}
    result = task_interference(analysis, batches, layers="first,last", lam=1e-4, progress=False)
    assert result.tasks == ["yes", "no"] and result.layers == [0, 1]
    for name, param in analysis.model.named_parameters():  # theta restored exactly, requires_grad as it was
        assert torch.equal(param, before[name][0]) and param.requires_grad == before[name][1], name
    assert not analysis.model.training
    for layer in (0, 1):
        for side in ("A", "B"):
            group = result.groups[layer][side]
            for matrix in (group.first_order, group.exact):
                assert torch.equal(matrix.diagonal(), torch.ones(2, dtype=torch.float64))
                assert matrix[0, 1] < -0.5 and matrix[1, 0] < -0.5, (layer, side, matrix)
            same_routing = torch.ones(2, 2, dtype=torch.bool) if group.routing_changed is None else (
                group.routing_changed == 0)  # a MixLoRA selection flip makes the loss jump (reported, see note)
            assert same_routing[0, 1] and same_routing[1, 0]
            difference = (group.first_order - group.exact).abs()[same_routing]
            assert difference.max() < 0.05, (layer, side, group.first_order, group.exact)
    summary = result.summary()["1"]["B"]
    assert summary["first_order"]["negative_share"] == 1.0 and summary["exact"]["negative_share"] == 1.0


def test_fresh_lora_a_side_is_nan_with_a_note(workspace):
    root, model_dir, data = workspace
    analysis = load_analysis_model(base=str(model_dir), fresh="lora", **ADAPTER_OPTIONS)
    result = run_interference(analysis, data, root / "fresh", image_folder=data.parent / "images",
                              layers="first", batches=1, batch_size=4, progress=False)
    a_side, b_side = result.groups[0]["A"], result.groups[0]["B"]
    assert a_side.first_order.isnan().all() and a_side.exact.isnan().all()
    assert "B = 0" in a_side.note and "['no', 'yes']" in a_side.note
    assert torch.isfinite(b_side.first_order).all() and torch.isfinite(b_side.exact).all() and b_side.note is None
    written = json.loads((root / "fresh" / "interference.json").read_text())
    assert written["groups"]["0"]["A"]["first_order"] == [[None, None], [None, None]]
    assert "B = 0" in written["groups"]["0"]["A"]["note"] and "B = 0" in written["summary"]["0"]["A"]["note"]
    assert written["summary"]["0"]["A"]["first_order"]["negative_share"] is None


@pytest.mark.parametrize("adapter", ["lora", "mixlora"])
def test_cli_on_a_trained_run(workspace, tmp_path, capsys, adapter):
    root, model_dir, _ = workspace
    data = write_records(tmp_path / "data", count=16)  # tasks "colour" and "yes_no", 8 records each
    run = train(TrainConfig(model=str(model_dir), data=str(data), image_folder=str(data.parent / "images"),
                            output_dir=str(tmp_path / adapter), adapter=adapter, max_length=128, learning_rate=1e-2,
                            warmup_ratio=0.0, batch_size=4, max_steps=2, save_steps=100, use_cpu=True, seed=3,
                            **ADAPTER_OPTIONS))
    assert main(["interference", "--run", str(run), "--data", str(data), "--image-folder", str(data.parent / "images"),
                 "--tasks", "colour,yes_no", "--layers", "first,last", "--batches", "2", "--batch-size", "4"]) == 0
    out = run / "analysis" / "interference"
    written = json.loads((out / "interference.json").read_text())
    assert written["tasks"] == ["colour", "yes_no"] and written["layers"] == [0, 1] and written["lambda"] == 1e-3
    assert written["batches_per_task"] == {"colour": 2, "yes_no": 2}
    for layer in ("0", "1"):
        for side in ("A", "B"):
            for form in ("first_order", "exact"):
                matrix = written["groups"][layer][side][form]
                assert all(value is not None and math.isfinite(value) for row in matrix for value in row)
                assert matrix[0][0] == matrix[1][1] == 1.0
    assert (out / "heatmaps.png").stat().st_size > 10_000
    assert (out / "heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "neg share" in printed and "first_order" in printed and f"written to {out}" in printed


def test_cli_errors(workspace):
    _, model_dir, data = workspace
    with pytest.raises(SystemExit, match="exactly one of --adapter DIR or --fresh"):
        main(["interference", "--base", str(model_dir), "--data", str(data)])
    with pytest.raises(ValueError, match=r"no records of task\(s\) \['maybe'\]"):
        main(["interference", "--base", str(model_dir), "--fresh", "lora", "--data", str(data),
              "--image-folder", str(data.parent / "images"), "--tasks", "yes,maybe"])
