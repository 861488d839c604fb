"""What one model call tells every MixLoRA layer: pooling masks, task ids, packed records, whether it continues a
KV cache.

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
# The keyword that marks packed rows (several records per row): LongTensor [rows, width], the record (instance) each
# position belongs to, numbered 0..N-1 in the batch's record order, -1 on padding. Each record is routed as one
# instance, as it would be in its own padded row (`PackedSegments`).
SEGMENT_IDS_KWARG = "mixlora_segment_ids"


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


def _warn_no_prompt(count: int) -> None:
    warnings.warn(
        f"{count} instance(s) have no prompt position (every token labelled); MixLoRA pools them over all their "
        "non-padding positions instead. Label prompt tokens -100 to route on the prompt.",
        stacklevel=3,
    )


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
        _warn_no_prompt(int(empty.sum()))
        prompt = torch.where(empty.unsqueeze(1), valid, prompt)
    return prompt


class PackedSegments:
    """The records of a packed call: which instance each position of the [rows, width] input belongs to.

    A MixLoRA layer whose input lines up with the rows pools each record over its own positions (`pool`), selects
    factors per record, and applies each record's factors to its positions alone (`Linear._add_packed_update`), so a
    packed batch routes and computes as its records would in a padded batch of one record per row.
    """

    def __init__(self, segment_ids: torch.Tensor, labels: torch.Tensor | None) -> None:
        segment_ids = torch.as_tensor(segment_ids)
        if segment_ids.dim() != 2 or segment_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{SEGMENT_IDS_KWARG} must be an integer tensor [rows, width], got "
                             f"{segment_ids.dtype} of shape {tuple(segment_ids.shape)}")
        if labels is not None and labels.shape != segment_ids.shape:
            raise ValueError(f"{SEGMENT_IDS_KWARG} of shape {tuple(segment_ids.shape)} does not match labels of shape "
                             f"{tuple(labels.shape)}")
        flat = segment_ids.reshape(-1).long()
        if bool((flat < -1).any()):
            raise ValueError(f"{SEGMENT_IDS_KWARG} holds {int(flat.min())}; ids are 0..N-1, and -1 marks padding")
        self.shape = tuple(segment_ids.shape)
        self.valid = flat >= 0  # [T]
        self.count = int(flat.max()) + 1 if bool(self.valid.any()) else 0
        present = torch.zeros(self.count, dtype=torch.bool, device=flat.device)
        present[flat[self.valid]] = True
        if not bool(present.all()):
            missing = torch.nonzero(~present).view(-1)[:5].tolist()
            raise ValueError(f"{SEGMENT_IDS_KWARG}: records {missing} have no position; ids must be 0..N-1, each used")
        # [T]; a padding tail points at record 0 (its output reaches no loss), and `valid` keeps it out of pooling
        self.token_instance = flat.clamp(min=0)
        self.labels = None if labels is None else labels.reshape(-1)
        self._weights: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # by (pooling, dtype)

    def pooling_weights(self, pooling: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, T] in `dtype`: row n averages record n's positions that `pooling` selects (as `routing_mask` does for
        a row of its own: 'prompt' its unlabelled positions, falling back to all of them; 'all' every position).
        Built once per call and dtype: every adapted layer of the call pools with the same weights."""
        key = (pooling, dtype)
        if key not in self._weights:
            full = self._weights.get((pooling, torch.float32))
            if full is None:
                full = self._weights[(pooling, torch.float32)] = self._average_weights(pooling)
            self._weights[key] = full.to(dtype)
        return self._weights[key]

    def _average_weights(self, pooling: str) -> torch.Tensor:
        if pooling == "reference":
            raise ValueError("pooling='reference' averages a padded row, padding included, which packed rows do "
                             "not have; use pooling 'prompt' or 'all', or unpacked batches")
        chosen = self.valid
        if pooling == "prompt" and self.labels is not None:
            prompt = self.valid & (self.labels == IGNORE_INDEX)
            per_record = torch.zeros(self.count, dtype=torch.long, device=prompt.device)
            per_record.index_add_(0, self.token_instance[prompt], torch.ones_like(self.token_instance[prompt]))
            empty = per_record == 0
            if bool(empty.any()):
                _warn_no_prompt(int(empty.sum()))
            chosen = prompt | (self.valid & empty[self.token_instance])
        weights = torch.zeros(self.count, chosen.numel(), device=chosen.device)
        weights[self.token_instance[chosen], torch.nonzero(chosen).view(-1)] = 1.0
        return weights / weights.sum(dim=1, keepdim=True).clamp(min=1)

    def pool(self, seq: torch.Tensor, pooling: str) -> torch.Tensor:
        """Each record's mean of seq [rows, width, d] over its pooled positions: [N, d]."""
        return self.pooling_weights(pooling, seq.dtype) @ seq.reshape(-1, seq.shape[-1])


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
        self.segments: PackedSegments | None = None
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
        segment_ids: torch.Tensor | None = None,
    ) -> None:
        self.call_id += 1
        self.continuing = is_continuing_cache(past_key_values)
        if segment_ids is not None and (self.continuing or attention_mask is not None):
            raise ValueError(f"{SEGMENT_IDS_KWARG} marks packed rows, which take no attention_mask and no KV cache "
                             "(transformers keeps attention within a record through restarting position_ids)")
        self._masks = {}
        self.aux_losses = {}
        if self.continuing:
            return  # masks, task ids and selections of the prefill stay in force
        self.attention_mask = attention_mask
        self.labels = labels
        self.segments = None if segment_ids is None else PackedSegments(segment_ids, labels)
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

    def packed_segments(self, batch: int, seq_len: int) -> PackedSegments | None:
        """The call's packed records when a layer input of shape [batch, seq_len, d] lines up with its rows."""
        if self.segments is None or self.segments.shape != (batch, seq_len):
            return None
        return self.segments

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
