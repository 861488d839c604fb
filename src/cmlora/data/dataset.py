"""The training dataset: checked records -> input_ids, labels (answers only), the image inputs and a task id.

Labels are exact by construction: the tokenizer encodes the rendered conversation, the image marker one token of
its own, with offset mapping into that very text, and a token is labelled with its own id when its character span
overlaps an assistant answer span, else -100. The processor encodes the same text in the call that expands the
marker into the model's image sequence and preprocesses the image; the two encodings agree token for token before
and after the marker, which is checked, so the labels move by the expansion's length whatever the expansion holds
(LLaVA's image token n times; Idefics3's and SmolVLM's image tokens between tags, rows and a global image).

Images are decoded lazily in `__getitem__`. A Dataset cannot drop items there, so training code calls
`validate()` once before training: it encodes every record, raises on the first bad one, or with
skip_bad_records removes bad records and returns a SkipReport of what it removed and why. It can encode in worker
processes, and in a distributed run each process encodes its share, so that checking a large dataset does not hold
every process for the time one process takes to encode all of it (not with keep_encoded, which keeps them all).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .images import load_image
from .records import DataError, Record, SkipReport, record_error
from .templates import TEMPLATES, RenderedConversation

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Processor outputs that are not per-example model inputs of the item: input_ids is the item's own; the collator
# rebuilds attention_mask from the lengths.
NOT_MODEL_INPUTS = ("input_ids", "attention_mask")
UNKNOWN_TASK = "unknown"  # the task name of records without one
VALIDATE_CHUNK = 16  # records per message from a validate worker
KEPT_MEMORY_SAMPLE = 32  # keep_encoded: items measured to estimate what keeping them all takes


class InstructionDataset(Dataset):
    """Records encoded for causal-LM training with the loss on assistant answers only.

    Item: {"input_ids": LongTensor[T], "labels": LongTensor[T], "pixel_values": Tensor or None, "task_id": int,
    "id": str, **extra model inputs}. Every processor output other than input_ids and attention_mask is kept, as
    one of two kinds (InstructionCollator batches each kind by its rule):

    - per-token: shaped like the processor's input_ids [1, T] (Qwen2-VL's mm_token_type_ids); kept as [T], truncated
      with input_ids.
    - per-image: anything else, kept exactly as the processor returns it for this one image, whose leading axis is
      the one the processor concatenates images along: LLaVA pixel_values [1, 3, H, W]; LLaVA-NeXT pixel_values
      [1, patches, 3, H, W] and image_sizes [1, 2]; Qwen2-VL pixel_values [patches, dim] and image_grid_thw [1, 3].

    "pixel_values" is None for a record without an image. `task_names` fixes the task vocabulary (default: sorted
    task names of `records`, "unknown" for records without one); pass the training vocabulary when encoding
    evaluation data.
    """

    def __init__(self, records: Sequence[Record], processor: Any, *, template: str = "vicuna_v1",
                 max_length: int = 2048, task_names: list[str] | None = None,
                 skip_bad_records: bool = False, keep_encoded: bool = False) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.records = list(records)
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.skip_bad_records = skip_bad_records
        self.lengths: list[int] | None = None  # set by validate()
        # keep_encoded: each record is encoded once (by validate() or its first __getitem__) and kept in memory, so
        # that later epochs do not load and process its image again; costs the items' memory (pixel values).
        self._encoded: dict[int, dict[str, Any]] | None = {} if keep_encoded else None
        self.task_names = list(task_names) if task_names is not None else sorted({_task(r) for r in self.records})
        self._task_index = {name: index for index, name in enumerate(self.task_names)}
        for record in self.records:
            if _task(record) not in self._task_index:
                raise record_error(record.source, record.id, "task_name", f"{_task(record)!r} is not in the task "
                                   f"vocabulary {self.task_names}", "unknown task")
        self.image_token = getattr(processor, "image_token", None)
        tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token) if self.image_token else None

    def __len__(self) -> int:
        return len(self.records)

    def task_id(self, name: str | None) -> int:
        """Index of task `name` in `task_names` (None means "unknown")."""
        name = name if name is not None else UNKNOWN_TASK
        if name not in self._task_index:
            raise KeyError(f"task {name!r} is not in the task vocabulary {self.task_names}")
        return self._task_index[name]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._encoded is None:
            return self.encode(self.records[index])
        if index not in self._encoded:
            self._encoded[index] = self.encode(self.records[index])
        return self._encoded[index]

    def encode(self, record: Record) -> dict[str, Any]:
        """One record as a training item; DataError naming the record if its image or length makes it unusable."""
        image = self._load_image(record) if record.image is not None else None
        rendered = TEMPLATES[self.template](record.conversations, self.processor)
        inputs: dict[str, Any] = {"text": rendered.text, "return_tensors": "pt"}
        if image is not None:
            if self.image_token is None:
                raise record_error(record.source, record.id, "image", "the record has an image but the processor "
                                   "has no image token (is it a text-only tokenizer?)", "image unsupported")
            inputs["images"] = [image]
        encoded = self.processor(**inputs)
        input_ids = encoded["input_ids"][0]
        labels = self._labels(record, rendered, input_ids)
        full_shape = encoded["input_ids"].shape
        input_ids, labels = self._truncate(record, input_ids, labels)
        length = len(input_ids)
        item: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "pixel_values": None}
        for key, value in encoded.items():
            if key in NOT_MODEL_INPUTS or value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"processor output {key!r} is a {type(value).__name__}, not a tensor; "
                                "InstructionDataset cannot batch it")
            # per-token: [1, T] like input_ids -> [T], truncated; per-image: kept as returned (see the class doc)
            item[key] = value[0, :length] if value.shape == full_shape else value
        item.update(task_id=self.task_id(record.task_name), id=record.id)
        return item

    def validate(self, workers: int = 0) -> SkipReport:
        """Encode every record once (images included). Raises on the first bad record; with skip_bad_records,
        removes the bad records from the dataset and returns what was removed, by reason. Call before training.
        Also sets `lengths`: each kept record's length in tokens, image tokens included (for length-grouped
        batches).

        `workers` > 0 encodes in that many worker processes (a DataLoader's). In a distributed run
        (torch.distributed initialised) each process encodes its share of the records, every world_size-th, and the
        processes exchange what they found: every one keeps the same records and lengths, or raises the same first
        error. Not with keep_encoded: a process's sampler draws from every record, so each process encodes and
        keeps them all (in its training DataLoader's workers, an item encoded on demand would not be kept)."""
        rank, world_size = _process_share() if self._encoded is None else (0, 1)
        outcomes = self._encode_share(range(rank, len(self.records), world_size), workers, world_size == 1,
                                      progress=rank == 0)
        if world_size > 1:
            outcomes = _exchange(outcomes)
        report = SkipReport()
        kept, lengths, encoded = [], [], {}
        for index, record in enumerate(self.records):
            outcome = outcomes[index]
            if isinstance(outcome, DataError):
                if not self.skip_bad_records:
                    raise outcome
                report.add(outcome)
                continue
            if isinstance(outcome, dict):  # an item this process encoded and keeps (keep_encoded)
                encoded[len(kept)] = outcome
                outcome = len(outcome["input_ids"])
            kept.append(record)
            lengths.append(outcome)
        if not kept:
            raise DataError(f"no usable records left after validation.\n{report.summary()}", "no records")
        self.records, self.lengths = kept, lengths
        if self._encoded is not None:
            self._encoded = encoded  # indexes change when bad records are removed
        if report:
            logger.warning("%s", report.summary())
        return report

    def _encode_share(self, indexes: range, workers: int, raise_first: bool, progress: bool) -> dict[int, Any]:
        """index -> the item (keep_encoded) or its length, or its DataError, for the records at `indexes`, in order;
        `raise_first`: raise a bad record's error at once (when nothing else will skip it or needs to hear of it);
        `progress`: show a progress bar (one process of a distributed run shows its share's)."""
        encoding = _Encoding(self, indexes, chunk=VALIDATE_CHUNK)
        if workers > 0:
            # Workers send chunks of outcomes as pickled bytes: sent as they are, each tensor of each item would
            # travel in a shared-memory segment of its own, which costs more than encoding a small record. The
            # bytes are unpickled here, in this process (a collate_fn would run in the worker).
            chunks: Any = map(_received, DataLoader(encoding, batch_size=None, num_workers=workers))
        else:
            chunks = ([encoding.outcome(index)] for index in indexes)
        outcomes: dict[int, Any] = {}
        sample: list[dict[str, Any]] | None = [] if self._encoded is not None else None  # kept items, measured
        with tqdm(total=len(indexes), desc="checking records", unit="record",
                  disable=None if progress else True) as bar:
            for chunk in chunks:
                for index, outcome in chunk:
                    if isinstance(outcome, DataError) and raise_first and not self.skip_bad_records:
                        raise outcome
                    outcomes[index] = outcome
                    if sample is not None and isinstance(outcome, dict):
                        sample.append(outcome)
                        if len(sample) == KEPT_MEMORY_SAMPLE:  # fewer kept items take little memory anyway
                            check_kept_memory(sample, len(indexes))
                            sample = None
                bar.update(len(chunk))
        return outcomes

    def _load_image(self, record: Record) -> Any:
        try:
            return load_image(record.image)
        except DataError as error:
            raise record_error(record.source, record.id, "image", str(error), error.reason) from error

    def _labels(self, record: Record, rendered: RenderedConversation, input_ids: torch.Tensor) -> torch.Tensor:
        """Labels for the processor's `input_ids`: the answer tokens of the rendered text, found on the tokenizer's
        encoding of that text (the image marker one token), moved past the processor's expansion of the marker."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        try:
            plain = tokenizer(rendered.text, return_offsets_mapping=True, return_tensors="pt")
        except NotImplementedError as error:  # slow tokenizers have no offset mapping
            raise TypeError("InstructionDataset needs a fast tokenizer (return_offsets_mapping).") from error
        ids = plain["input_ids"][0]
        labels = answer_labels(ids, plain["offset_mapping"][0], with_separator_spaces(rendered).answer_spans)
        markers = (ids == self.image_token_id).nonzero().flatten().tolist() if self.image_token_id is not None else []
        if len(markers) > 1:  # records hold one image and one marker (records._check_image_markers)
            raise RuntimeError(f"{record.source} (id {record.id!r}): {len(markers)} image markers in the rendered "
                               "text; InstructionDataset maps one")
        marker = markers[0] if markers else len(ids)
        after = len(ids) - marker - 1 if markers else 0
        expansion = len(input_ids) - marker - after  # the processor's tokens in the marker's place (none: no image)
        if ((expansion < 1 if markers else expansion != 0) or not torch.equal(input_ids[:marker], ids[:marker])
                or not torch.equal(input_ids[len(input_ids) - after:], ids[len(ids) - after:])):
            raise RuntimeError(f"{record.source} (id {record.id!r}): the processor's tokens differ from the "
                               "tokenizer's outside the image marker's expansion, so InstructionDataset cannot "
                               "place the answer labels")
        return torch.cat([labels[:marker], torch.full((expansion,), IGNORE_INDEX, dtype=labels.dtype),
                          labels[len(ids) - after:]])

    def _truncate(self, record: Record, input_ids: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the first max_length tokens; an error if that leaves no answer token or cuts into the image."""
        if len(input_ids) <= self.max_length:
            return input_ids, labels
        answer_positions = (labels != IGNORE_INDEX).nonzero()
        prompt_length = int(answer_positions[0]) if len(answer_positions) else len(labels)
        if not (labels[: self.max_length] != IGNORE_INDEX).any():
            raise record_error(record.source, record.id, "conversations", f"answer truncated away entirely "
                               f"(prompt is {prompt_length} tokens, max_length {self.max_length}); raise "
                               "max_length or shorten the prompt", "answer truncated away")
        if self.image_token_id is not None:
            is_image = input_ids == self.image_token_id
            if int(is_image[: self.max_length].sum()) != int(is_image.sum()):
                raise record_error(record.source, record.id, "conversations", f"max_length {self.max_length} "
                                   "cuts into (or off) the image tokens; raise max_length", "image truncated")
        return input_ids[: self.max_length], labels[: self.max_length]


def with_separator_spaces(rendered: RenderedConversation) -> RenderedConversation:
    """The conversation with each answer span widened over the spaces right before it.

    `generation_prompt` prompts a model up to the last non-space character before an answer, so whatever token
    carries that space must be learned: usually it is the answer's first token (" red"), but a vocabulary without
    " no" splits it into a lone " " and "no", and an unlearned " " leaves the model to guess the token after "?".
    """
    spans = []
    for start, end in rendered.answer_spans:
        while start > 0 and rendered.text[start - 1] == " ":
            start -= 1
        spans.append((start, end))
    return dataclasses.replace(rendered, answer_spans=spans)


def answer_labels(input_ids: torch.Tensor, offsets: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """input_ids where a token's [start, end) overlaps an answer span, IGNORE_INDEX elsewhere.

    Overlap (not containment) keeps a token like " red" whose leading space belongs to the separator before the
    answer; tokens without characters (an added BOS, offsets (0, 0)) never overlap and stay unlabelled.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    in_answer = torch.zeros(len(input_ids), dtype=torch.bool)
    for span_start, span_end in spans:
        in_answer |= (starts < span_end) & (ends > span_start)
    return torch.where(in_answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def _task(record: Record) -> str:
    return record.task_name if record.task_name is not None else UNKNOWN_TASK


class _Encoding(Dataset):
    """validate's work in a worker: item i is the outcomes of records `indexes[i * chunk : (i + 1) * chunk]` of
    `dataset`, pickled (see `outcome`)."""

    def __init__(self, dataset: InstructionDataset, indexes: range, chunk: int) -> None:
        self.dataset, self.indexes, self.chunk = dataset, indexes, chunk

    def __len__(self) -> int:
        return -(-len(self.indexes) // self.chunk)

    def __getitem__(self, position: int) -> bytes:
        outcomes = [self.outcome(index) for index in self.indexes[position * self.chunk:(position + 1) * self.chunk]]
        return pickle.dumps([(index, _as_arrays(outcome)) for index, outcome in outcomes],
                            protocol=pickle.HIGHEST_PROTOCOL)

    def outcome(self, index: int) -> tuple[int, Any]:
        """(index, the record's item if the dataset keeps items, else its length, or its DataError)."""
        try:
            item = self.dataset.encode(self.dataset.records[index])
        except DataError as error:
            return index, error
        # Only a kept item travels back from a worker process: its pixel values are most of its bytes.
        return index, item if self.dataset._encoded is not None else len(item["input_ids"])


def _as_arrays(outcome: Any) -> Any:
    """An item's tensors as numpy arrays, which pickle 10 x faster than tensors (bfloat16, which numpy lacks, stays
    a tensor)."""
    if not isinstance(outcome, dict):
        return outcome
    return {key: value.numpy() if isinstance(value, torch.Tensor) and value.dtype != torch.bfloat16 else value
            for key, value in outcome.items()}


def _received(message: bytes) -> list[tuple[int, Any]]:
    """A worker's chunk of outcomes, its items' arrays tensors again."""
    return [(index, {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
                     for key, value in outcome.items()} if isinstance(outcome, dict) else outcome)
            for index, outcome in pickle.loads(message)]


def check_kept_memory(sample: Sequence[dict[str, Any]], count: int) -> None:
    """MemoryError, before it runs out, if keeping `count` items the size of `sample`'s (in every process of this
    machine, `LOCAL_WORLD_SIZE` of torchrun) needs more memory than the machine has available."""
    available = available_memory()
    if available is None:
        return
    each = sum(_item_bytes(item) for item in sample) / len(sample)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = each * count * processes
    if needed > 0.9 * available:
        on = f" in each of {processes} processes" if processes > 1 else ""
        raise MemoryError(f"keep_encoded: keeping {count} encoded records{on} needs about {needed / 2**30:.1f} GiB "
                          f"({each / 2**20:.2f} MiB each, measured on the first {len(sample)}), more than the "
                          f"{available / 2**30:.1f} GiB this machine has available. Set keep_encoded: false: "
                          "each epoch then encodes its records again.")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _item_bytes(item: dict[str, Any]) -> int:
    """An item's tensor bytes, plus 1 KiB for its objects."""
    return 1024 + sum(value.element_size() * value.nelement() for value in item.values()
                      if isinstance(value, torch.Tensor))


def _process_share() -> tuple[int, int]:
    """(rank, world size) of this process in an initialised torch.distributed run, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _exchange(outcomes: dict[int, Any]) -> dict[int, Any]:
    """Every process's outcomes (a length or a DataError per record), merged."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, outcomes)
    return {index: outcome for part in gathered for index, outcome in part.items()}
