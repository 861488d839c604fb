"""cmlora.vlm: tiny LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3 and SmolVLM checkpoints written offline, read back with
`load`, and adapted with MixLoRA."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from PIL import Image
from transformers import LlamaConfig

import cmlora
from cmlora.vlm import (
    QWEN2_VL_TOKENS,
    TinySpec,
    in_language_model,
    load,
    mixlora_targets,
    tiny,
    tiny_idefics3,
    tiny_llava_next,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_smolvlm,
    tiny_tokenizer,
)

VISION_TOWERS = ("vision_tower", "visual", "vision_model")
PROJECTORS = {"llava": "multi_modal_projector", "llava_next": "multi_modal_projector", "qwen2_vl": "visual.merger",
              "qwen2_5_vl": "visual.merger", "idefics3": "connector", "smolvlm": "connector"}
# Per Qwen family: the model and processor classes `load` gives, and the processor class a saved folder declares.
QWEN_CLASSES = {"qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
                "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")}


def image(colour: str = "red", size: int = 32) -> Image.Image:
    picture = Image.new("RGB", (size, size), "white")
    picture.paste(Image.new("RGB", (16, 16), colour), (0, 0))
    return picture


def conversation(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def training_batch(processor, question: str = "what colour is the square?", answer: str = "red") -> dict:
    """One example: prompt labelled -100, answer supervised."""
    prompt = processor.apply_chat_template(conversation(question), add_generation_prompt=True)
    full = processor.apply_chat_template(conversation(question, answer))
    batch = dict(processor(images=[image()], text=[full], return_tensors="pt"))
    prompt_length = processor(images=[image()], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    labels = batch["input_ids"].clone()
    labels[:, :prompt_length] = -100
    assert (labels != -100).any()
    batch["labels"] = labels
    return batch


def generation_inputs(processor) -> dict:
    prompt = processor.apply_chat_template(conversation("what colour is the square?"), add_generation_prompt=True)
    return dict(processor(images=[image()], text=[prompt], return_tensors="pt"))


BUILDERS = {"llava": tiny, "llava_next": tiny_llava_next, "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl,
            "idefics3": tiny_idefics3, "smolvlm": tiny_smolvlm}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """family -> the folder of its tiny checkpoint, each written once per module."""
    folders = {}

    def folder(family):
        if family not in folders:
            folders[family] = BUILDERS[family](tmp_path_factory.mktemp(f"tiny_{family}"))
        return folders[family]

    return folder


@pytest.fixture(scope="module")
def llava_dir(tiny_dir):
    return tiny_dir("llava")


@pytest.fixture(scope="module", params=sorted(QWEN_CLASSES))
def qwen_dir(request, tiny_dir):
    return request.param, tiny_dir(request.param)


@pytest.fixture(params=sorted(BUILDERS))
def family_dir(request, tiny_dir):
    return request.param, tiny_dir(request.param)


# ----------------------------------------------------------------- LLaVA
def test_llava_round_trip_expands_image_token_and_runs_forward(llava_dir):
    from transformers import LlavaForConditionalGeneration

    model, processor = load(llava_dir)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert type(processor).__name__ == "LlavaProcessor"
    config = model.config
    assert config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    inputs = generation_inputs(processor)
    assert int((inputs["input_ids"] == config.image_token_index).sum()) == config.image_seq_length == 4
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------- Qwen2-VL, Qwen2.5-VL
def test_qwen_round_trip_processor_and_training_step(qwen_dir):
    import transformers

    family, path = qwen_dir
    model, processor = load(path)
    model_class, processor_class = QWEN_CLASSES[family]
    assert isinstance(model, getattr(transformers, model_class))
    assert isinstance(processor, getattr(transformers, processor_class))
    tokenizer, config = processor.tokenizer, model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(QWEN2_VL_TOKENS["image_token"])
    assert config.video_token_id == tokenizer.convert_tokens_to_ids(QWEN2_VL_TOKENS["video_token"])
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids(QWEN2_VL_TOKENS["vision_start_token"])
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids(QWEN2_VL_TOKENS["vision_end_token"])
    assert processor.image_token_id == config.image_token_id

    text = processor.apply_chat_template(conversation("what colour?"), add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text
    inputs = processor(images=[image()], text=[text], return_tensors="pt")
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(inputs)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 32x32 image, vision patch 8
    image_tokens = inputs["input_ids"] == config.image_token_id
    assert int(image_tokens.sum()) == 4  # 4x4 patches merged 2x2
    assert torch.equal(inputs["mm_token_type_ids"].bool(), image_tokens)

    # The M-RoPE positions need mm_token_type_ids: Qwen2-VL raises without it, Qwen2.5-VL silently falls back to
    # one position per token, so the pipeline must carry it for both.
    without_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    if family == "qwen2_vl":
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**without_types)
    else:
        with torch.no_grad():
            assert not torch.allclose(model(**without_types).logits, model(**inputs).logits, atol=1e-4)

    model.train()
    batch = training_batch(processor)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0


def test_qwen_checkpoint_is_a_standard_folder_of_its_family(qwen_dir):
    family, path = qwen_dir
    processor_config = json.loads((path / "processor_config.json").read_text())
    assert processor_config["processor_class"] == QWEN_CLASSES[family][1]
    assert processor_config["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    assert processor_config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [QWEN_CLASSES[family][0]]


@torch.no_grad()
def test_tiny_qwen2_5_vl_attends_within_windows_but_in_its_last_block(tmp_path):
    """The tiny Qwen2.5-VL's vision tower is Qwen2.5-VL's: window attention (windows of 2x2 image tokens) in every
    block but the last. At 32 x 32 pixels (2x2 tokens, one window) the image reads the same with full attention in
    every block; at 64 x 64 (four windows) it does not."""
    for size in (32, 64):
        model, processor = load(tiny_qwen2_5_vl(tmp_path / str(size), TinySpec(image_size=size)))
        visual = model.model.visual
        assert visual.fullatt_block_indexes == [len(visual.blocks) - 1]
        inputs = processor(images=[image("blue", size)], text=["<|vision_start|><|image_pad|><|vision_end|>"],
                           return_tensors="pt")
        windowed = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        visual.fullatt_block_indexes = list(range(len(visual.blocks)))
        full = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        assert windowed.shape[0] == (size // 16) ** 2
        if size == 32:
            torch.testing.assert_close(windowed, full)
        else:
            assert not torch.allclose(windowed, full, atol=1e-4)


# ----------------------------------------------------------------- MixLoRA on both families
def test_mixlora_adapts_the_language_model_only_and_trains(family_dir):
    family, path = family_dir
    model, processor = load(path)
    targets = mixlora_targets(model)
    assert PROJECTORS[family] in targets["modules_to_save"]
    peft_model = get_peft_model(model, cmlora.MixLoraConfig(num_factors=8, r=2, **targets))

    adapted = [n for n, m in peft_model.named_modules() if isinstance(m, cmlora.MixLoraLayer)]
    assert len(adapted) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all(in_language_model(n) for n in adapted)
    assert not any(tower in n for n in adapted for tower in VISION_TOWERS)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    projector = [n for n in trainable if PROJECTORS[family] in n and "modules_to_save" in n]
    assert projector
    outside_projector = [n for n in trainable if PROJECTORS[family] not in n]
    assert not any(tower in n for n in outside_projector for tower in VISION_TOWERS)

    peft_model.train()
    loss = peft_model(**training_batch(processor)).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters()}
    factors_b = [g for n, g in grads.items() if "mixlora_factors_b" in n]
    assert factors_b and all(g is not None and g.abs().sum() > 0 for g in factors_b)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n in projector)
    frozen_tower = [n for n in grads if any(t in n for t in VISION_TOWERS) and PROJECTORS[family] not in n]
    assert frozen_tower and all(grads[n] is None for n in frozen_tower)

    peft_model.eval()
    inputs = generation_inputs(processor)  # Qwen2-VL: includes mm_token_type_ids and image_grid_thw
    with torch.no_grad():
        out = peft_model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and 0 < out.shape[1] - inputs["input_ids"].shape[1] <= 3
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


# ----------------------------------------------------------------- unsupported checkpoints
def test_load_rejects_an_unsupported_model_type(tmp_path):
    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="llama") as error:
        load(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_load_asks_for_num2words_before_reading_a_smolvlm_checkpoints_weights(tiny_dir, monkeypatch):
    import transformers
    import transformers.utils

    path = tiny_dir("smolvlm")
    monkeypatch.setattr(transformers.utils, "is_num2words_available", lambda: False)

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the processor's requirement was checked")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_weights)
    with pytest.raises(ImportError, match=r"num2words.*cmlora\[smolvlm\]") as error:
        load(path)
    assert str(path) in str(error.value)


def test_tiny_tokenizer_writes_capitals_and_digits_one_token_each():
    """Words read off letter cells and numbers read off digits are written with the per-character tokens a model
    already uses for single letters and digits; rare characters still get their own " X" token."""
    tokenizer = tiny_tokenizer(512, corpus=["what word is written ? RAIN . the sum is 12 . RAIN DOOR"] * 50)

    def pieces(text):
        return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)

    assert pieces(" RAIN") == ["ĠR", "A", "I", "N"]
    assert pieces(" 12") == ["Ġ1", "2"]
    assert pieces(" Q 7") == ["ĠQ", "Ġ7"]  # never in the corpus, still one token each with its space
    assert tokenizer.decode(tokenizer(" DOOR 12", add_special_tokens=False).input_ids) == " DOOR 12"


def test_fold_case_tokenizer_reads_prose_as_the_plain_wording_and_keeps_letters(tmp_path):
    """With `fold_case`, an instruction written as prose encodes to the same tokens as the base's lower-case
    question with its punctuation apart; capitals read off an image (letters, capital words) are left alone.
    The rules travel with the saved tokenizer, and without the option nothing changes."""
    corpus = ["is there a red circle ? answer yes or no . what word is written ? RAIN . the letter is A"] * 50
    prose, plain = "Is there a red circle? Answer yes or no.", "is there a red circle ? answer yes or no ."
    tiny(tmp_path / "folded", TinySpec(fold_case=True), corpus=corpus)
    _, processor = load(tmp_path / "folded")
    for tokenizer in (tiny_tokenizer(512, corpus, fold_case=True), processor.tokenizer):
        def ids(text, tokenizer=tokenizer):
            return tokenizer(text, add_special_tokens=False).input_ids

        assert ids(prose) == ids(plain)
        assert ids("What word is written? RAIN.") == ids("what word is written ? RAIN .")
        assert tokenizer.convert_ids_to_tokens(ids(" RAIN A")) == ["ĠR", "A", "I", "N", "ĠA"]
        assert tokenizer.decode(ids("Is the letter A?")) == "is the letter A ?"
    cased = tiny_tokenizer(512, corpus)
    assert cased(prose).input_ids != cased(plain).input_ids
