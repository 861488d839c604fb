"""benchmarks/packing.py on a tiny LLaVA, Qwen2-VL and Qwen2.5-VL: both forms of each batch give the same loss, packing
computes fewer tokens."""

from __future__ import annotations

import json
import sys

import pytest

from cmlora import vlm

from .benchmark_helpers import benchmark_module
from .synthetic_data import write_records

BUILDERS = {"llava": vlm.tiny, "qwen2_vl": vlm.tiny_qwen2_vl, "qwen2_5_vl": vlm.tiny_qwen2_5_vl}


@pytest.mark.parametrize(("family", "adapter"), [("llava", "lora"), ("llava", "mixlora"), ("qwen2_vl", "lora"),
                                                 ("qwen2_5_vl", "lora")])
def test_the_packing_benchmark_times_both_forms_of_the_same_batches(tmp_path, monkeypatch, capsys, family, adapter):
    model = BUILDERS[family](tmp_path / "tiny")
    data = write_records(tmp_path / "data", count=12)
    monkeypatch.setattr(sys, "argv", ["packing.py", "--data", str(data), "--image-folder", str(data.parent / "images"),
                                      "--model", str(model), "--batch-size", "4", "--batches", "2", "--warmup", "1",
                                      "--r", "2", "--adapter", adapter, "--num-factors", "4",
                                      "--template", "plain" if family == "llava" else "chat",
                                      "--replay-data", str(data)])  # replayed records, as the suite's config has
    benchmark_module("packing").main()
    result = json.loads(capsys.readouterr().out)
    assert result["largest_loss_difference"] < 1e-5
    assert result["tokens_per_step"]["packed"] < result["tokens_per_step"]["padded"]
    assert set(result["median_step_s"]) == {"padded", "packed"} and result["padded_over_packed_step_time"] > 0
    assert set(result["median_collate_s"]) == {"padded", "packed"}
    assert result["padded_over_packed_step_and_collate_time"] > 0
