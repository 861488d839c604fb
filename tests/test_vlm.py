"""cmlora.vlm: tiny LLaVA and Qwen2-VL checkpoints written offline, read back with `load`, and adapted with MixLoRA."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from PIL import Image
from transformers import LlamaConfig

import cmlora
from cmlora.vlm import QWEN2_VL_TOKENS, TinySpec, load, mixlora_targets, tiny, tiny_qwen2_vl, tiny_tokenizer

VISION_TOWERS = ("vision_tower", "visual")
PROJECTORS = {"llava": "multi_modal_projector", "qwen2_vl": "visual.merger"}


def image(colour: str = "red") -> Image.Image:
    picture = Image.new("RGB", (32, 32), "white")
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


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    return tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"))


@pytest.fixture(params=["llava", "qwen2_vl"])
def family_dir(request, llava_dir, qwen2_vl_dir):
    return request.param, {"llava": llava_dir, "qwen2_vl": qwen2_vl_dir}[request.param]


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


# ----------------------------------------------------------------- Qwen2-VL
def test_qwen2_vl_round_trip_processor_and_training_step(qwen2_vl_dir):
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    model, processor = load(qwen2_vl_dir)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    assert isinstance(processor, Qwen2VLProcessor)
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

    without_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**without_types)

    model.train()
    batch = training_batch(processor)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0


def test_qwen2_vl_checkpoint_is_a_standard_qwen2_vl_folder(qwen2_vl_dir):
    processor_config = json.loads((qwen2_vl_dir / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Qwen2VLProcessor"
    assert processor_config["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    assert processor_config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert json.loads((qwen2_vl_dir / "config.json").read_text())["model_type"] == "qwen2_vl"


# ----------------------------------------------------------------- MixLoRA on both families
def test_mixlora_adapts_the_language_model_only_and_trains(family_dir):
    family, path = family_dir
    model, processor = load(path)
    targets = mixlora_targets(model)
    assert PROJECTORS[family] in targets["modules_to_save"]
    peft_model = get_peft_model(model, cmlora.MixLoraConfig(num_factors=8, r=2, **targets))

    adapted = [n for n, m in peft_model.named_modules() if isinstance(m, cmlora.MixLoraLayer)]
    assert len(adapted) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all("language_model" in n for n in adapted)
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
