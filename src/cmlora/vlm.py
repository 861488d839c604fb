"""Loading vision-language models for MixLoRA tuning, and building tiny ones offline for tests and the demo.

`load(name_or_path)` reads any Hugging Face checkpoint folder (or hub id) of a supported family and returns the
model and its processor. `tiny(out_dir)` writes a real, randomly initialised LLaVA (CLIP-style vision tower,
Llama language model, a byte-level BPE tokenizer trained locally, a LlavaProcessor) in the same format, so that
`load(out_dir)` reads it like any checkpoint and nothing is downloaded. The other supported families have theirs:
`tiny_llava_next` (LLaVA-NeXT's any-resolution tiles), `tiny_qwen2_vl` (Qwen2-VL vision tower and patch merger,
Qwen2 language model with M-RoPE, a Qwen2VLProcessor), `tiny_qwen2_5_vl` (Qwen2.5-VL's windowed vision tower, a
Qwen2_5_VLProcessor), `tiny_idefics3` (SigLIP-style tower, pixel-shuffle connector, Llama language model) and
`tiny_smolvlm` (the same architecture as SmolVLM checkpoints have it, with a SmolVLMProcessor).
"""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model import LANGUAGE_MODEL_MODULE, LANGUAGE_MODEL_PROJECTIONS

SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")
# The module trained in full next to the adapter (LLaVA's projector), per model type.
PROJECTOR_MODULES = {
    "llava": ["multi_modal_projector"],
    "llava_next": ["multi_modal_projector"],
    "qwen2_vl": ["visual.merger"],
    "qwen2_5_vl": ["visual.merger"],
    "idefics3": ["connector"],
    "smolvlm": ["connector"],
}
IMAGE_TOKEN = "<image>"
# Processor classes that require a video processor, which transformers builds only with torchvision installed, and
# that video processor's class. Without torchvision `load` gives an image-only variant of these (see
# `_image_only_processor_class`).
_PROCESSORS_WITH_VIDEO = {"qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
                          "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
                          "smolvlm": ("SmolVLMProcessor", "SmolVLMVideoProcessor")}
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
# Qwen2-VL's special tokens. The processor expands each <|image_pad|> into one token per merged patch; the config's
# image_token_id, video_token_id, vision_start_token_id and vision_end_token_id must be the tokenizer's ids of these.
QWEN2_VL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
# Qwen2-VL's ChatML conversation format (without its default system message), as a chat template for the tiny
# processor: an image item becomes <|vision_start|><|image_pad|><|vision_end|>.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Idefics3's special tokens (its processor reads them from the tokenizer): the image token, the tokens around each
# image's tokens, the tag of the whole-image crop, and the end of a turn.
IDEFICS3_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
# Idefics3's conversation format, "User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n",
# as a chat template for the tiny processor.
IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{% if message['role'] == 'assistant' %} {% endif %}{{ item['text'] }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# SmolVLM's conversation format, as its checkpoints' chat template writes it: "<|im_start|>" once, then per turn the
# role, ":" before an image or ": " before text, the content and <end_of_utterance>.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# The models whose positions are M-RoPE's (time, height, width), by model type: the class inside that computes them.
# Their get_rope_index takes the same arguments for images; Qwen2.5-VL's also spaces video frames by
# second_per_grid_ts, which image data never passes.
_MROPE_MODELS = {"qwen2_vl": "Qwen2VLModel", "qwen2_5_vl": "Qwen2_5_VLModel"}


def in_language_model(parameter_or_module_name: str) -> bool:
    """Whether a name is inside the VLM's language model (`language_model` or `text_model`), the output layer
    excluded."""
    return LANGUAGE_MODEL_MODULE.search(parameter_or_module_name) is not None


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "")


