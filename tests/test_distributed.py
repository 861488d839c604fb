"""Data-parallel training through torchrun (2 CPU processes, gloo) matches one process with the same global batch;
a distributed rank's exit skips the interpreter's teardown."""

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

from .synthetic_data import write_records

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_ddp_matches_gradient_accumulation(tmp_path):
    model_dir = vlm.tiny(tmp_path / "tiny-llava")
    data = write_records(tmp_path / "data", count=8)
    # Every optimizer step sees the whole dataset (global batch 8), so the data order cannot matter.
    common = dict(model=str(model_dir), data=str(data), image_folder=str(data.parent / "images"), max_length=128,
                  num_factors=8, r=2, lora_dropout=0.0, learning_rate=1e-3, max_steps=3, logging_steps=1,
                  save_steps=100, use_cpu=True, seed=5, router_grad="scores")
    single = TrainConfig(**common, output_dir=str(tmp_path / "single"), batch_size=4, gradient_accumulation_steps=2)
    train(single)
    ddp = TrainConfig(**common, output_dir=str(tmp_path / "ddp"), batch_size=4, gradient_accumulation_steps=1)
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(asdict(ddp)))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "cmlora", "train", "--config", str(config_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # Two processes x 4 examples cover the 8-example dataset in one step: 3 steps are 3 epochs (1.5 in one process).
    history = [json.loads(line) for line in (tmp_path / "ddp" / "log_history.jsonl").read_text().splitlines()]
    assert history[-1]["epoch"] == 3.0 and history[-1]["step"] == 3
    a = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)
    factors_b = [key for key in a if "mixlora_factors_b" in key]  # zero at initialisation: they must have moved
    assert factors_b and all(a[key].abs().sum() > 0 for key in factors_b)


# A program that runs `cli.run` with `main` replaced: its exit code, an atexit handler, and an object whose
# finaliser only the interpreter's teardown calls.
EXIT_PROBE = """
import atexit
from cmlora import cli

class Finalised:
    def __del__(self):
        print("teardown", flush=True)

kept = Finalised()
atexit.register(print, "atexit")
cli.main = lambda: 3
cli.run()
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_distributed_rank_exits_with_its_code_and_atexit_handlers_but_without_the_teardown(world_size):
    result = subprocess.run([sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "WORLD_SIZE": world_size})
    assert result.returncode == 3, result.stderr
    expected = ["atexit", "teardown"] if world_size == "1" else ["atexit"]
    assert result.stdout.split() == expected
