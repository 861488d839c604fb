"""Importing reference-code (VT-NLP/MixLoRA) adapters (issue #2, behaviour 8)."""

import pytest
import torch
from peft import get_peft_model

from cmlora.compat.vtnlp import config_from_reference_args, load_reference_adapter

from .conftest import random_tokens, tiny_llama

E, R, D, FF = 6, 2, 32, 64
SHAPES = {"self_attn.q_proj": (D, D), "self_attn.v_proj": (D, 16), "mlp.down_proj": (FF, D)}


def reference_state_dict(cond_type="input_lora_a_param", layers=2, plain_layers=(), seed=0):
    """A random state dict in the reference code's layout (method.md section 7)."""
    generator = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.zeros(3)}  # non-adapter entries are ignored
    for n in range(layers):
        for module, (d_in, d_out) in SHAPES.items():
            p = f"base_model.model.model.layers.{n}.{module}."
            state[p + "weight"] = torch.zeros(1)
            if n in plain_layers:
                state[p + "lora_A.default.0"] = torch.randn(R, d_in, generator=generator)
                state[p + "lora_B.default.0"] = torch.randn(R, d_out, generator=generator)
                continue
            for e in range(E):
                state[p + f"lora_A.default.{e}"] = torch.randn(1, d_in, generator=generator)
                state[p + f"lora_B.default.{e}"] = torch.randn(1, d_out, generator=generator)
            state[p + "cmoa_selector.loraA_selector.weight"] = torch.randn(E, d_in, generator=generator)
            if cond_type == "input":
                state[p + "cmoa_selector.loraB_selector.weight"] = torch.randn(E, d_in, generator=generator)
            else:
                extra = p + "cmoa_loarB_extra_selector."
                state[extra + "loraB_selector.weight"] = torch.randn(E, d_in, generator=generator)
                state[extra + "loraA_param2loraB_selector.weight"] = torch.randn(E, R * d_in, generator=generator)
    return state


def reference_layer_output(x, base_layer, state, prefix, cond_type, alpha, ifs_weight):
    """The reference forward of one layer, written from method.md 3.1-3.3 (its unmasked mean, its CFS)."""
    xbar = x.mean(dim=1)
    factors_a = torch.cat([state[prefix + f"lora_A.default.{e}"] for e in range(E)])
    factors_b = torch.cat([state[prefix + f"lora_B.default.{e}"] for e in range(E)])
    idx_a = torch.topk(xbar @ state[prefix + "cmoa_selector.loraA_selector.weight"].t(), R).indices
    lora_a = factors_a[idx_a]                                  # [b, r, d_in]
    if cond_type == "input":
        idx_b = torch.topk(xbar @ state[prefix + "cmoa_selector.loraB_selector.weight"].t(), R).indices
    else:
        extra = prefix + "cmoa_loarB_extra_selector."
        w = state[extra + "loraA_param2loraB_selector.weight"].reshape(E, R, -1).permute(1, 2, 0)  # r d E
        logits2 = torch.einsum("brd,rfe->bre", lora_a, w).softmax(-1).sum(1)
        scores = (xbar @ state[extra + "loraB_selector.weight"].t()).softmax(-1) + ifs_weight * logits2.softmax(-1)
        idx_b = torch.topk(scores, R).indices
    delta = torch.matmul(lora_a.transpose(1, 2), factors_b[idx_b])  # [b, d_in, d_out], as the reference does
    return base_layer(x) + torch.matmul(x, delta) * (alpha / R)


@pytest.mark.parametrize("cond_type", ["input", "input_lora_a_param"])
def test_imported_model_computes_what_the_reference_computes(cond_type):
    args = {"cond_type": cond_type, "n_experts": E, "n_selected": R, "lora_alpha": 2 * E, "ifs_weight": 0.7}
    config = config_from_reference_args(args, target_modules=list(SHAPES))
    model = get_peft_model(tiny_llama(), config).eval()
    state = reference_state_dict(cond_type)
    assert load_reference_adapter(model, state) == 2 * len(SHAPES)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    seen = {}

    def record(module, args, out):
        seen["x"], seen["out"] = args[0], out

    layer.register_forward_hook(record)
    with torch.no_grad():
        model(input_ids=random_tokens(3, 7), attention_mask=torch.ones(3, 7, dtype=torch.long))
        expected = reference_layer_output(seen["x"], layer.base_layer, state,
                                          "base_model.model.model.layers.1.mlp.down_proj.", cond_type, 2 * E, 0.7)
    torch.testing.assert_close(seen["out"], expected, atol=1e-4, rtol=1e-4)


def test_plain_layers_below_mix_start_layer_are_imported():
    config = config_from_reference_args({"n_experts": E, "n_selected": R, "lora_alpha": 4, "mix_start_layer": 1},
                                        target_modules=list(SHAPES))
    model = get_peft_model(tiny_llama(), config)
    state = reference_state_dict(plain_layers=(0,))
    load_reference_adapter(model, state)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.mixlora_factors_a["default"], state["base_model.model.model.layers.0.self_attn.q_proj."
                                                                 "lora_A.default.0"])


def _model():
    config = config_from_reference_args({"n_experts": E, "n_selected": R, "lora_alpha": 12},
                                        target_modules=list(SHAPES))
    return get_peft_model(tiny_llama(), config)


def test_missing_key_is_named():
    state = reference_state_dict()
    del state["base_model.model.model.layers.1.mlp.down_proj.lora_B.default.4"]
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.lora_B\.default\.4"):
        load_reference_adapter(_model(), state)


def test_shape_mismatch_is_named():
    state = reference_state_dict()
    key = "base_model.model.model.layers.0.self_attn.v_proj.cmoa_selector.loraA_selector.weight"
    state[key] = torch.zeros(E + 1, D)
    with pytest.raises(ValueError, match=r"loraA_selector.weight' has shape \[7, 32\], expected \[6, 32\]"):
        load_reference_adapter(_model(), state)


def test_reference_modules_without_a_layer_are_reported():
    config = config_from_reference_args({"n_experts": E, "n_selected": R, "lora_alpha": 12},
                                        target_modules=["q_proj"])
    with pytest.raises(ValueError, match="have no MixLoRA layer"):
        load_reference_adapter(get_peft_model(tiny_llama(), config), reference_state_dict())


def test_unknown_cond_type_is_rejected():
    with pytest.raises(ValueError, match="cond_type"):
        config_from_reference_args({"cond_type": "attr", "n_experts": E, "n_selected": R, "lora_alpha": 1})
