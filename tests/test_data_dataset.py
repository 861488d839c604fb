"""InstructionDataset (templates, answer-only labels, image tokens, truncation, validate) and the collator."""

from __future__ import annotations

import re

import pytest
import torch

from cmlora import vlm
from cmlora.data import TEMPLATES, DataError, InstructionCollator, InstructionDataset, Record, Turn
from cmlora.data.collator import pack_rows

from .data_helpers import (
    assert_each_row_is_its_item_alone,
    assert_packed_batch_is_the_padded_batch,
    mixed_records,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, processor = vlm.load(vlm.tiny(tmp_path_factory.mktemp("tiny_llava")))
    return model.eval(), processor


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return mixed_records(tmp_path_factory.mktemp("data"))


def labelled_runs(labels: torch.Tensor) -> list[list[int]]:
    """The labelled token ids, as runs of consecutive labelled positions."""
    runs: list[list[int]] = []
    previous = False
    for label in labels.tolist():
        if label != -100:
            runs.append([label]) if not previous else runs[-1].append(label)
        previous = label != -100
    return runs


def test_vicuna_v1_text_is_llavas_conv_vicuna_v1():
    turns = [Turn("user", "<image>\nq1"), Turn("assistant", "a1"), Turn("user", "q2"), Turn("assistant", "a2")]
    rendered = TEMPLATES["vicuna_v1"](turns, None)
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    assert rendered.text == f"{system} USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"
    assert [rendered.text[a:b] for a, b in rendered.answer_spans] == ["a1</s>", "a2</s>"]


@pytest.mark.parametrize("template", ["vicuna_v1", "chat"])
def test_only_the_answers_and_their_end_tokens_are_labelled(tiny, records, template):
    _, processor = tiny
    tokenizer = processor.tokenizer
    item = InstructionDataset(records, processor, template=template)[0]
    assert item["input_ids"].shape == item["labels"].shape and item["input_ids"].dtype == torch.long
    runs = labelled_runs(item["labels"])
    # Exact: each labelled run is the tokenization of " answer</s>" as it appears after "ASSISTANT:".
    assert runs == [tokenizer(" red</s>", add_special_tokens=False).input_ids,
                    tokenizer(" a blue square</s>", add_special_tokens=False).input_ids]
    assert tokenizer.decode(sum(runs, [])) == " red</s> a blue square</s>"
    labelled = item["labels"] != -100
    assert torch.equal(item["labels"][labelled], item["input_ids"][labelled])
    prompt = tokenizer.decode(item["input_ids"][~labelled])
    assert "What colour is it?" in prompt and "ASSISTANT:" in prompt and "red" not in prompt


def test_image_marker_expands_to_the_models_image_tokens(tiny, records):
    model, processor = tiny
    dataset = InstructionDataset(records, processor)
    item, text_item = dataset[0], dataset[1]
    image_id = model.config.image_token_index
    assert int((item["input_ids"] == image_id).sum()) == model.config.image_seq_length
    assert int((text_item["input_ids"] == image_id).sum()) == 0 and text_item["pixel_values"] is None
    crop = processor.image_processor.crop_size
    assert item["pixel_values"].shape == (1, 3, crop["height"], crop["width"])  # one image, as the processor gives it
    assert item["pixel_values"].dtype == torch.float32
    assert dataset[2]["pixel_values"].shape == item["pixel_values"].shape  # any input size is resized


def test_task_vocabulary_and_ids(tiny, records):
    _, processor = tiny
    dataset = InstructionDataset(records, processor)
    assert dataset.task_names == ["color", "shape", "unknown"]
    assert [dataset[i]["task_id"] for i in range(3)] == [0, 2, 1]
    assert [dataset[i]["id"] for i in range(3)] == ["r0", "r1", "r2"]
    fixed = InstructionDataset(records, processor, task_names=["unknown", "shape", "color", "count"])
    assert fixed.task_id("color") == 2 and fixed.task_id(None) == 0 and fixed[2]["task_id"] == 1
    with pytest.raises(DataError, match=r"record 'r2': field 'task_name': 'shape' is not in the task vocabulary"):
        InstructionDataset(records, processor, task_names=["color", "unknown"])


def test_truncation_keeps_the_start(tiny, records):
    _, processor = tiny
    full = InstructionDataset(records, processor)[0]
    first_answer_end = max(i for i, label in enumerate(full["labels"].tolist()[:-1])
                           if label != -100 and full["labels"][i + 1] == -100) + 1
    cut = InstructionDataset(records, processor, max_length=first_answer_end + 3)[0]
    assert len(cut["input_ids"]) == first_answer_end + 3
    assert torch.equal(cut["input_ids"], full["input_ids"][: first_answer_end + 3])
    assert torch.equal(cut["labels"], full["labels"][: first_answer_end + 3])


def test_truncating_every_answer_away_is_an_error(tiny, records):
    _, processor = tiny
    full = InstructionDataset(records, processor)[0]
    prompt_length = int((full["labels"] != -100).nonzero()[0])
    dataset = InstructionDataset(records, processor, max_length=prompt_length)
    message = re.escape(f"train.jsonl:1: record 'r0': field 'conversations': answer truncated away entirely "
                        f"(prompt is {prompt_length} tokens, max_length {prompt_length})")
    with pytest.raises(DataError, match=message):
        dataset[0]


def test_cutting_into_image_tokens_is_an_error(tiny, records):
    model, processor = tiny
    late_image = Record("late", [Turn("user", "q"), Turn("assistant", "yes"), Turn("user", "<image>\nq"),
                                 Turn("assistant", "no")], records[0].image, None, "hand-made")
    full = InstructionDataset([late_image], processor)[0]
    first_image = int((full["input_ids"] == model.config.image_token_index).nonzero()[0])
    with pytest.raises(DataError, match="record 'late': .*cuts into .*the image tokens"):
        InstructionDataset([late_image], processor, max_length=first_image + 2)[0]


def test_corrupt_image_names_file_and_record_and_validate_skips_it(tiny, records, tmp_path):
    _, processor = tiny
    broken = tmp_path / "broken.png"
    broken.write_bytes(bytes(range(256)) * 8)
    bad_image = Record("bad", [Turn("user", "<image>\nq"), Turn("assistant", "a")], broken, "count", "f.jsonl:9")
    too_long = Record("long", [Turn("user", "word " * 400), Turn("assistant", "a")], None, None, "f.jsonl:10")
    mixed = [records[0], bad_image, records[1], too_long]
    dataset = InstructionDataset(mixed, processor, max_length=256)
    with pytest.raises(DataError, match=re.escape(f"f.jsonl:9: record 'bad': field 'image': {broken}: cannot read")):
        dataset[1]
    with pytest.raises(DataError, match="record 'bad'"):
        dataset.validate()  # without skip_bad_records: the first bad record raises
    skipping = InstructionDataset(mixed, processor, max_length=256, skip_bad_records=True)
    report = skipping.validate()
    assert report.counts == {"corrupt image": 1, "answer truncated away": 1}
    assert [record.id for record in skipping.records] == ["r0", "r1"] and len(skipping) == 2
    assert skipping.lengths == [len(skipping[0]["input_ids"]), len(skipping[1]["input_ids"])]  # of the kept records
    assert skipping.task_names == ["color", "count", "unknown"]  # the vocabulary does not shrink with the records


def test_keep_encoded_encodes_each_kept_record_once(tiny, records, tmp_path, monkeypatch):
    _, processor = tiny
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad_image = Record("bad", [Turn("user", "<image>\nq"), Turn("assistant", "a")], broken, "count", "f.jsonl:9")
    mixed = [records[0], bad_image, records[1], records[2]]
    dataset = InstructionDataset(mixed, processor, skip_bad_records=True, keep_encoded=True)
    fresh = InstructionDataset(mixed, processor, skip_bad_records=True)
    encoded = []
    encode = InstructionDataset.encode
    monkeypatch.setattr(InstructionDataset, "encode", lambda self, record: encoded.append(record.id) or encode(self,
                                                                                                          record))
    dataset[2]  # kept, then dropped by validate: indexes shift when the bad record goes
    dataset.validate()
    fresh.validate()
    assert encoded == ["r1", "r0", "bad", "r1", "r2"] + ["r0", "bad", "r1", "r2"]
    encoded.clear()
    for _ in range(2):  # two epochs
        for index in range(len(dataset)):
            item, expected = dataset[index], fresh[index]
            assert item["id"] == expected["id"] == dataset.records[index].id
            assert torch.equal(item["input_ids"], expected["input_ids"])
            pixels = (item["pixel_values"], expected["pixel_values"])
            assert pixels == (None, None) or torch.equal(*pixels)
    assert encoded == ["r0", "r1", "r2"] * 2  # only the dataset without keep_encoded encoded again


def test_collator_pads_right_and_keeps_only_model_inputs(tiny, records):
    _, processor = tiny
    dataset = InstructionDataset(records, processor)
    items = [dataset[1], dataset[0]]
    pad = processor.tokenizer.pad_token_id
    batch = InstructionCollator(pad, pad_to_multiple_of=8)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "mixlora_task_ids"}
    lengths = [len(item["input_ids"]) for item in items]
    width = -(-max(lengths) // 8) * 8
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    for row, (item, length) in enumerate(zip(items, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][row, :length], item["input_ids"])
        assert torch.equal(batch["labels"][row, :length], item["labels"])
        assert (batch["input_ids"][row, length:] == pad).all() and (batch["labels"][row, length:] == -100).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
    assert batch["pixel_values"].shape == dataset[0]["pixel_values"].shape  # one image: [1, 3, H, W]
    assert batch["mixlora_task_ids"].tolist() == [2, 0] and batch["mixlora_task_ids"].dtype == torch.long
    text_only = InstructionCollator(pad, task_ids_key=None)([dataset[1], dataset[1]])
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}
    assert text_only["input_ids"].shape[1] == lengths[0]


