"""Batched generation of answers, written to JSONL as they are produced and resumable.

Greedy decoding by default; sampling only when asked, and then seeded. Prompts are left-padded (the model sees
each prompt's last token at the same position) and MixLoRA routes once per prompt at prefill, so an example's
answer does not depend on the batch size or on its batch mates (tested).

A predictions file starts with a header line `{"_meta": {...}}` naming the model, the inputs (a fingerprint of
uids, images, prompts and targets) and the generation settings; then one line per example. A rerun with the same
header continues after the last complete line (a line cut short by a kill is dropped and regenerated); a rerun
with another model, input set or settings is an error naming the file, unless `overwrite` is set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..data import Turn, generation_prompt, load_image
from ..data.records import IMAGE_MARKER
from .inputs import EvalExample, input_fingerprint
from .tasks import TaskSpec


class PredictionsMismatchError(ValueError):
    """A predictions file was written for another model, input set or generation settings."""


@dataclass(frozen=True)
class GenerationSettings:
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    template: str = "vicuna_v1"
    # The text-only baseline: each image replaced by a black one of its size (same image tokens, no content).
    blank_images: bool = False

    def for_header(self) -> dict[str, Any]:
        """What determines the answers (the batch size does not)."""
        values = asdict(self)
        values.pop("batch_size")
        if not self.blank_images:
            values.pop("blank_images")  # so files written before the option existed stay valid
        if not self.do_sample:
            for key in ("temperature", "top_p", "seed"):
                values.pop(key)
        return values


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes; for files over 256 MiB, of its name, size and modification time (a 7B checkpoint
    is not worth hashing on every evaluation)."""
    stat = path.stat()
    if stat.st_size > 256 * 2**20:
        return f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def model_fingerprint(*folders: Path) -> str:
    """An id for the weights in `folders` (base model, adapter): changes when any weight file changes."""
    parts = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin")):
            parts.append(f"{path.name}={file_fingerprint(path)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def prompt_text(example: EvalExample, spec: TaskSpec, processor: Any, template: str) -> str:
    """The generation prompt: the image first, unless the example's prompt places it (held-out records written
    "question\n<image>"), then the question and the task's answer-format suffix."""
    question = f"{example.prompt} {spec.suffix}".strip() if spec.suffix else example.prompt
    content = question if IMAGE_MARKER in question or example.image is None else f"{IMAGE_MARKER}\n{question}"
    return generation_prompt([Turn("user", content)], processor, template)


def read_predictions(path: Path, header: dict[str, Any], overwrite: bool) -> dict[str, dict[str, Any]]:
    """The predictions already in `path` for this header (uid -> line); {} for a new or overwritten file."""
    if not path.exists() or overwrite:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"_meta": header}) + "\n")
        return {}
    lines = path.read_text().split("\n")
    try:
        found = json.loads(lines[0])["_meta"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PredictionsMismatchError(f"{path}:1: not a cmlora predictions file (no _meta header): {error}") from None
    differing = sorted(key for key in set(found) | set(header) if found.get(key) != header.get(key))
    if differing:
        raise PredictionsMismatchError(
            f"{path} was written for another {', '.join(differing)} ({ {k: found.get(k) for k in differing} } vs "
            f"{ {k: header.get(k) for k in differing} }); use another output folder or --overwrite."
        )
    done: dict[str, dict[str, Any]] = {}
    complete = [lines[0]]
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) or all(not rest.strip() for rest in lines[number:]):
                break  # the last line, cut short by a killed run: regenerate it
            raise PredictionsMismatchError(f"{path}:{number}: unreadable line in the middle of the file") from None
        done[record["uid"]] = record
        complete.append(line)
    path.write_text("\n".join(complete) + "\n")
    return done


def batches(items: Sequence[EvalExample], size: int) -> Iterator[list[EvalExample]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


@torch.no_grad()
def generate_answers(model: nn.Module, processor: Any, examples: Sequence[EvalExample], spec: TaskSpec,
                     settings: GenerationSettings) -> list[str]:
    """Answers for one batch of examples (left-padded prompts, new tokens only, special tokens dropped). Text-only
    examples (no image) are generated apart from the others, since a processor call takes an image for every
    prompt or for none; the answers come back in the batch's order."""
    with_image = [example.image is not None for example in examples]
    if any(with_image) and not all(with_image):
        answers: list[str] = [""] * len(examples)
        for flag in (True, False):
            where = [i for i, has in enumerate(with_image) if has == flag]
            part = generate_answers(model, processor, [examples[i] for i in where], spec, settings)
            for i, answer in zip(where, part, strict=True):
                answers[i] = answer
        return answers
    tokenizer = getattr(processor, "tokenizer", processor)
    texts = [prompt_text(example, spec, processor, settings.template) for example in examples]
    inputs_kwargs: dict[str, Any] = {}
    if all(with_image):
        images = [load_image(example.image) for example in examples]
        if settings.blank_images:
            images = [Image.new("RGB", image.size) for image in images]
        # One list of images per prompt: SmolVLM's processor refuses a flat list for a batch; the others take both.
        inputs_kwargs["images"] = [[image] for image in images]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = processor(text=texts, padding=True, return_tensors="pt", **inputs_kwargs)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    options: dict[str, Any] = {"max_new_tokens": spec.max_new_tokens, "do_sample": settings.do_sample,
                               "pad_token_id": tokenizer.pad_token_id}
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    output = model.generate(**inputs, **options)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def predict(model: nn.Module, processor: Any, examples: Sequence[EvalExample], spec: TaskSpec, out_path: Path,
            settings: GenerationSettings, model_id: str, overwrite: bool = False) -> list[dict[str, Any]]:
    """Predictions for every example, in input order, appended to `out_path` batch by batch (see module doc)."""
    header = {"model": model_id, "inputs": input_fingerprint(examples), "generation": settings.for_header(),
              "task_spec": asdict(spec)}
    done = read_predictions(out_path, header, overwrite)
    todo = [example for example in examples if example.uid not in done]
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    model.eval()
    with open(out_path, "a") as handle, tqdm(total=len(examples), initial=len(examples) - len(todo),
                                              desc=out_path.stem, unit="ex") as progress:
        for batch in batches(todo, settings.batch_size):
            for example, answer in zip(batch, generate_answers(model, processor, batch, spec, settings), strict=True):
                target = list(example.target) if isinstance(example.target, tuple) else example.target
                record = {"uid": example.uid, "prediction": answer, "target": target, "prompt": example.prompt,
                          **({"meta": example.meta} if example.meta else {})}
                done[example.uid] = record
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            progress.update(len(batch))
    return [done[example.uid] for example in examples]
