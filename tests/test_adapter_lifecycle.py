"""PEFT integration: registration, config validation, save/load, adapters, merging (issue #2, behaviour 6)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import PeftType

import cmlora
from cmlora import MixLoraConfig
from cmlora._peft_registration import register

from .conftest import random_tokens, tiny_llama


def build(**kwargs):
    config = dict(num_factors=8, r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    config.update(kwargs)
    return get_peft_model(tiny_llama(), MixLoraConfig(**config)).eval()


@pytest.mark.parametrize("bad, message", [
    (dict(r=9, num_factors=8), "cannot exceed num_factors"),
    (dict(r=0), "positive integer"),
    (dict(routing="topk"), "routing must be one of"),
    (dict(pooling="mean"), "pooling must be one of"),
    (dict(router_grad="yes"), "router_grad must be one of"),
    (dict(cfs="other"), "cfs must be one of"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(router_aux_loss_coef=0.1), "needs a router that learns"),
    (dict(routing="task"), "needs num_tasks"),
    (dict(routing="random", router_grad="scores"), "no router to train"),
    (dict(lora_alpha=0), "lora_alpha must be positive"),
    (dict(mix_start_layer=-1), "mix_start_layer"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        MixLoraConfig(**bad)


def test_config_defaults_and_help():
    config = MixLoraConfig(num_factors=32, r=4)
    assert config.lora_alpha == 64.0  # 2E, the reference code's choice
    assert config.peft_type == PeftType.MIXLORA
    assert config.routing == "ifs+cfs" and config.pooling == "prompt" and config.router_grad == "none"
    from dataclasses import fields
    own = [f for f in fields(MixLoraConfig) if f.name in MixLoraConfig.__annotations__]
    assert all(f.metadata.get("help") for f in own)


def test_registration_is_idempotent_and_visible_to_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    register(MixLoraConfig, cmlora.MixLoraModel)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MIXLORA] is MixLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MIXLORA] is cmlora.MixLoraModel
    assert "MIXLORA" in list(PeftType) and PeftType("MIXLORA") is PeftType.MIXLORA


def test_save_and_load_in_a_fresh_process(tmp_path):
    model = build(routing="ifs+cfs", router_grad="none")
    ids = random_tokens(3, 8)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MIXLORA" and saved["num_factors"] == 8
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert any("mixlora_router" in k and k.endswith("weight_cfs") for k in keys)  # buffers are saved too
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, cmlora
        from peft import PeftModel
        from tests.conftest import tiny_llama
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = PeftModel.from_pretrained(tiny_llama(seed=0), {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            got = model(input_ids=io["ids"]).logits
        assert torch.equal(got, io["expected"]), (got - io["expected"]).abs().max()
        print("identical")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=_repo_root())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "identical" in result.stdout


def _repo_root():
    import pathlib
    return str(pathlib.Path(__file__).resolve().parents[1])


def test_loading_needs_trainable_flag_to_train(tmp_path):
    build(router_grad="scores").save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert any("mixlora_router" in n for n in names) and any("mixlora_factors_a" in n for n in names)


def base_logits_then_adapt():
    """Logits of the base model on some ids, then the same model with a (non-zero) MixLoRA adapter."""
    base = tiny_llama()
    ids = random_tokens(2, 6)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(base, MixLoraConfig(num_factors=8, r=2, target_modules=["q_proj"], init_weights=False))
    return model, ids, expected


def test_disable_adapter_gives_the_base_model_exactly():
    model, ids, expected = base_logits_then_adapt()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, expected)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, expected)


def test_several_adapters_and_set_adapter(tmp_path):
    model = build()
    model.add_adapter("other", MixLoraConfig(num_factors=4, r=1, target_modules=["q_proj"], routing="ifs",
                                             init_weights=False))
    ids = random_tokens(2, 6)
    with torch.no_grad():
        first = model(input_ids=ids).logits
        model.set_adapter("other")
        with cmlora.trace_routing(model) as trace:
            second = model(input_ids=ids).logits
        model.set_adapter("default")
        again = model(input_ids=ids).logits
    assert not torch.equal(first, second) and torch.equal(first, again)
    assert trace.indices("model.layers.0.self_attn.q_proj@other", "a").shape == (2, 1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_config.json").exists()


def test_merging_explains_why_it_is_impossible():
    model = build()
    for attempt in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="depends on the input"):
            attempt()


def test_unload_returns_the_base_model_without_hooks():
    model, ids, expected = base_logits_then_adapt()
    restored = model.unload()
    assert not restored._forward_pre_hooks and not restored._forward_hooks
    assert "generate" not in restored.__dict__
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, expected)


def test_layers_to_transform_limits_the_adapted_layers():
    model = build(layers_to_transform=[1])
    adapted = [n for n, m in model.named_modules() if isinstance(m, cmlora.MixLoraLayer)]
    assert adapted and all(".layers.1." in n for n in adapted)


def test_bfloat16_base_model_trains_and_generates():
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, MixLoraConfig(num_factors=8, r=2, target_modules=["q_proj", "down_proj"],
                                               router_grad="scores", init_weights=False))
    ids = random_tokens(2, 6)
    labels = ids.clone()
    labels[:, :3] = -100
    model.train()
    out = model(input_ids=ids, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "mixlora_router" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, 8)
