"""Qwen2-VL and Qwen2.5-VL through the data pipeline: items and batches (mm_token_type_ids, image_grid_thw,
patch-flattened pixel_values), their packed rows (M-RoPE positions per record), and training a tiny Qwen2-VL and
Qwen2.5-VL end to end. Every test of a `qwen` fixture runs on both
families: they share the processor's inputs and the M-RoPE layout, and differ in the vision tower."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import cmlora
from cmlora import vlm
from cmlora.data import TEMPLATES, InstructionCollator, InstructionDataset, Turn
from cmlora.data.collator import pack_rows
from cmlora.train import TrainConfig, load_run, resolve_template, train

from .data_helpers import (
    assert_each_row_is_its_item_alone,
    assert_packed_training_gives_the_padded_weights,
    assert_same_loss_and_gradients,
    losses_and_gradients,
    mixed_records,
)
from .synthetic_data import write_records
from .test_data_dataset import labelled_runs, packed_items

VISION = "<|vision_start|><|image_pad|><|vision_end|>"


QWEN_BUILDERS = {"qwen2_vl": vlm.tiny_qwen2_vl, "qwen2_5_vl": vlm.tiny_qwen2_5_vl}


@pytest.fixture(scope="module", params=sorted(QWEN_BUILDERS))
def qwen_dir(request, tmp_path_factory):
    return QWEN_BUILDERS[request.param](tmp_path_factory.mktemp(f"tiny_{request.param}"))


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    model, processor = vlm.load(qwen_dir)
    return model.eval(), processor


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return mixed_records(tmp_path_factory.mktemp("data"))


def test_vicuna_v1_uses_each_familys_image_placeholder_and_end_token(qwen):
    _, processor = qwen
    turns = [Turn("user", "<image>\nq1"), Turn("assistant", "a1")]
    rendered = TEMPLATES["vicuna_v1"](turns, processor)
    assert f"USER: {VISION}\nq1 ASSISTANT: a1<|im_end|>" in rendered.text
    assert [rendered.text[a:b] for a, b in rendered.answer_spans] == ["a1<|im_end|>"]


@pytest.mark.parametrize("template", ["vicuna_v1", "chat"])
def test_qwen_item_labels_answers_and_end_token_only(qwen, records, template):
    model, processor = qwen
    tokenizer = processor.tokenizer
    dataset = InstructionDataset(records, processor, template=template)
    item = dataset[0]
    space = " " if template == "vicuna_v1" else ""  # "ASSISTANT: red" vs "<|im_start|>assistant\nred"
    runs = labelled_runs(item["labels"])
    assert runs == [tokenizer(f"{space}red<|im_end|>", add_special_tokens=False).input_ids,
                    tokenizer(f"{space}a blue square<|im_end|>", add_special_tokens=False).input_ids]
    assert tokenizer.decode(sum(runs, [])) == f"{space}red<|im_end|>{space}a blue square<|im_end|>"
    labelled = item["labels"] != -100
    assert torch.equal(item["labels"][labelled], item["input_ids"][labelled])
    # the image: wrapped in vision start/end, expanded to one token per merged patch, marked in mm_token_type_ids
    ids = item["input_ids"].tolist()
    image_id, start_id = model.config.image_token_id, model.config.vision_start_token_id
    first = ids.index(image_id)
    assert ids[first - 1] == start_id and ids[first + 4] == model.config.vision_end_token_id
    assert item["mm_token_type_ids"].shape == item["input_ids"].shape
    assert torch.equal(item["mm_token_type_ids"].bool(), item["input_ids"] == image_id)
    assert item["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert item["pixel_values"].shape == (16, 3 * 2 * 8 * 8)  # 4x4 patches of 2 frames x 8x8 x RGB
    text_item = dataset[1]
    assert text_item["pixel_values"] is None and "image_grid_thw" not in text_item
    assert not text_item["mm_token_type_ids"].any()


def test_per_token_inputs_are_truncated_with_input_ids(qwen, records):
    _, processor = qwen
    full = InstructionDataset(records, processor)[0]
    cut = InstructionDataset(records, processor, max_length=len(full["input_ids"]) - 3)[0]
    assert len(cut["mm_token_type_ids"]) == len(cut["input_ids"]) == len(full["input_ids"]) - 3
    assert torch.equal(cut["mm_token_type_ids"], full["mm_token_type_ids"][:-3])
    assert torch.equal(cut["pixel_values"], full["pixel_values"])


@torch.no_grad()
@pytest.mark.parametrize("template", ["vicuna_v1", "chat"])
def test_mixed_qwen_batch_matches_each_item_alone(qwen, records, template):
    model, processor = qwen
    dataset = InstructionDataset(records, processor, template=template)
    items = [dataset[0], dataset[1], dataset[2]]  # image, text only, image
    collate = InstructionCollator(processor.tokenizer.pad_token_id)
    batch = collate(items)
    assert batch.pop("mixlora_task_ids").tolist() == [0, 2, 1]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "mm_token_type_ids", "pixel_values",
                          "image_grid_thw"}
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 2]]  # 24x48 keeps its aspect: 8 patches, 2 tokens
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))
    width = batch["input_ids"].shape[1]
    for row, item in enumerate(items):
        length = len(item["input_ids"])
        assert batch["mm_token_type_ids"][row].tolist() == item["mm_token_type_ids"].tolist() + [0] * (width - length)
    output = model(**batch)
    assert torch.isfinite(output.loss)
    assert_each_row_is_its_item_alone(model, collate, items, output.logits)


def test_text_only_qwen_batch_has_no_image_inputs(qwen, records):
    _, processor = qwen
    dataset = InstructionDataset(records, processor)
    batch = InstructionCollator(processor.tokenizer.pad_token_id, task_ids_key=None)([dataset[1], dataset[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "mm_token_type_ids"}
    assert not batch["mm_token_type_ids"].any()


# ----------------------------------------------------------------- Qwen2-VL, Qwen2.5-VL: packed rows
def pack_qwen(model, items, width):
    return InstructionCollator(0, task_ids_key=None, pack_width=width, rope_index=vlm.packed_rope_index(model))(items)


def test_a_packed_qwen_batch_gives_each_item_its_own_mrope_positions_after_the_text_positions(qwen, records):
    model, processor = qwen
    items = packed_items(InstructionDataset(records, processor))
    lengths = [len(item["input_ids"]) for item in items]
    width = max(lengths) + min(lengths)
    batch = pack_qwen(model, items, width)
    rows = pack_rows(lengths, width)
    assert len(rows) < len(items)
    assert set(batch) == {"input_ids", "labels", "position_ids", "mm_token_type_ids", "pixel_values",
                          "image_grid_thw", "use_cache"}
    assert batch["position_ids"].shape == (4, len(rows), batch["input_ids"].shape[1])
    grids, images_3d = [], 0
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            item, span = items[index], slice(start, start + lengths[index])
            assert torch.equal(batch["input_ids"][row, span], item["input_ids"])
            assert torch.equal(batch["mm_token_type_ids"][row, span], item["mm_token_type_ids"])
            assert batch["position_ids"][0, row, span].tolist() == list(range(lengths[index]))  # the boundaries
            # the positions the model gives the item alone, in an unpacked batch of one
            alone, _ = model.model.get_rope_index(item["input_ids"][None], item["mm_token_type_ids"][None],
                                                  image_grid_thw=item.get("image_grid_thw"))
            assert torch.equal(batch["position_ids"][1:, row, span], alone[:, 0])
            if "image_grid_thw" in item:
                grids.append(item["image_grid_thw"])
                # 3-D: the image's tokens share a temporal position and differ in height and width
                images_3d += not torch.equal(alone[:, 0], torch.arange(lengths[index]).expand(3, -1))
            start += lengths[index]
        tail = batch["input_ids"].shape[1] - start
        assert (batch["position_ids"][:, row, start:] == torch.arange(tail)).all()  # padding: a block of its own
        assert not batch["mm_token_type_ids"][row, start:].any() and (batch["labels"][row, start:] == -100).all()
    assert images_3d == len(grids) == 4
    assert torch.equal(batch["image_grid_thw"], torch.cat(grids))  # the order the image tokens appear in


def test_a_packed_qwen_batch_gives_the_padded_batchs_loss_and_gradients(qwen, records):
    model, processor = qwen
    items = packed_items(InstructionDataset(records, processor))
    padded = InstructionCollator(processor.tokenizer.pad_token_id, task_ids_key=None)(items)
    packed = pack_qwen(model, items, max(len(item["input_ids"]) for item in items) * 3)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]

    # Without the text positions transformers sees one sequence per row: the items attend to each other.
    results = losses_and_gradients(model, {"padded": padded, "packed": packed,
                                           "leaking": {**packed, "position_ids": packed["position_ids"][1:]}})
    assert_same_loss_and_gradients(results["packed"], results["padded"])
    assert abs(results["leaking"][0] - results["padded"][0]) > 1e-4


def test_packed_rope_index_is_for_m_rope_models_and_checked_by_the_collator(qwen, records, tmp_path):
    model, processor = qwen
    llava, _ = vlm.load(vlm.tiny(tmp_path / "llava"))
    assert vlm.packed_rope_index(llava) is None  # one position per token: the collator's restarting positions
    item = InstructionDataset(records, processor)[0]
    with pytest.raises(ValueError, match="rope_index gives the positions of each record of a packed row"):
        InstructionCollator(0, task_ids_key=None, rope_index=vlm.packed_rope_index(model))
    with pytest.raises(ValueError, match=r"per-token inputs \['mm_token_type_ids'\].*pass rope_index"):
        InstructionCollator(0, task_ids_key=None, pack_width=256)([item])
    flat = InstructionCollator(0, task_ids_key=None, pack_width=256,
                               rope_index=lambda ids, types, grid: torch.arange(len(ids))[None])
    with pytest.raises(ValueError, match=r"rope_index gave positions of shape \(1, \d+\), not \(3, \d+\)"):
        flat([item])


# ----------------------------------------------------------------- training end to end
def test_auto_template_is_vicuna_v1_for_llava_and_chat_for_qwen(qwen, tmp_path):
    model, processor = qwen
    assert resolve_template("auto", model, processor) == "chat"
    assert resolve_template("vicuna_v1", model, processor) == "vicuna_v1"
    llava, llava_processor = vlm.load(vlm.tiny(tmp_path / "llava"))
    assert resolve_template("auto", llava, llava_processor) == "vicuna_v1"


@pytest.mark.parametrize("template", ["auto", "vicuna_v1"])
def test_train_a_tiny_qwen_then_load_and_generate(qwen_dir, tmp_path, capsys, template):
    data = write_records(tmp_path / "data", count=8)
    config = TrainConfig(model=str(qwen_dir), data=str(data), image_folder=str(data.parent / "images"),
                         output_dir=str(tmp_path / "run"), adapter="mixlora", template=template, max_length=128,
                         num_factors=8, r=2, learning_rate=1e-3, batch_size=4, max_steps=2, logging_steps=1,
                         save_steps=100, use_cpu=True, seed=3)
    run = train(config)
    expected = "chat" if template == "auto" else "vicuna_v1"
    assert f"[cmlora] conversation template: {expected}" in capsys.readouterr().out
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    model, processor = load_run(run)
    assert isinstance(model.base_model, cmlora.MixLoraModel)
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What colour is the image?"}]}], add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (32, 32), "red")], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and 0 < out.shape[1] - inputs["input_ids"].shape[1] <= 3


@pytest.mark.parametrize("adapter", ["lora", "mixlora"])
def test_pack_sequences_trains_a_tiny_qwen_to_the_padded_runs_weights(qwen_dir, tmp_path, adapter):
    assert_packed_training_gives_the_padded_weights(qwen_dir, tmp_path, adapter)
