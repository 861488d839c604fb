"""Batching dataset items for `model(**batch)`: right padding, attention mask, the processor's extra inputs, task ids;
or packed rows (several records per row, no padding between them).

The batch holds only what the model's forward accepts (plus the MixLoRA task-id and segment-id keys, which the
MixLoRA model reads for task-conditioned routing and for packed rows): HF Trainer passes the whole dict to
`model(**batch)`, so record ids and task names stay out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .dataset import IGNORE_INDEX

# Item keys the collator builds itself or keeps out of the batch.
_OWN_KEYS = ("input_ids", "labels", "attention_mask", "task_id", "id")


class InstructionCollator:
    """Collate InstructionDataset items into input_ids/attention_mask/labels [B, T], the processor's extra model
    inputs, and the task ids.

    Every other tensor of an item is a model input the processor returned (see InstructionDataset), batched by
    one of two rules:

    - per-token (a 1-D tensor as long as the item's input_ids, e.g. Qwen2-VL's mm_token_type_ids): right-padded
      to the batch width with 0, like attention_mask; an item without the key gets zeros (text tokens).
    - per-image (any other tensor: pixel_values, image_grid_thw, image_sizes, ...): concatenated along dim 0 in
      batch order, as the processor itself concatenates the images of one call. LLaVA: [1, 3, H, W] per image ->
      [n, 3, H, W]; Qwen2-VL: [patches, dim] -> [sum of patches, dim] and [1, 3] -> [n, 3]; LLaVA-NeXT: [1, 2]
      image_sizes -> [n, 2], and pixel_values [1, patches, 3, H, W] whose patch counts differ are zero-padded to
      the largest, as its processor pads them (the model drops the padding using image_sizes); Idefics3:
      pixel_values [1, crops, 3, H, W] and pixel_attention_mask [1, crops, H, W] zero-padded the same way (the
      model drops all-zero crops).

    Items without an image contribute nothing to the per-image tensors, so image i of the batch belongs to the i-th
    row that has image tokens: the order in which LLaVA and Qwen2-VL fill image tokens (and Qwen2-VL walks
    image_grid_thw for M-RoPE positions). A batch without images has no per-image keys.

    With `pack_width`, the items are packed into rows of at most `pack_width` tokens instead (first fit, longest
    first), each item's position ids restarting at 0, and the batch has position_ids and use_cache=False in place of
    attention_mask. transformers then reads the item boundaries from the position ids and keeps attention within
    each item (`masking_utils.find_packed_sequence_indices`; it does so only without an attention mask and a KV
    cache), so loss and gradients are those of the padded batch, for the tokens of the items alone: padding costs
    compute in proportion to the batch's longest item, and a short-answer task mixed with long descriptions is
    mostly padding. The tail of a row is padding with position ids of its own (a block that attends to itself, never
    labelled). Images follow the items in the order their image tokens appear, row by row. Per-token processor
    inputs are packed as input_ids are (0 on a row's tail). Models with one position per token (LLaVA, LLaVA-NeXT,
    Idefics3) need nothing more; models whose positions are 3-D (Qwen2-VL's and Qwen2.5-VL's M-RoPE, marked by their
    per-token mm_token_type_ids) need `rope_index` (`cmlora.vlm.packed_rope_index(model)`), which gives each item's
    own [3, length] positions: position_ids are then [4, rows, width], the restarting text positions first (where
    transformers reads the item boundaries) and the items' M-RoPE positions after, the layout both models' forward
    takes for packed rows. Per-token inputs without `rope_index` are refused, since the positions the model would
    compute per row would be wrong. For MixLoRA, `segment_ids_key` adds the record of each position ([rows, width],
    the items' indices, -1 on padding), so that it routes each record as one instance; task ids then stay one per
    item, in item order. Without segment ids, task ids with packing are refused (they would be per row).
    """

    def __init__(self, pad_token_id: int, *, task_ids_key: str | None = "mixlora_task_ids",
                 pad_to_multiple_of: int | None = None, pack_width: int | None = None,
                 segment_ids_key: str | None = None,
                 rope_index: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
                 ) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        if pack_width is not None and pack_width < 1:
            raise ValueError(f"pack_width must be positive, got {pack_width}")
        if segment_ids_key is not None and pack_width is None:
            raise ValueError("segment_ids_key marks the records of packed rows; it needs pack_width")
        if rope_index is not None and pack_width is None:
            raise ValueError("rope_index gives the positions of each record of a packed row; it needs pack_width")
        if pack_width is not None and task_ids_key is not None and segment_ids_key is None:
            raise ValueError("pack_width packs several records into one row, and task ids are per record: pass "
                             "segment_ids_key (MixLoRA's 'mixlora_segment_ids') so that the model can tell the records "
                             "apart, or task_ids_key=None")
        self.pad_token_id = pad_token_id
        self.task_ids_key = task_ids_key
        self.segment_ids_key = segment_ids_key
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack_width = pack_width
        self.rope_index = rope_index

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("InstructionCollator got an empty list of items")
        for item in items:
            if len(item["input_ids"]) != len(item["labels"]):
                raise ValueError(f"item {item.get('id', '?')!r}: input_ids and labels differ in length "
                                 f"({len(item['input_ids'])} vs {len(item['labels'])})")
        if self.pack_width is not None:
            return self._pack(items)
        width = self._padded(max(len(item["input_ids"]) for item in items))
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            length = len(item["input_ids"])
            input_ids[row, :length] = torch.as_tensor(item["input_ids"])
            labels[row, :length] = torch.as_tensor(item["labels"])
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        token_keys, image_keys = _extra_keys(items)
        for key in token_keys:
            batch[key] = _pad_per_token(items, key, width)
        for key in image_keys:
            batch[key] = _concatenate_per_image(items, key)
        if self.task_ids_key is not None:
            batch[self.task_ids_key] = torch.tensor([int(item["task_id"]) for item in items], dtype=torch.long)
        return batch

    def _padded(self, width: int) -> int:
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    def _pack(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        token_keys, image_keys = _extra_keys(items)
        if token_keys and self.rope_index is None:
            raise ValueError(f"pack_width: the items have per-token inputs {token_keys}, the mark of a model whose "
                             "positions are 3-D (Qwen2-VL's M-RoPE), and the collator has no rope_index to compute "
                             "them per record: pass rope_index=cmlora.vlm.packed_rope_index(model), or do not pack")
        rows = pack_rows([len(item["input_ids"]) for item in items], self.pack_width,
                         [item.get("id", "?") for item in items])
        width = self._padded(max(sum(len(items[i]["input_ids"]) for i in row) for row in rows))
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        # [rows, width], or [4, rows, width] with rope_index: text positions, then the 3 M-RoPE rows
        position_ids = torch.zeros((len(rows), width) if self.rope_index is None else (4, len(rows), width),
                                   dtype=torch.long)
        segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        per_token = {key: torch.zeros((len(rows), width), dtype=_per_token_dtype(items, key)) for key in token_keys}
        for row, members in enumerate(rows):
            start = 0
            for index in members:
                item = items[index]
                length = len(item["input_ids"])
                span = slice(start, start + length)
                input_ids[row, span] = torch.as_tensor(item["input_ids"])
                labels[row, span] = torch.as_tensor(item["labels"])
                position_ids[..., row, span] = torch.arange(length)  # every row; M-RoPE's 3 replaced below
                if self.rope_index is not None:
                    position_ids[1:, row, span] = self._rope_positions(item)
                for key, packed in per_token.items():
                    if isinstance(item.get(key), torch.Tensor):
                        packed[row, span] = item[key]
                segment_ids[row, span] = index
                start += length
            position_ids[..., row, start:] = torch.arange(width - start)
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                                 **per_token, "use_cache": False}
        in_order = [items[index] for row in rows for index in row]  # the order of the image tokens
        for key in image_keys:
            batch[key] = _concatenate_per_image(in_order, key)
        if self.segment_ids_key is not None:
            batch[self.segment_ids_key] = segment_ids
        if self.task_ids_key is not None:
            batch[self.task_ids_key] = torch.tensor([int(item["task_id"]) for item in items], dtype=torch.long)
        return batch

    def _rope_positions(self, item: dict[str, Any]) -> torch.Tensor:
        """The item's own [3, length] positions, as the model computes them for the item alone."""
        ids = torch.as_tensor(item["input_ids"])
        types = item.get("mm_token_type_ids")
        types = torch.zeros_like(ids) if types is None else torch.as_tensor(types)
        positions = self.rope_index(ids, types, item.get("image_grid_thw"))
        if tuple(positions.shape) != (3, len(ids)):
            raise ValueError(f"item {item.get('id', '?')!r}: rope_index gave positions of shape "
                             f"{tuple(positions.shape)}, not (3, {len(ids)})")
        return positions


def pack_rows(lengths: Sequence[int], width: int, ids: Sequence[Any] | None = None) -> list[list[int]]:
    """The item indices of each row when items of `lengths` are packed into rows of at most `width` tokens: first
    fit, longest first (ties in item order), so rows are few and full; an error naming an item longer than a row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[index] > width:
            name = ids[index] if ids is not None else index
            raise ValueError(f"item {name!r} has {lengths[index]} tokens, more than a packed row's {width}; "
                             "pack_width must be at least the items' max_length")
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def _is_per_token(item: dict[str, Any], value: torch.Tensor) -> bool:
    return value.dim() == 1 and len(value) == len(item["input_ids"])


def _extra_keys(items: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The per-token and the per-image keys of the batch, in first-seen order; an error if a key is both."""
    kinds: dict[str, str] = {}
    for item in items:
        for key, value in item.items():
            if key in _OWN_KEYS or not isinstance(value, torch.Tensor):
                continue
            kind = "token" if _is_per_token(item, value) else "image"
            if kinds.setdefault(key, kind) != kind:
                raise ValueError(f"item {item.get('id', '?')!r}: {key!r} is per-token in some items and per-image "
                                 "in others (a per-token input is a 1-D tensor as long as input_ids)")
    image_keys = [key for key, kind in kinds.items() if kind == "image"]
    for item in items:  # an item with an image has every per-image input, or images and rows would misalign
        if item.get("pixel_values") is not None:
            missing = [key for key in image_keys if item.get(key) is None]
            if missing:
                raise ValueError(f"item {item.get('id', '?')!r} has an image but lacks {missing}, which other "
                                 "items of the batch have")
    return [key for key, kind in kinds.items() if kind == "token"], image_keys


def _per_token_dtype(items: Sequence[dict[str, Any]], key: str) -> torch.dtype:
    return next(item[key].dtype for item in items if isinstance(item.get(key), torch.Tensor))


def _pad_per_token(items: Sequence[dict[str, Any]], key: str, width: int) -> torch.Tensor:
    padded = torch.zeros((len(items), width), dtype=_per_token_dtype(items, key))
    for row, item in enumerate(items):
        if isinstance(item.get(key), torch.Tensor):
            padded[row, : len(item[key])] = item[key]
    return padded


def _concatenate_per_image(items: Sequence[dict[str, Any]], key: str) -> torch.Tensor:
    parts = [item[key] for item in items if isinstance(item.get(key), torch.Tensor)]
    if any(part.dim() != parts[0].dim() for part in parts):
        raise ValueError(f"{key!r}: items have different numbers of dimensions {[p.dim() for p in parts]}")
    if all(part.shape[1:] == parts[0].shape[1:] for part in parts):
        return torch.cat(parts)
    # Only LLaVA-NeXT's patches and Idefics3's crops per image vary beyond dim 0: zero-pad to the largest.
    shape = [max(part.shape[dim] for part in parts) for dim in range(1, parts[0].dim())]
    out = parts[0].new_zeros((sum(len(part) for part in parts), *shape))
    start = 0
    for part in parts:
        out[(slice(start, start + len(part)), *(slice(0, size) for size in part.shape[1:]))] = part
        start += len(part)
    return out
