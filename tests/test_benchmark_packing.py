"""benchmarks/packing.py on a tiny LLaVA and a tiny Qwen2-VL: both forms of each batch give the same loss, packing
computes fewer tokens."""

from __future__ import annotations

import json
import sys

import pytest

from cmlora import vlm

from .benchmark_helpers import benchmark_module
from .synthetic_data import write_records


@pytest.mark.parametrize(("family", "adapter"), [("llava", "lora"), ("llava", "mixlora"), ("qwen2_vl", "lora")])
def test_the_packing_benchmark_times_both_forms_of_the_same_batches(tmp_path, monkeypatch, capsys, family, adapter):
    model = (vlm.tiny if family == "llava" else vlm.tiny_qwen2_vl)(tmp_path / "tiny")
    data = write_records(tmp_path / "data", count=12)
    monkeypatch.setattr(sys, "argv", ["packing.py", "--data", str(data), "--image-folder", str(data.parent / "images"),
                                      "--model", str(model), "--batch-size", "4", "--batches", "2", "--warmup", "1",
                                      "--r", "2", "--adapter", adapter, "--num-factors", "4",
                                      "--template", "plain" if family == "llava" else "chat"])
    benchmark_module("packing").main()
    result = json.loads(capsys.readouterr().out)
    assert result["largest_loss_difference"] < 1e-5
    assert result["tokens_per_step"]["packed"] < result["tokens_per_step"]["padded"]
    assert set(result["median_step_s"]) == {"padded", "packed"} and result["padded_over_packed_step_time"] > 0
    assert set(result["median_collate_s"]) == {"padded", "packed"}
    assert result["padded_over_packed_step_and_collate_time"] > 0
