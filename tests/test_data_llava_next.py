"""LLaVA-NeXT through the data pipeline: any-resolution images (image_sizes, 1 + 1-4 tiles per image, zero-padded
per batch), packed rows, and packed training."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cmlora import vlm
from cmlora.data import InstructionCollator, InstructionDataset, load_records

from .data_helpers import (
    assert_each_row_is_its_item_alone,
    assert_packed_batch_is_the_padded_batch,
    assert_packed_training_gives_the_padded_weights,
    save_image,
    text_record,
    vf_record,
    write_jsonl,
)
from .test_data_dataset import packed_items


@pytest.fixture(scope="module")
def llava_next_dir(tmp_path_factory):
    return vlm.tiny_llava_next(tmp_path_factory.mktemp("tiny_llava_next"))


@pytest.fixture(scope="module")
def llava_next(llava_next_dir):
    model, processor = vlm.load(llava_next_dir)
    return model.eval(), processor


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    save_image(folder / "wide.png", (255, 0, 0), (40, 30))  # the whole image + 2 tiles = 3 patches
    save_image(folder / "square.png", (0, 0, 255), (60, 60))  # the whole image + 4 tiles = 5 patches
    rows = [vf_record("a", "wide.png"), text_record("t"), vf_record("b", "square.png", "shape")]
    return load_records(write_jsonl(folder / "d.jsonl", rows))[0]


def test_tiny_llava_next_is_a_standard_llava_next_folder(llava_next, llava_next_dir):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model, processor = llava_next
    assert isinstance(model, LlavaNextForConditionalGeneration) and isinstance(processor, LlavaNextProcessor)
    assert vlm.mixlora_targets(model)["modules_to_save"] == ["multi_modal_projector"]


@torch.no_grad()
def test_llava_next_image_sizes_and_patch_counts_travel_with_their_rows(llava_next, records):
    model, processor = llava_next
    dataset = InstructionDataset(records, processor)
    items = [dataset[0], dataset[1], dataset[2]]
    assert items[0]["pixel_values"].shape[:2] == (1, 3) and items[2]["pixel_values"].shape[:2] == (1, 5)
    collate = InstructionCollator(processor.tokenizer.pad_token_id, task_ids_key=None)
    batch = collate(items)
    # as the processor batches the two images itself: image_sizes stacked, patch counts zero-padded to the largest
    own = processor(images=[Image.open(r.image) for r in (records[0], records[2])], text=["<image>", "<image>"],
                    padding=True, return_tensors="pt")
    assert torch.equal(batch["image_sizes"], own["image_sizes"])
    assert batch["image_sizes"].tolist() == [[30, 40], [60, 60]]
    torch.testing.assert_close(batch["pixel_values"], own["pixel_values"], atol=0, rtol=0)
    output = model(**batch)
    assert torch.isfinite(output.loss)
    assert_each_row_is_its_item_alone(model, collate, items, output.logits)


def test_a_packed_llava_next_batch_gives_the_padded_batchs_loss_and_gradients(llava_next, records):
    model, processor = llava_next
    items = packed_items(InstructionDataset(records, processor))
    assert len({len(item["input_ids"]) for item in items}) == 3  # the images' token counts follow their aspect ratio
    packed = assert_packed_batch_is_the_padded_batch(model, processor.tokenizer.pad_token_id, items)
    assert packed["image_sizes"].shape == (4, 2)  # with the images, in token order


@pytest.mark.parametrize("adapter", ["lora", "mixlora"])
def test_pack_sequences_trains_a_tiny_llava_next_to_the_padded_runs_weights(llava_next_dir, tmp_path, adapter):
    assert_packed_training_gives_the_padded_weights(llava_next_dir, tmp_path, adapter)
