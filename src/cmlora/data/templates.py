"""Conversation templates: turns -> one prompt string plus the character spans of the assistant answers.

A template returns text and answer spans rather than tokens. The dataset tokenizes the whole text in one call
(exactly as the processor will tokenize a prompt at inference, image-token expansion included) and labels the
tokens whose character offsets overlap an answer span; everything else gets -100. Tokenizing the full text once,
instead of segment by segment, avoids the boundary mismatches of BPE/SentencePiece on separately encoded pieces.

Each answer span covers the answer and its end-of-turn string ("</s>" in Vicuna v1), so the model learns to stop,
and nothing after it (a newline a chat template writes after its end-of-turn token is not learned).

Which template: "vicuna_v1" is the paper's format for LLaVA-1.5 (Vicuna); "chat" renders with the checkpoint's own
chat template, the format the model was instruction-tuned in and is prompted in after training (Qwen2-VL's
ChatML). cmlora.train's default, "auto", picks vicuna_v1 for LLaVA and chat for the other families. Both work with
every supported processor: vicuna_v1 writes each family's own image placeholder (IMAGE_PLACEHOLDERS) and ends
answers with the tokenizer's eos token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .records import IMAGE_MARKER, Turn


@dataclass
class RenderedConversation:
    text: str
    answer_spans: list[tuple[int, int]]  # [start, end) character offsets of each answer (with its end string)


Template = Callable[[list[Turn], Any], RenderedConversation]

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V1_SEP = " "  # after the system prompt and after each user turn
VICUNA_V1_SEP2 = "</s>"  # after each assistant answer; Llama tokenizers read it as the eos token
# What stands for one image in the prompt, by the processor's image token, where that token alone is not it: the
# processor expands the image token into the image's tokens, and the model also expects the tokens around it.
# Qwen2-VL and Qwen2.5-VL wrap <|image_pad|> in vision start/end tokens, as their chat templates do.
IMAGE_PLACEHOLDERS = {"<|image_pad|>": "<|vision_start|><|image_pad|><|vision_end|>"}


def image_placeholder(processor: Any) -> str:
    """The text that stands for one image for `processor`: `<image>` for LLaVA, Qwen2-VL's vision-wrapped pad."""
    image_token = getattr(processor, "image_token", None) or IMAGE_MARKER
    return IMAGE_PLACEHOLDERS.get(image_token, image_token)


def vicuna_v1(turns: list[Turn], processor: Any = None) -> RenderedConversation:
    """LLaVA-v1's conv_vicuna_v1: "{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>".

    For other families the data's `<image>` marker becomes the processor's image placeholder (`image_placeholder`)
    and "</s>" the tokenizer's eos token (Qwen2-VL: <|im_end|>), so the model learns to stop where generation does.
    """
    return _user_assistant(turns, processor, VICUNA_V1_SYSTEM + VICUNA_V1_SEP)


def plain(turns: list[Turn], processor: Any = None) -> RenderedConversation:
    """"{q} {a}</s>{q2} {a2}</s>": no system prompt and no role words, for stage-1 pretraining of a tiny base (as
    LLaVA's stage 1 uses its bare "plain" format). A dense pretraining conversation (six questions and a
    description) is then about half as many tokens, so twice as many images fit in a CPU budget."""
    return _user_assistant(turns, processor, "", roles=("", ""))


def _user_assistant(turns: list[Turn], processor: Any, prefix: str,
                    roles: tuple[str, str] = ("USER: ", "ASSISTANT: ")) -> RenderedConversation:
    placeholder = image_placeholder(processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    end = getattr(tokenizer, "eos_token", None) or VICUNA_V1_SEP2
    text = prefix
    spans = []
    for turn in turns:
        if turn.role == "user":
            text += roles[0] + turn.text.replace(IMAGE_MARKER, placeholder) + VICUNA_V1_SEP
        else:
            text += roles[1]
            start = len(text)
            text += turn.text + end
            spans.append((start, len(text)))
    return RenderedConversation(text=text, answer_spans=spans)


def chat(turns: list[Turn], processor: Any) -> RenderedConversation:
    """The processor's own chat template (`apply_chat_template`), for models not trained on Vicuna v1.

    Answer spans come from rendering prefixes: the answer of turn k is what rendering turns[:k+1] adds to
    rendering turns[:k] with the generation prompt, less trailing whitespace (ChatML's newline after <|im_end|>:
    generation stops at the end token, so what follows it is not learned). That needs a prefix-stable template (true
    of common ones); a template that rewrites earlier turns raises, since its answer spans cannot be located.
    """
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("template='chat' needs a processor with a chat_template; this one has none. "
                         "Use template='vicuna_v1' or set processor.chat_template.")
    messages = [_chat_message(turn) for turn in turns]

    def render(count: int, generation_prompt: bool) -> str:
        return processor.apply_chat_template(messages[:count], tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = render(len(messages), False)
    spans = []
    for index, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        before, after = render(index, True), render(index + 1, False)
        if not (after.startswith(before) and text.startswith(after)):
            raise ValueError("template='chat': the processor's chat template is not prefix-stable (rendering more "
                             "turns changes earlier text), so answer spans cannot be located; use 'vicuna_v1'.")
        spans.append((len(before), max(len(before), len(after.rstrip()))))
    return RenderedConversation(text=text, answer_spans=spans)


def _chat_message(turn: Turn) -> dict[str, Any]:
    """A chat message whose content lists text items and an {"type": "image"} item where `<image>` stood.

    The newline LLaVA data puts after the marker is dropped: chat templates place their own separator after an
    image item. An empty turn (the answer a generation prompt is cut from) is one empty text item, not an empty
    list: SmolVLM's template reads the first item of every turn.
    """
    content: list[dict[str, str]] = []
    for index, piece in enumerate(turn.text.split(IMAGE_MARKER)):
        if index > 0:
            content.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if piece:
            content.append({"type": "text", "text": piece})
    return {"role": turn.role, "content": content or [{"type": "text", "text": ""}]}


TEMPLATES: dict[str, Template] = {"vicuna_v1": vicuna_v1, "plain": plain, "chat": chat}


def generation_prompt(turns: list[Turn], processor: Any, template: str) -> str:
    """The text a model is prompted with to answer after `turns` (ending with a user turn), in `template`.

    Rendered exactly as in training, with an empty answer appended, and cut where that answer starts, so a
    model sees at inference what preceded its answers in training. Vicuna v1's space after "ASSISTANT:" is left
    out: in training it was tokenized into the answer's first token.
    """
    if not turns or turns[-1].role != "user":
        raise ValueError("generation_prompt: the conversation must end with a user turn")
    rendered = TEMPLATES[template]([*turns, Turn("assistant", "")], processor)
    return rendered.text[: rendered.answer_spans[-1][0]].rstrip(" ")