def packed_rope_index(
        model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """InstructionCollator's `rope_index` for `model`: the 3-D (M-RoPE) positions [3, L] of one record (input_ids
    [L], mm_token_type_ids [L], image_grid_thw [images, 3] or None), computed by the model's own `get_rope_index`,
    for packing a model whose positions are not one per token (Qwen2-VL, Qwen2.5-VL); None for models with one
    position per token (LLaVA), which need nothing more than the collator's restarting positions.

    Packed rows cannot let the model compute these: it would walk each row as one sequence, so every record after
    the first would start at the previous records' positions and read their images' grids. Each record's are
    computed alone, as in an unpacked batch, and the collator lays them out row by row.
    """
    inner_name = _MROPE_MODELS.get(model_type(model))
    if inner_name is None:
        return None
    inner = next((module for module in model.modules() if type(module).__name__ == inner_name), None)
    if inner is None:
        raise ValueError(f"{type(model).__name__}: no {inner_name} inside, whose get_rope_index packing needs")

    @torch.no_grad()
    def rope_index(input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                   image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        positions, _ = inner.get_rope_index(input_ids[None], mm_token_type_ids[None], image_grid_thw=image_grid_thw)
        return positions[:, 0]

    return rope_index


def load(name_or_path: str | Path, dtype: torch.dtype | str | None = None, **kwargs: Any) -> tuple[nn.Module, Any]:
    """Model and processor of a VLM checkpoint (a local folder in Hugging Face format, or a hub id).

    Supported families: LLaVA (llava-hf checkpoints), LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM. The
    processor pads as its checkpoint says (LLaVA: right); batched generation should pad prompts on the left.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.utils import is_num2words_available

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{name_or_path}: model type {config.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}."
        )
    if config.model_type == "smolvlm" and not is_num2words_available():  # before the weights, not after
        raise ImportError(f"{name_or_path}: SmolVLM's processor needs the num2words package: "
                          "pip install 'cmlora[smolvlm]' (or num2words).")
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype or "auto", **kwargs)
    processor = _load_processor(name_or_path, config.model_type)
    return model, processor


def _load_processor(name_or_path: str | Path, kind: str) -> Any:
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if kind in _PROCESSORS_WITH_VIDEO and not is_torchvision_available():
        return _image_only_processor_class(*_PROCESSORS_WITH_VIDEO[kind]).from_pretrained(name_or_path)
    return AutoProcessor.from_pretrained(name_or_path)


@functools.cache
def _image_only_processor_class(name: str, video_processor_type: str) -> type:
    """`transformers.<name>` (Qwen2VLProcessor, Qwen2_5_VLProcessor, SmolVLMProcessor) without its video processor.

    transformers builds those processors only with a video processor, and its video processors need torchvision,
    which cmlora does not require. The subclass drops the `video_processor` argument; images and text work as in
    the original (its __call__ skips videos when the attribute is absent), and so do chat templates (SmolVLM's
    apply_chat_template only adds the video processor's frame defaults). It keeps the original's class name, so a
    processor saved from it declares the original class and reloads with AutoProcessor where torchvision is
    installed; it also saves a `video_processor_type` section derived from the image processor for that case.
    """
    import transformers
    from transformers import ProcessorMixin

    base = getattr(transformers, name)

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 image_seq_len: int | None = None, **kwargs: Any) -> None:
        # ProcessorMixin saves and loads the arguments this __init__'s code names, so SmolVLM's image_seq_len is
        # one (the Qwens have none). The base passes video_processor=None on positionally; ProcessorMixin pairs
        # positional arguments with the attributes of the class (image_processor, tokenizer here), so it is dropped.
        if image_seq_len is not None:
            kwargs["image_seq_len"] = image_seq_len
        base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                      chat_template=chat_template, **kwargs)

    def apply_chat_template(self: Any, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    def to_dict(self: Any) -> dict[str, Any]:
        output = base.to_dict(self)
        image = output.get("image_processor")
        if isinstance(image, dict) and "video_processor" not in output:
            video = {k: v for k, v in image.items() if k != "image_processor_type"}
            video["video_processor_type"] = video_processor_type
            output["video_processor"] = video
        return output

    return type(name, (base,), {"__init__": __init__, "apply_chat_template": apply_chat_template,
                                "to_dict": to_dict, "__module__": __name__, "__qualname__": name})


def mixlora_targets(model: nn.Module) -> dict[str, Any]:
    """The paper's targets for `model`: the language model's projections, plus the projector trained in full."""
    kind = model_type(model)
    if kind not in PROJECTOR_MODULES:
        raise ValueError(f"no default targets for model type {kind!r}; supported: {sorted(PROJECTOR_MODULES)}")
    # The language model's projections only (the vision tower is frozen, as in the paper).
    return {"target_modules": LANGUAGE_MODEL_PROJECTIONS, "modules_to_save": list(PROJECTOR_MODULES[kind])}


@dataclass
class TinySpec:
    """Sizes of a tiny VLM. The defaults build a ~0.2M-parameter model that trains at dozens of steps/s on CPU.

    `patch_size` is the side in pixels of the image area one image token stands for: LLaVA's CLIP patch; for
    Qwen2-VL and Qwen2.5-VL, which merge 2x2 vision patches into one token, twice their vision patch. Either way an
    image of `image_size` gives (image_size / patch_size)**2 image tokens (4 with the defaults). Qwen2-VL's vision
    MLP is twice `vision_hidden` wide whatever `vision_intermediate` says (its config has a ratio, not a width).
    """

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
    vision_intermediate: int | None = None  # None: 2 * vision_hidden
    vision_feature_layer: int = -2  # LLaVA's choice; a 2-layer tower trained from scratch does better with -1
    # The tokenizer reads prose as the plain wording (`fold_case_rules`): "Is the circle red? Answer yes or no." as
    # "is the circle red ? answer yes or no .". Off: every capital is a token of its own, so "Is" is the letter I
    # and an s, and "red?" is not "red ?".
    fold_case: bool = False


_TOKENIZER_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT: what is the colour shape size "
    "count number position of the object in the image? is there a red green blue yellow purple orange black "
    "white circle square triangle star left right top bottom middle above below yes no true false answer the "
    "question with a single word or phrase. how many objects are there? zero one two three four five six seven "
    "eight nine ten which letter digit word is written? describe the picture. entailment neutral contradiction "
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z , . ? ! : ; ' \" ( ) - + = / \n"
)


def fold_case_rules() -> Any:
    """A tokenizer normalizer that writes prose as the tiny base's plain questions are written: a capital that
    starts a word of lower-case letters is lowered ("Is" -> "is", "Answer" -> "answer"), and punctuation that ends a
    word or number gets a space before it ("red?" -> "red ?"). Capitals that stand alone or in capital words ("A",
    "CAT": letters and words read from an image) keep their case, so the letter and word skills are unchanged."""
    from tokenizers import Regex, normalizers

    lowered = [normalizers.Replace(Regex(f"(?<![A-Za-z]){c}(?=[a-z])"), c.lower()) for c in string.ascii_uppercase]
    spaced = [normalizers.Replace(Regex(f"(?<=[A-Za-z0-9])\\{mark}"), f" {mark}") for mark in "?.!,:;"]
    return normalizers.Sequence(lowered + spaced)


def _byte_level_bpe(vocab_size: int, specials: list[str], corpus: Sequence[str] | None = None,
                    fold_case: bool = False, **special_tokens: Any) -> Any:
    """A byte-level BPE tokenizer trained here, on `corpus` or a small built-in one: any text encodes, nothing
    downloads. Trained on the texts a model will see, frequent words become single tokens (short sequences).

    `specials` get the first ids, in order; `special_tokens` are PreTrainedTokenizerFast's keyword arguments
    (unk_token, bos_token, ..., extra_special_tokens).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    if fold_case:
        tokenizer.normalizer = fold_case_rules()
    # Every digit and capital letter is a token of its own (with the space before it, if any), as LLaMA's tokenizer
    # does for digits: "RAIN" is R A I N and "12" is 1 2, so a model that reads letters and digits one cell at a
    # time writes words and numbers with the tokens it already knows, not with merges like "AI" it saw rarely.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" ?[A-Z0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = list(corpus) if corpus is not None else [_TOKENIZER_CORPUS] * 4
    # " A" ... " Z", " 0" ... " 9" each become one token however rare they are in `corpus`: a lone space token
    # before an answer is easy to mis-learn (see data.dataset.with_separator_spaces).
    texts += [" ".join(["", *string.ascii_uppercase, *string.digits])] * 64
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)


def tiny_tokenizer(vocab_size: int = 512, corpus: Sequence[str] | None = None, fold_case: bool = False) -> Any:
    """LLaVA's tiny tokenizer: a locally trained byte-level BPE with <s>, </s>, <pad> and <image> (`fold_case`:
    with `fold_case_rules` as its normalizer)."""
    return _byte_level_bpe(vocab_size, ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN], corpus, fold_case,
                           unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                           extra_special_tokens={"image_token": IMAGE_TOKEN})


def tiny_qwen2_vl_tokenizer(vocab_size: int = 512) -> Any:
    """Qwen2-VL's and Qwen2.5-VL's tiny tokenizer: the same BPE with ChatML and vision tokens; eos <|im_end|>,
    pad <|endoftext|>."""
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", *QWEN2_VL_TOKENS.values()]
    return _byte_level_bpe(vocab_size, specials, unk_token="<unk>", eos_token="<|im_end|>",
                           pad_token="<|endoftext|>", extra_special_tokens=dict(QWEN2_VL_TOKENS))


def _clip_vision_config(spec: TinySpec) -> Any:
    """The CLIP-style vision tower of the tiny LLaVA and LLaVA-NeXT."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=spec.vision_hidden,
                            intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
                            num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                            image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden)


def _llama_config(spec: TinySpec, tokenizer: Any) -> Any:
    """The Llama language model of the tiny LLaVA, LLaVA-NeXT and Idefics3."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.text_hidden,
                       intermediate_size=spec.intermediate, num_hidden_layers=spec.text_layers,
                       num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _save_tiny(model_class: type, config: Any, processor: Any, spec: TinySpec, out: Path,
               **generation: Any) -> Path:
    """Build `model_class(config)` from spec.seed, set its generation config's `generation` ids, and save it with
    the processor and the spec (tiny_spec.json) to `out`, in the family's checkpoint format."""
    torch.manual_seed(spec.seed)
    model = model_class(config)
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


def tiny(out_dir: str | Path, spec: TinySpec | None = None, corpus: Sequence[str] | None = None) -> Path:
    """Write a tiny, randomly initialised LLaVA (model + processor) to `out_dir`, loadable with `load(out_dir)`.

    `corpus`: texts to train the tokenizer on (default: a small built-in corpus).
    """
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(spec.vocab_size, corpus, spec.fold_case)
    image_tokens = (spec.image_size // spec.patch_size) ** 2
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=VICUNA_CHAT_TEMPLATE)
    vision, text = _clip_vision_config(spec), _llama_config(spec, tokenizer)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=image_tokens, vision_feature_layer=spec.vision_feature_layer,
                         vision_feature_select_strategy="default")
    return _save_tiny(LlavaForConditionalGeneration, config, processor, spec, out, pad_token_id=tokenizer.pad_token_id)


