"""Idefics3 and SmolVLM (Idefics3's architecture in its own checkpoint format) through the data pipeline and
training: their items (pixel_values [1, crops, 3, H, W] with a pixel_attention_mask), batches whose images differ in
their number of crops, packed rows, and training a tiny model of each end to end."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cmlora
from cmlora import vlm
from cmlora.data import InstructionCollator, InstructionDataset
from cmlora.train import TrainConfig, build_adapter_model, load_run, resolve_template

from .data_helpers import (
    assert_each_row_is_its_item_alone,
    assert_packed_batch_is_the_padded_batch,
    assert_packed_training_gives_the_padded_weights,
    mixed_records,
)
from .test_data_dataset import labelled_runs, packed_items

BUILDERS = {"idefics3": vlm.tiny_idefics3, "smolvlm": vlm.tiny_smolvlm}
# Each family's model and processor classes, and its prompt for an image and a question.
CLASSES = {"idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
           "smolvlm": ("SmolVLMForConditionalGeneration", "SmolVLMProcessor")}
PROMPTS = {"idefics3": "User:<image>what colour?<end_of_utterance>\nAssistant:",
           "smolvlm": "<|im_start|>User:<image>what colour?<end_of_utterance>\nAssistant:"}


@pytest.fixture(scope="module", params=[(family, split) for family in BUILDERS for split in (False, True)],
                ids=lambda param: f"{param[0]}-{'split' if param[1] else 'whole'}")
def idefics(request, tmp_path_factory):
    """Per family, without and with image splitting: one crop per image, or 1-5 crops (the records' 40x30 and 24x48
    images)."""
    family, split = request.param
    path = BUILDERS[family](tmp_path_factory.mktemp(f"tiny_{family}"), image_splitting=split)
    model, processor = vlm.load(path)
    return model.eval(), processor, path


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return mixed_records(tmp_path_factory.mktemp("data"))


def test_each_tiny_model_is_a_standard_folder_of_its_family(idefics):
    import transformers

    model, processor, path = idefics
    family = model.config.model_type
    model_class, processor_class = CLASSES[family]
    assert isinstance(model, getattr(transformers, model_class))
    assert isinstance(processor, getattr(transformers, processor_class))
    saved = json.loads((path / "processor_config.json").read_text())
    assert saved["processor_class"] == processor_class and saved["image_seq_len"] == processor.image_seq_len == 4
    if family == "smolvlm":  # saved without torchvision, still loadable with its video processor where it is
        assert saved["video_processor"]["video_processor_type"] == "SmolVLMVideoProcessor"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what colour?"}]}], add_generation_prompt=True)
    assert prompt == PROMPTS[family]
    inputs = processor(images=[[Image.new("RGB", (32, 32), "red")]], text=[prompt], return_tensors="pt")
    crops = inputs["pixel_values"].shape[1]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4 * crops  # 4 tokens per crop
    assert resolve_template("auto", model, processor) == "chat"


@pytest.mark.parametrize("template", ["vicuna_v1", "chat"])
def test_only_the_answers_and_their_end_tokens_are_labelled(idefics, records, template):
    """The processor writes an image as more than its image tokens (tags around them, a global-image tag, rows of
    crops), so the labels are placed past that expansion, not past n image tokens."""
    _, processor, _ = idefics
    tokenizer = processor.tokenizer
    item = InstructionDataset(records, processor, template=template)[0]
    runs = labelled_runs(item["labels"])
    assert runs == [tokenizer(" red<end_of_utterance>", add_special_tokens=False).input_ids,
                    tokenizer(" a blue square<end_of_utterance>", add_special_tokens=False).input_ids]
    labelled = item["labels"] != -100
    assert torch.equal(item["labels"][labelled], item["input_ids"][labelled])


@pytest.mark.parametrize("template", ["vicuna_v1", "chat"])
@torch.no_grad()
def test_a_mixed_batch_matches_each_item_alone(idefics, records, template):
    model, processor, _ = idefics
    dataset = InstructionDataset(records, processor, template=template)
    items = [dataset[0], dataset[1], dataset[2]]  # image, text only, image
    assert items[0]["pixel_values"].shape[2:] == (3, 32, 32) and items[1]["pixel_values"] is None
    collate = InstructionCollator(processor.tokenizer.pad_token_id, task_ids_key=None)
    batch = collate(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "pixel_attention_mask"}
    # as the processor batches the two images itself: crops zero-padded to the image with the most
    own = processor(images=[[Image.open(r.image).convert("RGB")] for r in (records[0], records[2])],
                    text=["<image>", "<image>"], padding=True, return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], own["pixel_values"], atol=0, rtol=0)
    assert torch.equal(batch["pixel_attention_mask"], own["pixel_attention_mask"])
    output = model(**batch)
    assert torch.isfinite(output.loss)
    assert_each_row_is_its_item_alone(model, collate, items, output.logits)


def test_split_images_differ_in_their_number_of_crops(idefics, records):
    """What the batch tests above cover: with splitting, the 40x30 image is 2x2 crops and the whole image, the 24x48
    one 1x2 and the whole image, so their batch pads the second with zero crops."""
    _, processor, _ = idefics
    dataset = InstructionDataset(records, processor)
    crops = [dataset[index]["pixel_values"].shape[1] for index in (0, 2)]
    assert crops == ([5, 3] if processor.image_processor.do_image_splitting else [1, 1])


def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(idefics, records):
    model, processor, _ = idefics
    packed = assert_packed_batch_is_the_padded_batch(model, processor.tokenizer.pad_token_id,
                                                     packed_items(InstructionDataset(records, processor)))
    assert packed["pixel_values"].shape[0] == 4 and "pixel_attention_mask" in packed


@pytest.mark.parametrize("adapter", ["lora", "mixlora"])
def test_pack_sequences_trains_each_tiny_model_to_the_padded_runs_weights(idefics, tmp_path, adapter):
    _, _, path = idefics
    run = assert_packed_training_gives_the_padded_weights(path, tmp_path, adapter)
    assert any("connector" in name for name in load_file(run / "adapter" / "adapter_model.safetensors"))
    model, processor = load_run(run)
    assert isinstance(model.base_model, cmlora.MixLoraModel) == (adapter == "mixlora")
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What colour is the image?"}]}], add_generation_prompt=True)
    inputs = processor(images=[[Image.new("RGB", (32, 32), "red")]], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and 0 < out.shape[1] - inputs["input_ids"].shape[1] <= 3


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_full_fine_tuning_trains_the_text_model_and_connector_not_the_vision_model(tmp_path, family):
    """Idefics3's and SmolVLM's language model is `text_model`, not `language_model`: the adapters and full
    fine-tuning find it."""
    model, _ = vlm.load(BUILDERS[family](tmp_path / "tiny"))
    build_adapter_model(model, TrainConfig(adapter="full"))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    text = {name for name, _ in model.named_parameters() if ".text_model." in name}
    assert text and text <= trainable
    assert "lm_head.weight" in trainable and any(".connector." in name for name in trainable)
    assert not any(".vision_model." in name for name in trainable)


def test_the_generation_prompt_is_the_training_input_up_to_the_answer(idefics, records):
    """SmolVLM's template writes "Assistant: " before a text answer (and reads the first item of every turn): the
    prompt a model is asked with is what it saw before its answer's first label in training."""
    from cmlora.data.templates import generation_prompt

    model, processor, _ = idefics
    record = records[2]  # image + "Shape?" -> "square"
    item = InstructionDataset([record], processor, template="chat")[0]
    prompt = generation_prompt(record.conversations[:1], processor, "chat")
    encoded = processor(images=[[Image.open(record.image).convert("RGB")]], text=[prompt], return_tensors="pt")
    prompt_ids = encoded["input_ids"][0]
    first_label = int((item["labels"] != -100).nonzero()[0])
    assert first_label == len(prompt_ids)
    assert torch.equal(item["input_ids"][:first_label], prompt_ids)
