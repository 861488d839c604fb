"""The tiny base's pretraining pipeline on a miniature suite: training, per-skill evaluation, the content cache."""

import json
import shutil

import pytest

from cmlora import vlm
from cmlora.data import TEMPLATES, Turn
from cmlora.synth import base as base_module
from cmlora.synth.base import PretrainConfig, pretrain_base

from .synthetic_data import write_records

SMALL = vlm.TinySpec(vision_hidden=32, text_hidden=64, vocab_size=400, vision_feature_layer=-1)


@pytest.fixture
def suite(tmp_path, monkeypatch):
    monkeypatch.setenv("CMLORA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "suite"
    write_records(root, count=24)
    shutil.copy(root / "train.json", root / "pretrain.json")
    shutil.copy(root / "train.json", root / "pretrain_eval.json")
    (root / "manifest.json").write_text("{}")
    return root


def test_plain_template_has_no_system_prompt_and_no_roles():
    turns = [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red"), Turn("user", "Shape?"),
             Turn("assistant", "a square")]
    plain = TEMPLATES["plain"](turns)
    assert plain.text == "<image>\nWhat colour? red</s>Shape? a square</s>"
    assert [plain.text[a:b] for a, b in plain.answer_spans] == ["red</s>", "a square</s>"]


def test_pretraining_learns_evaluates_per_skill_and_caches(suite, tmp_path, monkeypatch):
    config = PretrainConfig(steps=40, batch_size=8, spec=SMALL, eval_batch_size=16)
    out = pretrain_base(suite, tmp_path / "base", config)
    report = json.loads((out / "base_eval.json").read_text())
    assert set(report["skills"]) == {"colour", "yes_no"}
    assert report["training"]["steps"] == 40 and report["training"]["mean_loss_last_100"] < 3.0
    model, processor = vlm.load(out)
    assert model.config.vision_feature_layer == -1
    calls = []
    monkeypatch.setattr(base_module, "train_base", lambda *args, **kwargs: calls.append(1))
    again = pretrain_base(suite, tmp_path / "base2", config)  # same content: served from the cache
    assert not calls and (again / "base_eval.json").read_text() == (out / "base_eval.json").read_text()
    key = base_module.content_hash(suite, config)
    (suite / "pretrain.json").write_text((suite / "pretrain.json").read_text().replace("red", "crimson"))
    assert base_module.content_hash(suite, config) != key  # changed content: a new key, trained anew


def test_pretrain_base_command(suite, tmp_path, capsys):
    from cmlora.cli import main

    main(["pretrain-base", "--suite", str(suite), "--out", str(tmp_path / "base"), "--steps", "3"])
    out = capsys.readouterr().out
    assert "held-out accuracy: colour" in out and (tmp_path / "base" / "base_eval.json").exists()
