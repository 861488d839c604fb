"""What one model call tells every MixLoRA layer: pooling masks, task ids, whether it continues a KV cache.

The tuner registers a forward pre-hook on the wrapped model; the hook fills a `RoutingContext` that all adapted
layers of that model share. Layers therefore never need per-layer wiring, and the same path serves
`PeftModel.forward`, plain calls of the wrapped model and each step inside `generate` (whose internal forward
calls do not pass through `PeftModel.forward`).

The context holds the state of the latest model call until the next one begins. Gradient checkpointing relies
on that: layers recomputed during backward see the same masks (and, through torch's preserved RNG state, the
same random draws) as in the forward, so backward must follow its forward before the next model call, as with
PEFT's own per-call hooks. Calling an inner submodule directly, bypassing the hooked model, is not supported.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .routing import Selection

IGNORE_INDEX = -100
# The keyword that carries task ids (routing='task') in model calls and generate. Not `task_ids`: PEFT's
# PeftModelForCausalLM.forward consumes an argument of that name for its own methods and drops it.
TASK_IDS_KWARG = "mixlora_task_ids"


def is_continuing_cache(past_key_values: object) -> bool:
    """True when a model call continues a filled KV cache (a decode step), False for a prefill or no cache."""
    if past_key_values is None:
        return False
    get_seq_length = getattr(past_key_values, "get_seq_length", None)
    if get_seq_length is None:
        raise TypeError(
            f"past_key_values of type {type(past_key_values).__name__} has no get_seq_length(); MixLoRA needs a "
            "transformers Cache object to tell a prefill from a decode step."
        )
    return int(get_seq_length()) > 0


def routing_mask(
    attention_mask: torch.Tensor | None, labels: torch.Tensor | None, pooling: str
) -> torch.Tensor | None:
    """The positions an instance is pooled over, [B, T] bool, or None for 'all positions'.

    'prompt': non-padding positions whose label is IGNORE_INDEX (the positions a generation prefill also sees);
    'all': non-padding positions; 'reference': None (the reference code's unmasked mean).
    An instance with no prompt position (every token labelled) falls back to its non-padding positions.
    """
    if pooling == "reference":
        return None
    mask = None if attention_mask is None else attention_mask.bool()
    if pooling == "all" or labels is None:
        return mask
    if mask is not None and labels.shape != mask.shape:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match attention_mask of shape {tuple(mask.shape)}; "
            "MixLoRA's pooling='prompt' needs labels aligned with input_ids (-100 on prompt positions)."
        )
    valid = mask if mask is not None else torch.ones_like(labels, dtype=torch.bool)
    prompt = valid & (labels == IGNORE_INDEX)
    empty = ~prompt.any(dim=1)
    if bool(empty.any()):
        warnings.warn(
            f"{int(empty.sum())} instance(s) have no prompt position (every token labelled); MixLoRA pools them "
            "over all their non-padding positions instead. Label prompt tokens -100 to route on the prompt.",
            stacklevel=2,
        )
        prompt = torch.where(empty.unsqueeze(1), valid, prompt)
    return prompt


@dataclass
class RoutingRecord:
    """Selections of one adapted layer (one adapter) for one model call."""

    index_a: torch.Tensor  # [B, r]
    index_b: torch.Tensor  # [B, r]


@dataclass
class RoutingTrace:
    """Per adapted layer, the factors each instance selected, in call order. Filled by `trace_routing`."""

    records: dict[str, list[RoutingRecord]] = field(default_factory=lambda: defaultdict(list))

    @property
    def layers(self) -> list[str]:
        return list(self.records)

    def indices(self, layer: str, pool: str = "a") -> torch.Tensor:
        """All instances' selected indices of `pool` ('a' or 'b') at `layer`, concatenated: [N, r]."""
        if pool not in ("a", "b"):
            raise ValueError(f"pool must be 'a' or 'b', got {pool!r}")
        if layer not in self.records:
            raise KeyError(f"no routing recorded for layer {layer!r}; recorded layers: {self.layers[:5]}...")
        return torch.cat([getattr(rec, f"index_{pool}") for rec in self.records[layer]])


class RoutingContext:
    """State shared by the layers of one tuner during (and after) one model call."""

    def __init__(self) -> None:
        self.call_id = 0
        self.attention_mask: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.task_ids: torch.Tensor | None = None
        self.continuing = False
        self._masks: dict[str, torch.Tensor | None] = {}
        self._selections: dict[tuple[str, str], Selection] = {}
        self.aux_losses: dict[tuple[str, str], torch.Tensor] = {}
        self._traces: list[RoutingTrace] = []
        self._traced: set[tuple[int, str, str]] = set()
        self._generation_task_ids: torch.Tensor | None = None

    def begin_call(
        self,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        task_ids: torch.Tensor | None,
        past_key_values: object,
    ) -> None:
        self.call_id += 1
        self.continuing = is_continuing_cache(past_key_values)
        self._masks = {}
        self.aux_losses = {}
        if self.continuing:
            return  # masks, task ids and selections of the prefill stay in force
        self.attention_mask = attention_mask
        self.labels = labels
        if task_ids is None:
            task_ids = self._generation_task_ids
        self.task_ids = None if task_ids is None else torch.as_tensor(task_ids).long().view(-1)
        self._selections = {}

    @contextlib.contextmanager
    def generation_task_ids(self, task_ids: torch.Tensor | None) -> Iterator[None]:
        """Task ids for every model call inside one `generate` (which cannot pass them through itself)."""
        self._generation_task_ids = task_ids
        try:
            yield
        finally:
            self._generation_task_ids = None

    def task_ids_for(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """Task ids for a batch of `batch` instances; generate's beams and return sequences repeat each row."""
        if self.task_ids is None:
            return None
        count = self.task_ids.numel()
        if count == batch:
            return self.task_ids.to(device)
        if batch % count == 0:
            return self.task_ids.repeat_interleave(batch // count).to(device)
        raise ValueError(f"task_ids has {count} entries but the batch has {batch} instances.")

    def pooling_mask(self, pooling: str, batch: int, seq_len: int) -> torch.Tensor | None:
        """The mask for a layer input of shape [batch, seq_len, d]; None means pool over all positions.

        A layer whose input does not line up with the model call's tokens (e.g. a vision encoder's patches)
        has no padding of its own and is pooled over all its positions.
        """
        if pooling not in self._masks:
            self._masks[pooling] = routing_mask(self.attention_mask, self.labels, pooling)
        mask = self._masks[pooling]
        if mask is None or tuple(mask.shape) != (batch, seq_len):
            return None
        return mask

    def cached_selection(self, layer: str, adapter: str, batch: int) -> Selection | None:
        """The prefill's selection when this call continues a KV cache, else None."""
        if not self.continuing:
            return None
        selection = self._selections.get((layer, adapter))
        if selection is None:
            raise RuntimeError(
                f"MixLoRA layer {layer!r} is asked to continue a KV cache but holds no routing from a prefill. "
                "Fill the cache with a call of this same model (not of another model or submodule)."
            )
        if selection.batch_size != batch:
            raise RuntimeError(
                f"MixLoRA layer {layer!r}: the cached routing is for {selection.batch_size} instances but the call "
                f"continuing the cache has {batch}. Generation modes that change the batch size during decoding "
                "are not supported."
            )
        return selection

    def last_selection(self, layer: str, adapter: str) -> Selection | None:
        """The selection `layer` made for `adapter` in the latest model call (or its prefill), if any."""
        return self._selections.get((layer, adapter))

    def store(self, layer: str, adapter: str, selection: Selection) -> None:
        self._selections[(layer, adapter)] = selection
        key = (self.call_id, layer, adapter)
        if self._traces and key not in self._traced:  # once per call: gradient checkpointing recomputes layers
            self._traced.add(key)
            record = RoutingRecord(selection.index_a.detach().cpu(), selection.index_b.detach().cpu())
            for trace in self._traces:
                trace.records[f"{layer}@{adapter}" if adapter != "default" else layer].append(record)

    @contextlib.contextmanager
    def tracing(self) -> Iterator[RoutingTrace]:
        trace = RoutingTrace()
        self._traces.append(trace)
        try:
            yield trace
        finally:
            self._traces.remove(trace)
            if not self._traces:
                self._traced.clear()
