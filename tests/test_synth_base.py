"""The tiny base's pretraining pipeline on a miniature suite: stage 0 (vision tower), stage 1, per-skill
evaluation, the content cache."""

import json

import pytest
import torch

from cmlora import vlm
from cmlora.data import TEMPLATES, Turn
from cmlora.synth import base as base_module
from cmlora.synth import write_suite
from cmlora.synth.base import PretrainConfig, length_grouped_batches, pretrain_base
from cmlora.synth.scenes import COLOURS, SHAPES, SIZES, STYLES
from cmlora.synth.vision import CONTENTS, IGNORE, VisionPretrainConfig, cell_labels, pretrain_vision

SMALL = vlm.TinySpec(vision_hidden=32, text_hidden=64, vocab_size=400, vision_feature_layer=-1)
MINI = {"train_per_task": 2, "eval_per_task": 2, "mme_images_per_subtask": 1, "pretrain_images": 48,
        "pretrain_eval_per_skill": 2}


@pytest.fixture
def suite(tmp_path, monkeypatch):
    monkeypatch.setenv("CMLORA_CACHE", str(tmp_path / "cache"))
    write_suite(tmp_path / "suite", 0, **MINI)
    return tmp_path / "suite"


def test_cell_labels_follow_the_scene():
    scene = {"grid": 2, "style": "outline", "items": [
        {"kind": "shape", "label": "triangle", "colour": "blue", "row": 1, "col": 0, "size": "small"},
        {"kind": "digit", "label": "7", "colour": "red", "row": 0, "col": 1, "size": "large"},
        {"kind": "letter", "label": "Q", "colour": "white", "row": 1, "col": 1, "size": "large"}]}
    labels = cell_labels([scene])
    assert [CONTENTS[i] for i in labels["content"][0]] == ["empty", "digit 7", "triangle", "letter Q"]
    assert labels["colour"][0].tolist() == [IGNORE, COLOURS.index("red"), COLOURS.index("blue"),
                                           COLOURS.index("white")]
    assert labels["size"][0].tolist() == [IGNORE, IGNORE, SIZES.index("small"), IGNORE]
    assert labels["style"].tolist() == [STYLES.index("outline")]


def test_stage0_teaches_the_vision_tower_what_is_in_each_cell(tmp_path):
    """A few seconds of per-cell supervision: colour and shape well above chance on held-out images."""
    suite = tmp_path / "suite"
    write_suite(suite, 0, **{**MINI, "pretrain_images": 600, "pretrain_eval_per_skill": 20})
    torch.manual_seed(0)
    vlm.tiny(tmp_path / "model", SMALL, corpus=["a red circle"])
    model, processor = vlm.load(tmp_path / "model")
    before = model.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"].clone()
    report = pretrain_vision(model, processor.image_processor, suite, VisionPretrainConfig(steps=150, batch_size=64),
                             lambda step, total: 1.0)
    accuracy = report["held_out_accuracy"]
    assert accuracy["colour"] > 0.9 and accuracy["empty"] > 0.9, accuracy
    assert accuracy["shape"] > 2 / len(SHAPES), accuracy  # chance is 1/4 among the shapes alone
    after = model.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"]
    assert not torch.equal(before, after)


def test_stage0_refuses_cells_that_are_not_patches(suite, tmp_path):
    vlm.tiny(tmp_path / "model", vlm.TinySpec(**{**vars(SMALL), "patch_size": 8}), corpus=["a red circle"])
    model, processor = vlm.load(tmp_path / "model")
    with pytest.raises(ValueError, match="16 patch tokens but the suite's grid has 4 cells"):
        pretrain_vision(model, processor.image_processor, suite, VisionPretrainConfig(steps=1), lambda s, t: 1.0)


def test_length_grouped_batches_cover_every_record_once_with_little_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(5, 100, (1000,), generator=generator)]
    batches = length_grouped_batches(lengths, 32, generator, pool_batches=8)
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    assert padded < 1.15 * sum(lengths)  # random batches of 32 would pad to ~1.8x


def test_plain_template_has_no_system_prompt_and_no_roles():
    turns = [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red"), Turn("user", "Shape?"),
             Turn("assistant", "a square")]
    plain = TEMPLATES["plain"](turns)
    assert plain.text == "<image>\nWhat colour? red</s>Shape? a square</s>"
    assert [plain.text[a:b] for a, b in plain.answer_spans] == ["red</s>", "a square</s>"]


def test_pretraining_learns_evaluates_per_skill_and_caches(suite, tmp_path, monkeypatch):
    config = PretrainConfig(steps=40, batch_size=8, spec=SMALL, eval_batch_size=16,
                            vision=VisionPretrainConfig(steps=5, batch_size=8))
    out = pretrain_base(suite, tmp_path / "base", config)
    report = json.loads((out / "base_eval.json").read_text())
    assert set(report["skills"]) == {"colour", "shape", "count", "position", "existence", "size", "style", "digit",
                                     "letter"}
    training = report["training"]
    assert training["steps"] == 40 and training["mean_loss_last_100"] < 4.0
    assert training["vision"]["steps"] == 5 and "colour" in training["vision"]["held_out_accuracy"]
    model, processor = vlm.load(out)
    assert model.config.vision_feature_layer == -1
    calls = []
    monkeypatch.setattr(base_module, "train_base", lambda *args, **kwargs: calls.append(1))
    again = pretrain_base(suite, tmp_path / "base2", config)  # same content: served from the cache
    assert not calls and (again / "base_eval.json").read_text() == (out / "base_eval.json").read_text()
    key = base_module.content_hash(suite, config)
    (suite / "pretrain.json").write_text((suite / "pretrain.json").read_text().replace("red", "crimson"))
    changed = base_module.content_hash(suite, config)
    assert changed != key  # changed content: a new key, trained anew
    (suite / "scenes.jsonl").write_text((suite / "scenes.jsonl").read_text().replace("red", "blue"))
    assert base_module.content_hash(suite, config) != changed  # stage 0's labels are part of the content


def test_pretrain_base_command(suite, tmp_path, capsys):
    from cmlora.cli import main

    main(["pretrain-base", "--suite", str(suite), "--out", str(tmp_path / "base"), "--steps", "3",
          "--vision-steps", "2"])
    out = capsys.readouterr().out
    assert "held-out accuracy: colour" in out and (tmp_path / "base" / "base_eval.json").exists()
