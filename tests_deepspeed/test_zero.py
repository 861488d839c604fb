"""DeepSpeed ZeRO-2 and ZeRO-3 (2 CPU processes) train the same adapter as one process with the same global batch.

Run with `make test-deepspeed` (installs deepspeed into .venv; its ops compile on first use, about 30 s).
ZeRO-3 runs with a parameter persistence threshold of 0, so every parameter, the factor pools and routers
included, is partitioned and must be gathered where the MixLoRA layers index it.
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cmlora import vlm
from cmlora.train import TrainConfig, train
from tests.synthetic_data import write_records

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    model_dir = vlm.tiny(root / "tiny-llava")
    data = write_records(root / "data", count=8)
    common = dict(model=str(model_dir), data=str(data), image_folder=str(data.parent / "images"), max_length=128,
                  num_factors=8, r=2, lora_dropout=0.0, learning_rate=1e-3, max_steps=3, logging_steps=1,
                  save_steps=100, use_cpu=True, seed=5, router_grad="scores")
    train(TrainConfig(**common, output_dir=str(root / "single"), batch_size=4, gradient_accumulation_steps=2))
    return root, common, load_file(root / "single" / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_single_process(reference, stage):
    root, common, expected = reference
    zero = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    if stage == 3:
        zero["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    zero_path = root / f"zero{stage}.json"
    zero_path.write_text(json.dumps(zero))
    config = TrainConfig(**common, output_dir=str(root / f"zero{stage}"), batch_size=4, deepspeed=str(zero_path))
    config_path = root / f"zero{stage}.yaml"
    config_path.write_text(yaml.safe_dump(asdict(config)))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29600 + stage),
         "-m", "cmlora", "train", "--config", str(config_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    got = load_file(root / f"zero{stage}" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=2e-5, rtol=1e-4)
    factors_b = [key for key in expected if "mixlora_factors_b" in key]
    assert factors_b and all(got[key].abs().sum() > 0 for key in factors_b)
