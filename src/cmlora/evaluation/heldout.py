"""Held-out accuracy per task on Vision-Flan-format records: did training learn its own tasks?

Each record holds one question and its answer (a second turn pair is an error: the answer would depend on the
first). The answer counts when the greedy answer equals the target after lower-casing and stripping; the tasks'
own answer conventions (digits or number words, yes/no or true/false, ...) are part of what is measured, so no
further normalisation is applied. A record without an image (text-only instruction data, as LLaVA's mix holds)
is asked as text alone. Predictions go through `predict`, so a killed run resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..data import load_records
from ..data.records import IMAGE_MARKER, record_error
from .generate import GenerationSettings, predict
from .inputs import EvalExample
from .tasks import TaskSpec


def records_as_examples(records_file: Path, image_folder: Path | None = None) -> list[EvalExample]:
    records, _ = load_records(records_file, image_folder)
    examples = []
    for record in records:
        turns = record.conversations
        if len(turns) != 2:
            raise record_error(record.source, record.id, "conversations", "a held-out record needs exactly one "
                               f"question and one answer, got {len(turns)} turns", "not single-turn")
        examples.append(EvalExample(uid=record.id, task=record.task_name or "unknown", image=record.image,
                                    prompt=heldout_prompt(turns[0].text), target=turns[1].text,
                                    source=record.source))
    return examples


def heldout_prompt(question: str) -> str:
    """The question of a held-out record as the evaluation asks it: without its `<image>` marker when the image
    comes first (the prompt's default place for it), else with the marker where the record has it, so that a
    record written "question\n<image>", as part of LLaVA-1.5's data is, is asked as it was trained."""
    text = question.strip()
    if text.startswith(IMAGE_MARKER) or IMAGE_MARKER not in text:
        return text.replace(IMAGE_MARKER, "", 1).strip()
    return text


def exact_match(prediction: str, target: str) -> bool:
    return prediction.strip().lower() == target.strip().lower()


def evaluate_heldout(model: nn.Module, processor: Any, records_file: Path, out_path: Path,
                     settings: GenerationSettings, model_id: str = "", image_folder: Path | None = None,
                     overwrite: bool = False) -> dict[str, dict[str, float]]:
    """{task: {"accuracy", "count"}} over the records of `records_file`; predictions in `out_path` (JSONL)."""
    examples = records_as_examples(Path(records_file), image_folder)
    tokenizer = getattr(processor, "tokenizer", processor)
    longest = max(len(tokenizer(str(e.target), add_special_tokens=False).input_ids) for e in examples)
    spec = TaskSpec("exact", max_new_tokens=longest + 2)  # room for the longest target; a longer answer is wrong
    predictions = predict(model, processor, examples, spec, out_path, settings, model_id, overwrite)
    correct: dict[str, list[bool]] = {}
    for example, line in zip(examples, predictions, strict=True):
        correct.setdefault(example.task, []).append(exact_match(line["prediction"], str(example.target)))
    return {task: {"accuracy": sum(hits) / len(hits), "count": len(hits)} for task, hits in sorted(correct.items())}
