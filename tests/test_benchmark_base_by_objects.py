"""benchmarks/base_by_objects.py: a base's held-out answers counted by the number of objects in the image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .benchmark_helpers import benchmark_module


def _module():
    return benchmark_module("base_by_objects")


def _write(tmp_path: Path, predictions: list[dict]) -> tuple[Path, Path]:
    suite, base = tmp_path / "suite", tmp_path / "base"
    suite.mkdir()
    base.mkdir()
    records = [{"id": f"e-{i}", "image": f"pretrain_eval/{i}.png", "task_name": skill,
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
               for i, skill in enumerate(["colour", "colour", "colour", "position"])]
    (suite / "pretrain_eval.json").write_text(json.dumps(records))
    items = [1, 3, 3, 2]
    (suite / "scenes.jsonl").write_text("".join(
        json.dumps({"image": f"images/pretrain_eval/{i}.png", "scene": {"items": [{}] * n}}) + "\n"
        for i, n in enumerate(items)))
    (base / "base_eval_predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"_meta": {}}, *predictions]))
    return base, suite


def test_answers_are_counted_per_skill_and_number_of_objects(tmp_path):
    module = _module()
    base, suite = _write(tmp_path, [
        {"uid": "e-0", "prediction": " Red ", "target": "red"},  # right after lower-casing and stripping
        {"uid": "e-1", "prediction": "blue", "target": "red"},
        {"uid": "e-2", "prediction": "green", "target": "green"},
        {"uid": "e-3", "prediction": "top-left", "target": "top-right"}])
    result = module.by_objects(base, suite)
    assert result == {"colour": {1: (1, 1), 3: (1, 2)}, "position": {2: (0, 1)}}
    text = module.table(result, ["position", "colour"])
    assert text.splitlines()[0] == "| skill | 1 object | 2 objects | 3 objects |"
    assert text.splitlines()[2:] == ["| position | - | 0.00 (1) | - |", "| colour | 1.00 (1) | - | 0.50 (2) |"]


def test_a_prediction_of_another_suite_is_an_error_naming_the_file_and_line(tmp_path):
    base, suite = _write(tmp_path, [{"uid": "e-9", "prediction": "red", "target": "red"}])
    with pytest.raises(KeyError, match=r"base_eval_predictions.jsonl, line 2: uid 'e-9'"):
        _module().by_objects(base, suite)
