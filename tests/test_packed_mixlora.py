"""MixLoRA on packed rows: each packed record routes and computes as it does in a padded row of its own."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from cmlora import MixLoraConfig, trace_routing, vlm
from cmlora.context import SEGMENT_IDS_KWARG, TASK_IDS_KWARG, PackedSegments
from cmlora.data import InstructionCollator, InstructionDataset

from .data_helpers import mixed_records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, processor = vlm.load(vlm.tiny(tmp_path_factory.mktemp("tiny_llava")))
    return model.eval(), processor


@pytest.fixture(scope="module")
def items(tiny, tmp_path_factory):
    _, processor = tiny
    dataset = InstructionDataset(mixed_records(tmp_path_factory.mktemp("data")), processor)
    # repeated items with and without images, so rows hold several records and images fall between them
    return [dataset[0], dataset[1], dataset[2], dataset[2], dataset[1], dataset[0]]


def collators(processor, items):
    pad = processor.tokenizer.pad_token_id
    width = max(len(item["input_ids"]) for item in items) * 3
    padded = InstructionCollator(pad)(items)
    packed = InstructionCollator(pad, pack_width=width, segment_ids_key=SEGMENT_IDS_KWARG)(items)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several records share a row
    return padded, packed


def loss_gradients_and_routes(model, batch):
    model.zero_grad()
    with trace_routing(model) as trace:
        loss = model(**batch).loss
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    routes = {layer: (trace.indices(layer, "a"), trace.indices(layer, "b")) for layer in trace.layers}
    return loss.detach(), gradients, routes


@pytest.mark.parametrize("settings", [
    {"routing": "ifs+cfs", "router_grad": "none", "pooling": "prompt"},
    {"routing": "ifs", "router_grad": "scores", "pooling": "all", "router_aux_loss_coef": 0.01},
    {"routing": "ifs+cfs", "router_grad": "straight_through", "pooling": "prompt", "mix_start_layer": 1},
    {"routing": "task", "router_grad": "scores", "pooling": "prompt", "num_tasks": 3},
    {"routing": "ifs+cfs", "router_grad": "scores", "pooling": "prompt", "pairing": "index"},
], ids=["ifs+cfs", "ifs-scores-all-aux", "straight-through-mix-start", "task", "pairing-index"])
def test_packed_records_route_and_train_as_in_padded_rows(tiny, items, settings):
    base, processor = tiny
    model = get_peft_model(copy.deepcopy(base), MixLoraConfig(num_factors=8, r=2, init_weights=False, **settings))
    padded, packed = collators(processor, items)
    assert torch.equal(packed[TASK_IDS_KWARG], padded[TASK_IDS_KWARG])  # one per record, in item order
    model.train()
    loss, gradients, routes = loss_gradients_and_routes(model, padded)
    packed_loss, packed_gradients, packed_routes = loss_gradients_and_routes(model, packed)
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=1e-5)
    assert any("mixlora_factors_b" in name for name in gradients) and gradients.keys() == packed_gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(packed_gradients[name], gradient, atol=1e-5, rtol=1e-4, msg=name)
    assert routes.keys() == packed_routes.keys() and routes
    for layer, (index_a, index_b) in routes.items():  # the same factors for each record, in record order
        assert index_a.shape[0] == len(items)
        assert torch.equal(packed_routes[layer][0], index_a) and torch.equal(packed_routes[layer][1], index_b)


def test_without_segment_ids_a_packed_row_is_routed_as_one_instance(tiny, items):
    # the control: the same packed batch, routed per row, selects other factors and gives another loss
    base, processor = tiny
    model = get_peft_model(copy.deepcopy(base), MixLoraConfig(num_factors=8, r=2, init_weights=False))
    padded, packed = collators(processor, items)
    with torch.no_grad():
        loss = model(**padded).loss
        per_row = {k: v for k, v in packed.items() if k not in (SEGMENT_IDS_KWARG, TASK_IDS_KWARG)}
        assert abs(model(**per_row).loss - loss) > 1e-4
        torch.testing.assert_close(model(**packed).loss, loss, atol=1e-5, rtol=1e-5)


def test_packed_segments_pool_each_record_over_its_prompt_and_refuse_bad_ids():
    ids = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1]])
    labels = torch.tensor([[-100, -100, 5, -100, 6, -100], [7, 7, 7, 7, -100, -100]])
    segments = PackedSegments(ids, labels)
    assert segments.count == 3
    seq = torch.arange(12, dtype=torch.float32).view(2, 6, 1)
    with pytest.warns(UserWarning, match="1 instance"):  # record 2 is all labelled: pooled over all its positions
        pooled = segments.pool(seq, "prompt")
    assert pooled.view(-1).tolist() == [0.5, 3.0, 7.5]
    assert segments.pool(seq, "all").view(-1).tolist() == [1.0, 3.5, 7.5]
    with pytest.raises(ValueError, match="pooling='reference' averages a padded row"):
        segments.pool(seq, "reference")
    with pytest.raises(ValueError, match=r"records \[1\] have no position"):
        PackedSegments(torch.tensor([[0, 0, 2, -1]]), None)
    with pytest.raises(ValueError, match="does not match labels"):
        PackedSegments(ids, labels[:, :4])
    with pytest.raises(ValueError, match="ids are 0..N-1, and -1 marks padding"):
        PackedSegments(torch.tensor([[0, -2]]), None)


def test_segment_ids_refuse_an_attention_mask_and_the_collator_needs_them_for_task_ids(tiny, items):
    base, processor = tiny
    model = get_peft_model(copy.deepcopy(base), MixLoraConfig(num_factors=8, r=2))
    padded, packed = collators(processor, items)
    with pytest.raises(ValueError, match="packed rows, which take no attention_mask"):
        model(**packed, attention_mask=torch.ones_like(packed["input_ids"]))
    with pytest.raises(ValueError, match="pass segment_ids_key"):
        InstructionCollator(0, pack_width=64)
    with pytest.raises(ValueError, match="it needs pack_width"):
        InstructionCollator(0, segment_ids_key=SEGMENT_IDS_KWARG)