@torch.no_grad()
def test_mixed_batch_runs_through_llava_with_each_image_on_its_row(tiny, records):
    model, processor = tiny
    dataset = InstructionDataset(records, processor)
    items = [dataset[0], dataset[1], dataset[2]]  # image, text only, another image
    collate = InstructionCollator(processor.tokenizer.pad_token_id)
    batch = collate(items)
    assert batch.pop("mixlora_task_ids").tolist() == [0, 2, 1]
    assert batch["pixel_values"].shape[0] == 2
    output = model(**batch)
    assert torch.isfinite(output.loss)
    assert_each_row_is_its_item_alone(model, collate, items, output.logits)


@pytest.mark.parametrize("template", ["plain", "vicuna_v1"])
def test_a_generation_prompt_is_exactly_what_precedes_the_first_learned_token(tmp_path, template):
    """The tokenizer knows " red" but not " zq": " zq" starts with a lone " " token, which must be learned, since
    generation_prompt stops before the space (a model prompted with "... ? " would never see " red" follow)."""
    from cmlora.data import generation_prompt

    vlm.tiny(tmp_path / "m", corpus=["what colour is it ? red"] * 50)
    _, processor = vlm.load(tmp_path / "m")
    tokenizer = processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(tokenizer(" zq", add_special_tokens=False).input_ids)[0] == "Ġ"
    for answer in ("red", "zq"):
        question = [Turn("user", "what colour is it ?")]
        record = Record("r", [*question, Turn("assistant", answer)], None, None, "test")
        item = InstructionDataset([record], processor, template=template)[0]
        first_learned = int((item["labels"] != -100).nonzero()[0])
        prompt_ids = tokenizer(generation_prompt(question, processor, template)).input_ids
        assert item["input_ids"][:first_learned].tolist() == prompt_ids, answer
        assert tokenizer.decode(item["labels"][first_learned:][item["labels"][first_learned:] != -100]).strip() \
            == f"{answer}</s>"


