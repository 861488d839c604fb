"""The training recipe on a tiny LLaVA: artifacts, load_run, resume after SIGKILL (issue #3)."""

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import cmlora
from cmlora import vlm
from cmlora.cli import parse_overrides
from cmlora.train import TrainConfig, load_config, load_run, train

from .synthetic_data import write_records

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model_dir = vlm.tiny(root / "tiny-llava")
    data = write_records(root / "data", count=16)
    return root, model_dir, data


def tiny_config(workspace, name, **overrides):
    root, model_dir, data = workspace
    values = dict(model=str(model_dir), data=str(data), image_folder=str(data.parent / "images"),
                  output_dir=str(root / name), max_length=128, num_factors=8, r=2, lora_dropout=0.05,
                  learning_rate=1e-3, batch_size=4, max_steps=6, logging_steps=2, save_steps=2, use_cpu=True,
                  seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def test_mixlora_run_writes_a_loadable_run(workspace):
    run = train(tiny_config(workspace, "mixlora"))
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any("mixlora_factors_b" in k for k in weights)
    assert any("multi_modal_projector" in k for k in weights)  # the projector is trained and saved
    saved = load_config(run / "config.yaml")
    assert saved.adapter == "mixlora" and saved.max_steps == 6
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["router_usage_entropy"] <= 1 and metrics["train_loss"] > 0
    history = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    assert any("loss" in h and "router_usage_entropy" in h for h in history)
    model, processor = load_run(run)
    assert isinstance(model.base_model, cmlora.MixLoraModel)
    factor = model.base_model.model.model.language_model.layers[0].self_attn.q_proj.mixlora_factors_b["default"]
    assert factor.abs().sum() > 0
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What colour is the image?"}]}], add_generation_prompt=True)
    from PIL import Image
    inputs = processor(images=[Image.new("RGB", (32, 32), "red")], text=[prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_lora_and_full_runs(workspace, adapter):
    run = train(tiny_config(workspace, adapter, adapter=adapter, max_steps=2, save_steps=100))
    model, _ = load_run(run)
    if adapter == "lora":
        assert (run / "adapter" / "adapter_config.json").exists()
        assert "LORA" in (run / "adapter" / "adapter_config.json").read_text()
    else:
        assert (run / "model" / "config.json").exists()
        base, _ = vlm.load(workspace[1])
        name = "model.language_model.layers.0.mlp.down_proj.weight"
        assert not torch.equal(dict(model.named_parameters())[name], dict(base.named_parameters())[name])
        name = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"  # frozen in full fine-tuning
        assert torch.equal(dict(model.named_parameters())[name], dict(base.named_parameters())[name])


@pytest.mark.parametrize("adapter", ["lora", "mixlora"])
def test_train_output_head_trains_saves_and_reloads_the_output_layer(workspace, adapter):
    run = train(tiny_config(workspace, f"{adapter}-head", adapter=adapter, max_steps=2, save_steps=100,
                            train_output_head=True))
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    [head_key] = [k for k in saved if k.endswith(".lm_head.weight")]
    base, _ = vlm.load(workspace[1])
    assert not torch.equal(saved[head_key], base.lm_head.weight)  # trained
    model, _ = load_run(run)
    assert torch.equal(model.get_output_embeddings().weight, saved[head_key])  # and what a loaded run uses
    assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)  # embeddings kept
    without = load_file(train(tiny_config(workspace, f"{adapter}-no-head", adapter=adapter, max_steps=2,
                                          save_steps=100)) / "adapter" / "adapter_model.safetensors")
    assert not any("lm_head" in k for k in without)


def test_pack_sequences_trains_lora_to_the_padded_runs_weights(workspace):
    # plain: records of about 16 tokens, so a batch of 4 packs into one row of max_length 128
    runs = {pack: train(tiny_config(workspace, f"lora-pack-{pack}", adapter="lora", max_steps=3, save_steps=100,
                                    template="plain", lora_dropout=0.0, pack_sequences=pack))
            for pack in (False, True)}  # dropout draws by shape
    padded, packed = (load_file(runs[pack] / "adapter" / "adapter_model.safetensors") for pack in (False, True))
    base, _ = vlm.load(workspace[1])
    assert padded.keys() == packed.keys()
    key = next(k for k in padded if k.endswith("multi_modal_projector.linear_1.weight"))
    assert not torch.equal(padded[key], base.model.multi_modal_projector.linear_1.weight)  # trained
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], atol=1e-4, rtol=1e-3, msg=name)
    assert load_config(runs[True] / "config.yaml").pack_sequences