def tiny_llava_next(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a tiny, randomly initialised LLaVA-NeXT (model + processor) to `out_dir`, loadable with `load(out_dir)`.

    As `tiny`, with LLaVA-NeXT's any-resolution images: grid pinpoints of 1x1, 1x2, 2x1 and 2x2 tiles of image_size,
    so an image is the whole image resized plus 1 to 4 tiles, and its number of image tokens follows its aspect
    ratio (the processor's image_sizes tell the model how to unpad it).
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(spec.vocab_size, fold_case=spec.fold_case)
    side = spec.image_size
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": side},
                                                 crop_size={"height": side, "width": side},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=VICUNA_CHAT_TEMPLATE)
    vision, text = _clip_vision_config(spec), _llama_config(spec, tokenizer)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                             image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                             vision_feature_layer=spec.vision_feature_layer, vision_feature_select_strategy="default")
    return _save_tiny(LlavaNextForConditionalGeneration, config, processor, spec, out,
                      pad_token_id=tokenizer.pad_token_id)


def _mrope_section(head_dim: int) -> list[int]:
    """M-RoPE's split of the rotary frequencies over (time, height, width); Qwen2-VL's [16, 24, 24] at head_dim 128."""
    half = head_dim // 2
    time = max(1, half // 4)
    height = (half - time) // 2
    return [time, height, half - time - height]


def tiny_qwen2_vl(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a tiny, randomly initialised Qwen2-VL (model + processor) to `out_dir`, loadable with `load(out_dir)`.

    The vision patch is spec.patch_size // 2 (2x2 patches merge into one image token), and the image processor's
    min and max pixels are both image_size**2, so an image_size x image_size image gives (image_size /
    patch_size)**2 image tokens. The processor saved is a standard Qwen2VLProcessor, with a video-processor section
    for environments that have torchvision. Model inputs need the processor's `mm_token_type_ids` (M-RoPE positions)
    next to `pixel_values` and `image_grid_thw`: Qwen2-VL's forward raises without it (Qwen2.5-VL's silently falls
    back to one position per token).
    """
    return _tiny_qwen("qwen2_vl", out_dir, spec)


def tiny_qwen2_5_vl(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a tiny, randomly initialised Qwen2.5-VL (model + processor) to `out_dir`, loadable with `load(out_dir)`.

    As `tiny_qwen2_vl`, with Qwen2.5-VL's vision tower (RMSNorm, gated MLP, window attention in every block but the
    last, which attends to the whole image as Qwen2.5-VL's full-attention blocks do) and a Qwen2_5_VLProcessor. The
    window is two image tokens wide, so an image of more than 2x2 tokens is split into windows.
    """
    return _tiny_qwen("qwen2_5_vl", out_dir, spec)


def _merged_patch_spec(spec: TinySpec | None, builder: str) -> TinySpec:
    """`spec` (or the default) for a model that merges 2x2 vision patches into one image token (Qwen2-VL's merger,
    Idefics3's pixel shuffle): its image token's side must be an even number of pixels that divides the image's."""
    spec = spec or TinySpec()
    if spec.patch_size % 2 or spec.image_size % spec.patch_size:
        raise ValueError(f"{builder} needs an even patch_size that divides image_size; got "
                         f"patch_size={spec.patch_size}, image_size={spec.image_size}")
    return spec


def _tiny_qwen(family: str, out_dir: str | Path, spec: TinySpec | None) -> Path:
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    spec = _merged_patch_spec(spec, f"tiny_{family}")
    merge = 2
    vision_patch = spec.patch_size // merge
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_qwen2_vl_tokenizer(spec.vocab_size)
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in QWEN2_VL_TOKENS.items()}
    # The same files with or without torchvision: the PIL image processor saves as "Qwen2VLImageProcessor" (both
    # families use it), and the image-only processor saves as the family's processor class with a video-processor
    # section derived from the image one.
    pixels = spec.image_size**2
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=vision_patch,
                                               merge_size=merge, temporal_patch_size=2)
    processor = _image_only_processor_class(*_PROCESSORS_WITH_VIDEO[family])(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    prefix = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[family]
    common_vision = dict(depth=spec.vision_layers, num_heads=spec.vision_heads, patch_size=vision_patch,
                         spatial_merge_size=merge, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision = transformers.Qwen2VLVisionConfig(embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden,
                                                  mlp_ratio=2, **common_vision)
    else:
        vision = transformers.Qwen2_5_VLVisionConfig(
            hidden_size=spec.vision_hidden, out_hidden_size=spec.text_hidden,
            intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
            window_size=2 * spec.patch_size, fullatt_block_indexes=[spec.vision_layers - 1], **common_vision)
    text = getattr(transformers, f"{prefix}TextConfig")(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "mrope_section": _mrope_section(spec.text_hidden // spec.text_heads)},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision, text_config=text, image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"])
    return _save_tiny(getattr(transformers, f"{prefix}ForConditionalGeneration"), config, processor, spec, out,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)


def tiny_idefics3(out_dir: str | Path, spec: TinySpec | None = None, image_splitting: bool = False) -> Path:
    """Write a tiny, randomly initialised Idefics3 (model + processor) to `out_dir`, loadable with `load(out_dir)`.

    The vision patch is spec.patch_size // 2: the connector's pixel shuffle (scale factor 2) merges 2x2 patches into
    one image token, so an image of image_size gives (image_size / patch_size)**2 tokens, as for the other families.
    The processor resizes an image's longest edge to image_size. With `image_splitting`, it resizes to twice that and
    splits the image into crops of image_size plus the whole image, as Idefics3 does with large images: an image
    then has 1 to 5 crops, so the items of a batch differ in their number of crops.
    """
    return _tiny_idefics_family("idefics3", out_dir, spec, image_splitting)


def tiny_smolvlm(out_dir: str | Path, spec: TinySpec | None = None, image_splitting: bool = False) -> Path:
    """Write a tiny, randomly initialised SmolVLM (model + processor) to `out_dir`, loadable with `load(out_dir)`.

    As `tiny_idefics3` (SmolVLM is Idefics3's architecture), in SmolVLM's checkpoint format: a SmolVLMProcessor
    (which needs the `num2words` package: `pip install cmlora[smolvlm]`), SmolVLM's conversation format
    ("<|im_start|>User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"), <|im_start|> as
    the tokenizer's bos and <|im_end|> as its pad token.
    """
    return _tiny_idefics_family("smolvlm", out_dir, spec, image_splitting)


def _tiny_idefics_family(family: str, out_dir: str | Path, spec: TinySpec | None, image_splitting: bool) -> Path:
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[family]
    spec = _merged_patch_spec(spec, f"tiny_{family}")
    scale = 2
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family == "idefics3":
        bos, pad, template = "<|begin_of_text|>", "<pad>", IDEFICS3_CHAT_TEMPLATE
    else:
        bos, pad, template = "<|im_start|>", "<|im_end|>", SMOLVLM_CHAT_TEMPLATE
    specials = ["<unk>", bos, pad, *IDEFICS3_TOKENS.values()]
    tokenizer = _byte_level_bpe(spec.vocab_size, specials, unk_token="<unk>", bos_token=bos,
                                eos_token=IDEFICS3_TOKENS["end_of_utterance_token"], pad_token=pad,
                                extra_special_tokens=dict(IDEFICS3_TOKENS))
    image_tokens = (spec.image_size // spec.patch_size) ** 2
    longest = spec.image_size * (2 if image_splitting else 1)
    image_processor = getattr(transformers, f"{prefix}ImageProcessorPil")(
        do_image_splitting=image_splitting, size={"longest_edge": longest},
        max_image_size={"longest_edge": spec.image_size})
    processor_class = transformers.Idefics3Processor if family == "idefics3" else \
        _image_only_processor_class(*_PROCESSORS_WITH_VIDEO[family])
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_tokens,
                                chat_template=template)
    vision = getattr(transformers, f"{prefix}VisionConfig")(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size // scale)
    text = _llama_config(spec, tokenizer)
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision, text_config=text, scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids(IDEFICS3_TOKENS["image_token"]))
    return _save_tiny(getattr(transformers, f"{prefix}ForConditionalGeneration"), config, processor, spec, out,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