def test_pack_rows_fills_few_rows_longest_first_and_refuses_an_item_longer_than_a_row():
    # 5 opens row 0, 4 row 1, 3 fits neither and opens row 2, 2 fills row 1, 1 fills row 0: three full rows
    assert pack_rows([3, 5, 2, 4, 1], 6) == [[1, 4], [3, 2], [0]]
    assert pack_rows([2, 2, 2], 6) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="item 'long' has 7 tokens, more than a packed row's 6"):
        pack_rows([2, 7], 6, ids=["short", "long"])


def packed_items(dataset):
    return [dataset[0], dataset[1], dataset[2], dataset[2], dataset[1], dataset[0]]  # images in rows and between


def test_a_packed_batch_lays_each_item_out_once_with_its_own_positions_and_images_in_token_order(tiny, records):
    _, processor = tiny
    dataset = InstructionDataset(records, processor)
    items = packed_items(dataset)
    lengths = [len(item["input_ids"]) for item in items]
    width = max(lengths) + min(lengths)
    batch = InstructionCollator(processor.tokenizer.pad_token_id, task_ids_key=None, pack_width=width)(items)
    assert set(batch) == {"input_ids", "labels", "position_ids", "pixel_values", "use_cache"}
    assert batch["use_cache"] is False  # transformers finds packed items only without a KV cache
    rows = pack_rows(lengths, width)
    assert len(rows) < len(items) and batch["input_ids"].shape[0] == len(rows)
    assert batch["input_ids"].shape[1] == max(sum(lengths[i] for i in row) for row in rows) <= width
    pixels = []
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            span = slice(start, start + lengths[index])
            assert torch.equal(batch["input_ids"][row, span], items[index]["input_ids"])
            assert torch.equal(batch["labels"][row, span], items[index]["labels"])
            assert batch["position_ids"][row, span].tolist() == list(range(lengths[index]))
            if items[index]["pixel_values"] is not None:
                pixels.append(items[index]["pixel_values"])
            start += lengths[index]
        tail = batch["input_ids"].shape[1] - start
        assert batch["position_ids"][row, start:].tolist() == list(range(tail))  # padding: a block of its own
        assert (batch["labels"][row, start:] == -100).all()
    assert torch.equal(batch["pixel_values"], torch.cat(pixels))


def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(tiny, records):
    model, processor = tiny
    assert_packed_batch_is_the_padded_batch(model, processor.tokenizer.pad_token_id,
                                            packed_items(InstructionDataset(records, processor)))


def test_packing_refuses_task_ids_without_segment_ids_and_per_token_inputs(tiny, records):
    _, processor = tiny
    dataset = InstructionDataset(records, processor)
    with pytest.raises(ValueError, match="task ids are per record: pass segment_ids_key"):
        InstructionCollator(0, pack_width=64)
    with pytest.raises(ValueError, match="pack_width must be positive"):
        InstructionCollator(0, task_ids_key=None, pack_width=0)
    item = dict(dataset[2])
    item["mm_token_type_ids"] = torch.zeros(len(item["input_ids"]), dtype=torch.long)
    with pytest.raises(ValueError, match=r"per-token inputs \['mm_token_type_ids'\]"):
        InstructionCollator(0, task_ids_key=None, pack_width=256)([item])
