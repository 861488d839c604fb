"""benchmarks/encoding.py on a tiny LLaVA and a tiny Idefics3: it times encode against the processor call inside it."""

from __future__ import annotations

import json
import sys

import pytest

from cmlora import vlm

from .benchmark_helpers import benchmark_module
from .synthetic_data import write_records


@pytest.mark.parametrize(("build", "template"), [(vlm.tiny, "plain"), (vlm.tiny_idefics3, "chat")])
def test_the_encoding_benchmark_times_encode_and_the_processor_call(tmp_path, monkeypatch, capsys, build, template):
    model = build(tmp_path / "tiny")
    data = write_records(tmp_path / "data", count=12)
    monkeypatch.setattr(sys, "argv", ["encoding.py", "--data", str(data), "--image-folder", str(data.parent / "images"),
                                      "--model", str(model), "--template", template, "--repeats", "1"])
    benchmark_module("encoding").main()
    result = json.loads(capsys.readouterr().out)
    assert result["records"] == 12
    assert result["encode_ms_per_record"] > 0 and result["processor_call_ms_per_record"] > 0
    assert result["encode_over_processor_call"] > 0
