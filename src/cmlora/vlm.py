"""Loading vision-language models for MixLoRA tuning, and building tiny ones offline for tests and the demo.

`load(name_or_path)` reads any Hugging Face checkpoint folder (or hub id) of a supported family and returns the
model and its processor. `tiny(out_dir)` writes a real, randomly initialised LLaVA (CLIP-style vision tower,
Llama language model, a byte-level BPE tokenizer trained locally, a LlavaProcessor) in the same format, so that
`load(out_dir)` reads it like any checkpoint and nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The language model's projections only (the vision tower is frozen, as in the paper).
LANGUAGE_MODEL_TARGETS = r".*language_model.*\.(" + "|".join(PROJECTIONS) + r")$"
# The module trained in full next to the adapter (LLaVA's projector), per model type.
PROJECTOR_MODULES = {
    "llava": ["multi_modal_projector"],
    "llava_next": ["multi_modal_projector"],
    "qwen2_vl": ["visual.merger"],
    "qwen2_5_vl": ["visual.merger"],
    "idefics3": ["connector"],
}
IMAGE_TOKEN = "<image>"
# The Vicuna-v1 conversation format of LLaVA-v1, as a chat template for the tiny processor.
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "")


def load(name_or_path: str | Path, dtype: torch.dtype | str | None = None, **kwargs: Any) -> tuple[nn.Module, Any]:
    """Model and processor of a VLM checkpoint (a local folder in Hugging Face format, or a hub id).

    Supported families: LLaVA (llava-hf checkpoints), LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3. The processor
    of a LLaVA-style model is set to pad on the left for batched generation; training collators pad themselves.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{name_or_path}: model type {config.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}."
        )
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype or "auto", **kwargs)
    processor = AutoProcessor.from_pretrained(name_or_path)
    return model, processor


def mixlora_targets(model: nn.Module) -> dict[str, Any]:
    """The paper's targets for `model`: the language model's projections, plus the projector trained in full."""
    kind = model_type(model)
    if kind not in PROJECTOR_MODULES:
        raise ValueError(f"no default targets for model type {kind!r}; supported: {sorted(PROJECTOR_MODULES)}")
    return {"target_modules": LANGUAGE_MODEL_TARGETS, "modules_to_save": list(PROJECTOR_MODULES[kind])}


@dataclass
class TinySpec:
    """Sizes of a tiny LLaVA. The defaults build a ~0.2M-parameter model that trains at dozens of steps/s on CPU."""

    image_size: int = 32
    patch_size: int = 16
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    intermediate: int = 128
    vocab_size: int = 512
    seed: int = 0


_TOKENIZER_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT: what is the colour shape size "
    "count number position of the object in the image? is there a red green blue yellow purple orange black "
    "white circle square triangle star left right top bottom middle above below yes no true false answer the "
    "question with a single word or phrase. how many objects are there? zero one two three four five six seven "
    "eight nine ten which letter digit word is written? describe the picture. entailment neutral contradiction "
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z , . ? ! : ; ' \" ( ) - + = / \n"
)


def tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained here on a small built-in corpus: any text encodes, nothing downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})


def tiny(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a tiny, randomly initialised LLaVA (model + processor) to `out_dir`, loadable with `load(out_dir)`."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(spec.vocab_size)
    image_tokens = (spec.image_size // spec.patch_size) ** 2
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=VICUNA_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size,
                              projection_dim=spec.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.text_hidden,
                       intermediate_size=spec.intermediate, num_hidden_layers=spec.text_layers,
                       num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=image_tokens, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out
