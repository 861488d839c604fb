"""benchmarks/layer.py --quick: every variant is timed, the packed MixLoRA variant among them."""

from __future__ import annotations

import json

from .benchmark_helpers import benchmark_module


def test_the_layer_benchmark_times_every_variant_packed_rows_included(capsys):
    benchmark_module("layer").main(["--quick", "--device", "cpu", "--warmup", "0"])
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert set(result["variants"]) == {"base", "mixlora", "mixlora_scores", "mixlora_scores_index",
                                       "mixlora_packed", "peft_lora", "materialised"}
    assert result["ratios"]["time_mixlora_packed_over_peft_lora"] > 0
