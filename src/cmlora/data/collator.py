"""Batching dataset items for `model(**batch)`: right padding, attention mask, stacked images, task ids.

The batch holds only what the model's forward accepts (plus the MixLoRA task-id key, which the MixLoRA model
reads for task-conditioned routing and analysis): HF Trainer passes the whole dict to `model(**batch)`, so record
ids and task names stay out. Images of a mixed batch are stacked in batch order, which is the order in which a
LLaVA-style model fills the image tokens of the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .dataset import IGNORE_INDEX


class InstructionCollator:
    """Collate InstructionDataset items into input_ids/attention_mask/labels [B, T] (+ pixel_values, task ids)."""

    def __init__(self, pad_token_id: int, *, task_ids_key: str | None = "mixlora_task_ids",
                 pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.task_ids_key = task_ids_key
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("InstructionCollator got an empty list of items")
        for item in items:
            if len(item["input_ids"]) != len(item["labels"]):
                raise ValueError(f"item {item.get('id', '?')!r}: input_ids and labels differ in length "
                                 f"({len(item['input_ids'])} vs {len(item['labels'])})")
        width = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            length = len(item["input_ids"])
            input_ids[row, :length] = torch.as_tensor(item["input_ids"])
            labels[row, :length] = torch.as_tensor(item["labels"])
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.stack(images)
        if self.task_ids_key is not None:
            batch[self.task_ids_key] = torch.tensor([int(item["task_id"]) for item in items], dtype=torch.long)
        return batch
