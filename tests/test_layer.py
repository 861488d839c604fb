"""The adapted Linear: the update it adds, how it is computed, and where dropout applies (issue #2, 1)."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import cmlora
from cmlora import MixLoraConfig
from cmlora.layer import Linear
from cmlora.train import TrainConfig, build_adapter_model

from .conftest import ToyMLP, random_tokens, tiny_llama, tiny_llava


def slow_update(x, layer, adapter, index_a, index_b):
    """W x + s * B_x A_x x, one instance at a time, with the d_out x d_in matrix built explicitly."""
    settings = layer.mixlora_settings[adapter]
    out = []
    for b in range(x.shape[0]):
        a_x = layer.mixlora_factors_a[adapter][index_a[b]]      # r x d_in
        b_x = layer.mixlora_factors_b[adapter][index_b[b]].t()  # d_out x r
        out.append(layer.base_layer(x[b]) + settings.scaling * x[b] @ (b_x @ a_x).t())
    return torch.stack(out)


@pytest.mark.parametrize("routing", ["ifs", "ifs+cfs", "random"])
def test_forward_equals_per_instance_update(routing):
    model = get_peft_model(tiny_llama(), MixLoraConfig(num_factors=8, r=3, target_modules=["q_proj", "down_proj"],
                                                        routing=routing, init_weights=False))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    inputs, outputs = [], []
    def record(module, args, out):
        inputs.append(args[0])
        outputs.append(out)

    layer.register_forward_hook(record)
    with torch.no_grad(), cmlora.trace_routing(model) as trace:
        model(input_ids=random_tokens(3, 9))
    name = "model.layers.1.mlp.down_proj"
    expected = slow_update(inputs[0], layer, "default", trace.indices(name, "a"), trace.indices(name, "b"))
    torch.testing.assert_close(outputs[0], expected, atol=1e-5, rtol=1e-5)
    # instances really select different factors (otherwise the comparison above proves little)
    assert len({tuple(row) for row in trace.indices(name, "a").tolist()}) > 1 or routing == "ifs"


def test_two_dimensional_input_is_a_batch_of_one_position_sequences():
    torch.manual_seed(0)
    model = get_peft_model(ToyMLP(), MixLoraConfig(num_factors=6, r=2, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    x = torch.randn(5, 10)
    with torch.no_grad(), cmlora.trace_routing(model) as trace:
        out = layer(x)
    # each row routes on itself: the pooled representation of a one-position sequence is the row
    router = layer.mixlora_router["default"]
    expected_a = torch.topk(x @ router.weight_ifs[0].t(), 2).indices
    assert torch.equal(trace.indices("lin0", "a"), expected_a)
    expected = slow_update(x.unsqueeze(1), layer, "default", trace.indices("lin0", "a"), trace.indices("lin0", "b"))
    torch.testing.assert_close(out, expected.squeeze(1), atol=1e-5, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_per_instance_weight_matrix_is_materialised():
    batch, seq, d_in, d_out = 4, 3, 48, 40
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(d_in, d_out)),
                           MixLoraConfig(num_factors=8, r=4, target_modules=["0"], init_weights=False))
    x = torch.randn(batch, seq, d_in)
    with LargestTensor() as mode:
        model(x).sum().backward()
    # The frozen weight (d_in * d_out) exists anyway; a per-instance update would be batch times larger.
    assert mode.largest < batch * d_in * d_out
    assert mode.largest <= max(d_in * d_out, batch * seq * max(d_in, d_out))


def test_layers_below_mix_start_layer_are_plain_lora():
    model = get_peft_model(tiny_llama(layers=3), MixLoraConfig(num_factors=8, r=2, target_modules=["v_proj"],
                                                                mix_start_layer=2, init_weights=False))
    layers = model.base_model.model.model.layers
    plain, mixed = layers[1].self_attn.v_proj, layers[2].self_attn.v_proj
    assert plain.mixlora_factors_a["default"].shape[0] == 2 and "default" not in plain.mixlora_router
    assert mixed.mixlora_factors_a["default"].shape[0] == 8 and "default" in mixed.mixlora_router
    x = torch.randn(2, 5, 32)
    a, b = plain.mixlora_factors_a["default"], plain.mixlora_factors_b["default"]
    expected = plain.base_layer(x) + plain.mixlora_settings["default"].scaling * (x @ a.t()) @ b
    torch.testing.assert_close(plain(x), expected)


def test_dropout_applies_to_the_branch_but_not_to_the_router():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 16))
    model = get_peft_model(base, MixLoraConfig(num_factors=8, r=2, target_modules=["0"], lora_dropout=0.5,
                                               init_weights=False))
    x = torch.randn(6, 4, 16)
    model.eval()
    with cmlora.trace_routing(model) as eval_trace:
        eval_out = model(x)
    model.train()
    with cmlora.trace_routing(model) as train_trace:
        train_out = model(x)
    assert torch.equal(eval_trace.indices("0", "a"), train_trace.indices("0", "a"))
    assert torch.equal(eval_trace.indices("0", "b"), train_trace.indices("0", "b"))
    assert not torch.allclose(eval_out, train_out)


def test_only_linear_layers_can_be_adapted():
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="nn.Linear"):
        get_peft_model(model, MixLoraConfig(num_factors=4, r=2, target_modules=["0"]))
    assert issubclass(Linear, torch.nn.Module)


@pytest.mark.parametrize("pairing", ["score", "index"])
def test_with_every_factor_selected_index_pairing_is_plain_lora(pairing):
    """E == r: each instance selects every factor, so only the matching of A and B factors can differ."""
    torch.manual_seed(0)
    model = get_peft_model(ToyMLP(), MixLoraConfig(num_factors=4, r=4, target_modules=["lin0"], pairing=pairing,
                                                   init_weights=False))
    layer = model.base_model.model.lin0
    x = torch.randn(6, 3, 10)
    with torch.no_grad(), cmlora.trace_routing(model) as trace:
        out = layer(x)
    a, b = layer.mixlora_factors_a["default"], layer.mixlora_factors_b["default"]
    lora = layer.base_layer(x) + layer.mixlora_settings["default"].scaling * (x @ a.t()) @ b
    if pairing == "index":
        torch.testing.assert_close(out, lora)
    else:  # the paper's pairing: the i-th A factor by score with the i-th B factor by score, per instance
        assert len({tuple(row) for row in trace.indices("lin0", "a").tolist()}) > 1
        assert not torch.allclose(out, lora, atol=1e-3)


def test_pairing_must_be_a_known_mode():
    with pytest.raises(ValueError, match="pairing"):
        MixLoraConfig(num_factors=4, r=2, pairing="sorted")


def test_pairing_reaches_the_adapter_from_the_training_config_and_survives_saving(tmp_path):
    model = build_adapter_model(tiny_llava(), TrainConfig(adapter="mixlora", num_factors=4, r=2, pairing="index"))
    assert model.peft_config["default"].pairing == "index"
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llava(), tmp_path)
    layers = [m for m in loaded.modules() if isinstance(m, Linear)]
    assert layers and all(m.mixlora_settings["default"].pairing == "index" for m in layers)
