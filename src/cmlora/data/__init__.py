"""Instruction-tuning data: Vision-Flan / LLaVA records, images, conversation templates, dataset and collator.

    records, report = load_records("train.json", image_folder="images", skip_bad_records=True)
    dataset = InstructionDataset(records, processor, template="vicuna_v1", max_length=2048)
    dataset.validate()            # before training: decodes images, checks lengths (see InstructionDataset)
    collator = InstructionCollator(processor.tokenizer.pad_token_id)
"""

from __future__ import annotations

from .collator import InstructionCollator
from .dataset import InstructionDataset
from .images import load_image
from .records import DataError, Record, SkipReport, Turn, load_records
from .sampling import TaskWeightedSampler
from .templates import TEMPLATES, generation_prompt

__all__ = [
    "TEMPLATES",
    "generation_prompt",
    "DataError",
    "InstructionCollator",
    "InstructionDataset",
    "Record",
    "SkipReport",
    "TaskWeightedSampler",
    "Turn",
    "load_image",
    "load_records",
]
