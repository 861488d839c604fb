"""benchmarks/validate.py: it times the records' check in one process against worker processes, on LLaVA-1.5's image
preprocessing by default and on given data with a given model."""

from __future__ import annotations

import json
import sys

from cmlora import vlm

from .benchmark_helpers import benchmark_module
from .synthetic_data import write_records


def run_benchmark(monkeypatch, capsys, *args: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["validate.py", "--rounds", "1", *args])
    benchmark_module("validate").main()
    return json.loads(capsys.readouterr().out)


def test_the_default_times_llava_1_5_shaped_records(monkeypatch, capsys):
    result = run_benchmark(monkeypatch, capsys, "--records", "6", "--workers", "0", "1")
    assert result["records"] == 6 and [setting["workers"] for setting in result["settings"]] == [0, 1]
    assert result["tokens_per_record"] > 576  # the image is 24 x 24 patches of 14 pixels
    assert result["settings"][0]["speedup_over_one_process"] == 1.0
    assert all(setting["seconds"] > 0 for setting in result["settings"])


def test_it_times_given_data_with_kept_items(tmp_path, monkeypatch, capsys):
    model = vlm.tiny(tmp_path / "tiny")
    data = write_records(tmp_path / "data", count=10)
    result = run_benchmark(monkeypatch, capsys, "--model", str(model), "--data", str(data), "--image-folder",
                           str(data.parent / "images"), "--template", "plain", "--workers", "0", "2",
                           "--keep-encoded")
    assert result["records"] == 10 and result["keep_encoded"] is True
    assert result["tokens_per_record"] < 576