def test_dataloader_workers_check_the_records_and_train_to_the_same_weights(workspace, monkeypatch):
    from cmlora.data import InstructionDataset

    validate, workers_used = InstructionDataset.validate, []

    def spy(self, workers=0):
        workers_used.append(workers)
        return validate(self, workers=workers)

    monkeypatch.setattr(InstructionDataset, "validate", spy)
    runs = {workers: train(tiny_config(workspace, f"lora-workers-{workers}", adapter="lora", max_steps=3,
                                       save_steps=100, lora_dropout=0.0, keep_encoded=True,
                                       dataloader_num_workers=workers))
            for workers in (0, 2)}
    assert workers_used == [0, 2]
    alone, in_workers = (load_file(runs[workers] / "adapter" / "adapter_model.safetensors") for workers in (0, 2))
    assert alone.keys() == in_workers.keys()
    for name in alone:
        torch.testing.assert_close(in_workers[name], alone[name], msg=name)


def test_pack_sequences_trains_mixlora_to_the_padded_runs_weights(workspace):
    runs = {pack: train(tiny_config(workspace, f"mixlora-pack-{pack}", adapter="mixlora", max_steps=3,
                                    save_steps=100, template="plain", lora_dropout=0.0, pack_sequences=pack))
            for pack in (False, True)}
    padded, packed = (load_file(runs[pack] / "adapter" / "adapter_model.safetensors") for pack in (False, True))
    assert padded.keys() == packed.keys()
    key = next(k for k in padded if "mixlora_factors_b" in k)
    assert padded[key].abs().sum() > 0  # trained (B starts at zero)
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], atol=1e-4, rtol=1e-3, msg=name)


def test_pack_sequences_refuses_reference_pooling_and_models_it_does_not_support(workspace, monkeypatch):
    with pytest.raises(ValueError, match="pooling 'reference' averages a padded row"):
        TrainConfig(adapter="mixlora", pooling="reference", pack_sequences=True)
    monkeypatch.setattr("cmlora.train.PACKABLE_MODEL_TYPES", ("qwen2_vl",))
    with pytest.raises(ValueError, match=r"is a 'llava' model; packed rows are supported for \['qwen2_vl'\]"):
        train(tiny_config(workspace, "lora-pack-refused", adapter="lora", pack_sequences=True))


def test_train_output_head_refuses_a_head_tied_to_the_input_embeddings(workspace):
    from cmlora.train import output_head_name

    model, _ = vlm.load(workspace[1])
    assert output_head_name(model) == "lm_head"
    model.lm_head.weight = model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="ties its output layer to its input embeddings"):
        output_head_name(model)


def test_config_errors_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: x\nnum_factor: 3\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown config key\(s\) \['num_factor'\]"):
        load_config(path)
    assert parse_overrides(["--r", "8", "--learning-rate", "4e-5", "--target_modules", "[q_proj, v_proj]"]) == {
        "r": 8, "learning_rate": 4e-5, "target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(ValueError, match="adapter must be one of"):
        TrainConfig(adapter="qlora")


def test_train_command_overrides_a_field_whose_name_starts_another_flag(workspace):
    from cmlora.cli import main

    config = tiny_config(workspace, "cli-r", adapter="lora", max_steps=1, save_steps=100)
    path = Path(config.output_dir).with_suffix(".yaml")
    path.write_text(yaml.safe_dump({k: v for k, v in asdict(config).items() if k != "r"}))
    assert main(["train", "--config", str(path), "--r", "3"]) == 0  # "--r" once read as an abbreviated --resume
    assert load_config(Path(config.output_dir) / "config.yaml").r == 3


KILLER = """
import os, signal, sys
from transformers import TrainerCallback
from cmlora.train import load_config, train

class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

config = load_config({config!r})
train(config, resume={resume}, callbacks=[KillAt()] if {kill_at} else None)
"""


def run_script(config_path, kill_at=0, resume=False):
    code = textwrap.dedent(KILLER).format(config=str(config_path), kill_at=kill_at, resume=resume)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_resume_after_sigkill_matches_an_uninterrupted_run(workspace, tmp_path):
    from dataclasses import asdict

    import yaml

    configs = {}
    for name in ("straight", "killed"):
        config = tiny_config(workspace, f"resume-{name}", max_steps=8, save_steps=2, routing="ifs+cfs",
                             router_grad="scores", router_noise=0.5)
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(asdict(config)))
    straight = run_script(configs["straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_script(configs["killed"], kill_at=5)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = Path(load_config(configs["killed"]).output_dir)
    assert not (run / "adapter").exists()
    # a checkpoint cut short by the kill (no trainer_state.json) must be ignored on resume
    (run / "checkpoints" / "checkpoint-6").mkdir()
    resumed = run_script(configs["killed"], resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-4" in resumed.stdout
    a = load_file(Path(load_config(configs["straight"]).output_dir) / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs from the uninterrupted run"


def write_replay(workspace, name, ids, answer="red"):
    root, _, data = workspace
    records = [{"id": i, "image": "img0.png", "task_name": "pretrain",
                "conversations": [{"from": "human", "value": "<image>\ndescribe the image ."},
                                  {"from": "gpt", "value": answer}]} for i in ids]
    path = root / f"{name}.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_replay_mixes_a_seeded_share_of_another_file_into_training(workspace):
    from cmlora.data import DataError, load_records
    from cmlora.train import replay_records

    replay = write_replay(workspace, "replay", [f"p{i}" for i in range(10)])
    config = tiny_config(workspace, "replay", replay_data=replay, replay_fraction=0.5, adapter="lora", max_steps=2,
                         save_steps=100)
    records, _ = load_records(config.data, config.image_folder)
    drawn = replay_records(config, records)
    assert len(drawn) == 8 and len({r.id for r in drawn}) == 8 and all(r.id.startswith("p") for r in drawn)
    assert [r.id for r in replay_records(config, records)] == [r.id for r in drawn]
    other = replay_records(tiny_config(workspace, "replay", replay_data=replay, replay_fraction=0.5, seed=4), records)
    assert [r.id for r in other] != [r.id for r in drawn]
    with pytest.raises(DataError, match=r"replay\.json: replay_fraction 1\.0 asks for 16 records .* are 10"):
        replay_records(tiny_config(workspace, "replay", replay_data=replay, replay_fraction=1.0), records)
    clash = write_replay(workspace, "clash", ["p0", "r3"])
    with pytest.raises(DataError, match=r"clash\.json\[#1\]: record 'r3': field 'id': also used by .*train\.json"):
        replay_records(tiny_config(workspace, "replay", replay_data=clash, replay_fraction=0.1), records)
    with pytest.raises(ValueError, match="replay_fraction must be in"):
        tiny_config(workspace, "replay", replay_fraction=0)
    # A list of files is one pool: with a second file of 10 the same share now asks for 16 of 20.
    more = write_replay(workspace, "more", [f"q{i}" for i in range(10)])
    pooled = replay_records(tiny_config(workspace, "replay", replay_data=[replay, more], replay_fraction=1.0), records)
    assert len(pooled) == 16 and {r.id[0] for r in pooled} == {"p", "q"}
    with pytest.raises(ValueError, match="replay_data must be a file or a non-empty list of files"):
        tiny_config(workspace, "replay", replay_data=[])
    run = train(config)
    assert json.loads((run / "task_names.json").read_text()) == ["colour", "pretrain", "yes_no"]


def test_replay_single_turns_replays_each_question_as_a_record_of_its_own(workspace):
    from cmlora.data import load_records
    from cmlora.train import replay_records

    root, _, _ = workspace
    conversations = [{"id": f"c{i}", "image": "img0.png", "task_name": "pretrain", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is it ?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "describe the image ."}, {"from": "gpt", "value": "a large red square ."}]}
        for i in range(3)]
    (root / "conversations.json").write_text(json.dumps(conversations))
    config = tiny_config(workspace, "single", replay_data=str(root / "conversations.json"), replay_fraction=0.375,
                         replay_single_turns=True)
    records, _ = load_records(config.data, config.image_folder)
    drawn = replay_records(config, records)
    assert len(drawn) == 6 and {r.id for r in drawn} == {f"c{i}#{k}" for i in range(3) for k in range(2)}
    for record in drawn:
        assert len(record.conversations) == 2 and record.image is not None
        assert record.conversations[0].text in ("<image>\nwhat colour is it ?", "<image>\ndescribe the image .")
    whole = replay_records(tiny_config(workspace, "whole", replay_data=str(root / "conversations.json"),
                                       replay_fraction=0.1875), records)
    assert sorted(r.id for r in whole) == ["c0", "c1", "c2"] and len(whole[0].conversations) == 4


def mixed_batches_per_epoch(workspace, name, group_by_length):
    """How many of one epoch's training batches (of 2) mix a short record with a long one: 64 short records and 64
    long replay records (40 more answer tokens)."""
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            self.loader = train_dataloader

    root = workspace[0]
    data = write_records(root / "data64", count=64)
    replay = write_replay(workspace, f"long-{name}", [f"p{i}" for i in range(64)], answer=" ".join(["red"] * 40))
    capture = Capture()
    train(tiny_config(workspace, name, adapter="lora", data=str(data), image_folder=str(data.parent / "images"),
                      replay_data=replay, replay_fraction=1.0, batch_size=2, max_steps=1, save_steps=100,
                      group_by_length=group_by_length), callbacks=[capture])
    lengths = [batch["attention_mask"].sum(dim=1) for batch in capture.loader]
    assert sum(len(pair) for pair in lengths) == 128  # every record once
    return sum(int(pair.max() - pair.min() > 20) for pair in lengths)


def test_group_by_length_batches_records_of_similar_length(workspace):
    # transformers' sampler sorts pools of 16 batches here (min(128 // (4 x 2), 50)): at most one mixed batch in
    # each of the 4 pools; random batches of a half-short, half-long set mix about half the time.
    assert mixed_batches_per_epoch(workspace, "grouped", True) <= 4 < 20 < mixed_batches_per_epoch(
        workspace, "shuffled", False)


@pytest.mark.parametrize("name", ["tiny.yaml", "suite_lora.yaml", "llava7b_lora.yaml", "llava7b_mixlora.yaml"])
def test_the_shipped_configs_load(name):
    from cmlora.train import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert config.r > 0 and config.learning_rate > 0


@pytest.mark.parametrize(("adapter", "b_side"), [("lora", "lora_B"), ("mixlora", "mixlora_factors_b")])
def test_lora_plus_ratio_trains_the_b_side_at_its_multiple_of_the_learning_rate(workspace, adapter, b_side):
    from transformers import TrainerCallback

    seen = {}

    class Groups(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            names = {id(p): n for n, p in model.named_parameters()}
            seen["groups"] = [(group["initial_lr"], [names[id(p)] for p in group["params"]])
                              for group in optimizer.param_groups]
            seen["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)

    train(tiny_config(workspace, f"{adapter}-plus", adapter=adapter, max_steps=1, save_steps=100,
                      lora_plus_ratio=16.0), callbacks=[Groups()])
    in_groups = sorted(name for _, names in seen["groups"] for name in names)
    assert in_groups == seen["trainable"]  # every trainable parameter in exactly one group
    for lr, names in seen["groups"]:
        b_names = [n for n in names if b_side in n]
        assert b_names in ([], names)  # a group is all B side or none of it
        assert lr == pytest.approx(1e-3 * 16 if b_names else 1e-3)
    assert any(b_side in n for lr, names in seen["groups"] if lr > 1e-3 for n in names)
    assert any("multi_modal_projector" in n for lr, names in seen["groups"] if lr == 1e-3 for n in names)


def test_lora_plus_ratio_is_checked():
    with pytest.raises(ValueError, match="lora_plus_ratio must be > 0"):
        TrainConfig(adapter="lora", lora_plus_ratio=0.0)
    with pytest.raises(ValueError, match="not 'full'"):
        TrainConfig(adapter="full", lora_plus_ratio=4.0)


def epoch_tasks(workspace, name, **overrides):
    """The task of every record one epoch of a MixLoRA run's training loader gives (batches carry task ids)."""
    from transformers import TrainerCallback

    from cmlora.context import TASK_IDS_KWARG

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            self.loader = train_dataloader

    capture = Capture()
    run = train(tiny_config(workspace, name, adapter="mixlora", routing="task", max_steps=1, save_steps=100,
                            **overrides), callbacks=[capture])
    names = json.loads((run / "task_names.json").read_text())
    return Counter(names[i] for batch in capture.loader for i in batch[TASK_IDS_KWARG].tolist())


def test_task_weights_move_the_mix_of_an_epoch_not_its_length(workspace, capsys):
    assert epoch_tasks(workspace, "unweighted") == {"colour": 8, "yes_no": 8}
    assert epoch_tasks(workspace, "weighted", task_weights={"colour": 3}) == {"colour": 12, "yes_no": 4}
    assert "task_weights, records -> draws an epoch: colour 8 -> 12; each other task's records drawn 0.50" in (
        capsys.readouterr().out)
    assert parse_overrides(["--task_weights", "{colour: 3, yes_no: 0.5}"]) == {
        "task_weights": {"colour": 3, "yes_no": 0.5}}
    with pytest.raises(ValueError, match=r"train\.json: task_weights: no training record has task_name \['color'\]"):
        train(tiny_config(workspace, "typo", adapter="lora", max_steps=1, task_weights={"color": 3}))
    with pytest.raises(ValueError, match="two samplers"):
        tiny_config(workspace, "both", task_weights={"colour": 3}, group_by_length=True)
    with pytest.raises(ValueError, match="non-empty mapping"):
        tiny_config(workspace, "empty", task_weights={})
