"""Reading instruction-tuning records (Vision-Flan / LLaVA format, JSON list or JSONL) into checked `Record`s.

Every check that needs only the record text and the file system happens here, once, before training starts, so
that a bad record is reported with its file, line (or list index), id and field instead of failing deep inside a
training step. Decoding images is left to the dataset: opening 182k images up front costs as much as an epoch.

Record format (one JSON object per record):
    {"id": str | int, "image": "relative/path.jpg" | null | absent, "task_name": str (optional),
     "conversations": [{"from": "human" | "gpt", "value": str}, ...]}

The `<image>` rule: a record holds at most one image (the paper's format), and its human turns must hold exactly
as many `<image>` markers as the record has images. One exception, the LLaVA convention: a record with an image
and no marker gets "<image>\\n" prepended to its first human turn (some LLaVA-v1 data omits the marker).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
SKIP_HINT = "Fix the record, or pass skip_bad_records=True to skip and count bad records."


class DataError(ValueError):
    """A bad data file, record or image. `reason` is the short key under which skip_bad_records counts it."""

    def __init__(self, message: str, reason: str = "bad record") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str


@dataclass
class Record:
    id: str
    conversations: list[Turn]
    image: Path | None  # resolved path of the record's image; None for a text-only record
    task_name: str | None
    source: str  # "file:line" (JSONL) or "file[#index]" (JSON list), for error messages


@dataclass
class SkipReport:
    """What skip_bad_records skipped: reason -> count, and the first error message of each reason."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, error: DataError) -> None:
        self.counts[error.reason] = self.counts.get(error.reason, 0) + 1
        self.examples.setdefault(error.reason, str(error))

    def summary(self) -> str:
        if not self:
            return "no records skipped"
        lines = [f"skipped {self.total} bad record(s):"]
        lines += [f"  {reason}: {count} (first: {self.examples.get(reason, '?')})"
                  for reason, count in sorted(self.counts.items())]
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return self.total > 0


def one_question_each(records: list[Record]) -> list[Record]:
    """Each question/answer pair of each record as a record of its own (id `<id>#<k>`), asked right after the
    record's image: short single-question records from multi-turn conversations (stage 1 of the tiny base;
    replayed conversations in `cmlora train --replay_single_turns`). A trailing unanswered turn is dropped."""
    singles = []
    for record in records:
        turns = record.conversations
        for index in range(0, len(turns) - 1, 2):
            question = turns[index].text.replace(IMAGE_MARKER, "").strip()
            first = Turn("user", f"{IMAGE_MARKER}\n{question}" if record.image is not None else question)
            singles.append(Record(f"{record.id}#{index // 2}", [first, turns[index + 1]], record.image,
                                  record.task_name, record.source))
    return singles


def record_error(source: str, record_id: str | None, field_name: str, problem: str, reason: str) -> DataError:
    """A DataError in the one format every record check uses: where, which record, which field, what to do."""
    who = f"record {record_id!r}" if record_id is not None else "record without an id"
    return DataError(f"{source}: {who}: field {field_name!r}: {problem}. {SKIP_HINT}", reason)


def load_records(
    path: str | Path, image_folder: str | Path | None = None, *, skip_bad_records: bool = False
) -> tuple[list[Record], SkipReport]:
    """Read and check every record of `path` (a JSON list if its first non-space character is '[', else JSONL).

    Image paths are resolved against `image_folder`, else against the data file's folder, and must exist.
    A bad record raises DataError, or with `skip_bad_records` is left out and counted in the returned report.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the data file ({error}).", "unreadable file") from error
    if not text.strip():
        raise DataError(f"{path}: the data file is empty; expected a JSON list or JSON lines of records.", "empty file")
    image_root = Path(image_folder) if image_folder is not None else path.parent
    report = SkipReport()
    records: list[Record] = []
    first_source_of_id: dict[str, str] = {}
    for source, raw in _raw_records(path, text):
        try:
            if isinstance(raw, DataError):
                raise raw
            record = parse_record(raw, source, image_root)
            if record.id in first_source_of_id:
                raise record_error(source, record.id, "id", f"duplicate id, first used at "
                                   f"{first_source_of_id[record.id]}; ids must be unique", "duplicate id")
        except DataError as error:
            if not skip_bad_records:
                raise
            report.add(error)
            continue
        first_source_of_id[record.id] = source
        records.append(record)
    if not records:
        raise DataError(f"{path}: no usable records.\n{report.summary()}", "no records")
    if report:
        logger.warning("%s: %s", path, report.summary())
    return records, report


def _raw_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(source, parsed object) per record; for a JSONL line that is not JSON, a DataError in place of the object.

    A JSON list that does not parse cannot be split into records, so it raises even with skip_bad_records.
    """
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}:{error.colno}: invalid JSON ({error.msg}); the file starts "
                            "with '[' so it is read as one JSON list. Fix the JSON.", "invalid JSON") from error
        for index, item in enumerate(items):
            yield f"{path}[#{index}]", item
        return
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and other characters splitlines breaks on.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines separate nothing in JSONL; they are not records
        source = f"{path}:{line_number}"
        try:
            yield source, json.loads(line)
        except json.JSONDecodeError as error:
            yield source, DataError(f"{source}: invalid JSON at column {error.colno} ({error.msg}); each line of a "
                                    f"JSONL file must be one JSON object. {SKIP_HINT}", "invalid JSON")


def parse_record(raw: Any, source: str, image_root: Path) -> Record:
    """Check one parsed record and build the Record (see the module docstring for the format and `<image>` rule)."""
    if not isinstance(raw, dict):
        raise record_error(source, None, "(record)", f"expected a JSON object, got {type(raw).__name__}",
                           "not an object")
    record_id = _parse_id(raw, source)
    turns = _parse_turns(raw, source, record_id)
    image = _parse_image(raw, source, record_id, image_root)
    task_name = raw.get("task_name")
    if task_name is not None and not isinstance(task_name, str):
        raise record_error(source, record_id, "task_name", f"expected a string or null, got "
                           f"{type(task_name).__name__}", "wrong type")
    _check_image_markers(turns, image, source, record_id)
    return Record(id=record_id, conversations=turns, image=image, task_name=task_name, source=source)


def _parse_id(raw: dict, source: str) -> str:
    if "id" not in raw:
        raise record_error(source, None, "id", "missing; every record needs a unique id", "missing field")
    value = raw["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise record_error(source, None, "id", f"expected a non-empty string or integer, got {value!r}", "wrong type")
    return str(value)


def _parse_turns(raw: dict, source: str, record_id: str) -> list[Turn]:
    conversations = raw.get("conversations")
    if conversations is None:
        raise record_error(source, record_id, "conversations", "missing", "missing field")
    if not isinstance(conversations, list) or not conversations:
        raise record_error(source, record_id, "conversations", f"expected a non-empty list of turns, got "
                           f"{conversations!r:.80}", "wrong type")
    turns = []
    for index, turn in enumerate(conversations):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise record_error(source, record_id, where, f"expected an object, got {turn!r:.80}", "wrong type")
        for key in ("from", "value"):
            if key not in turn:
                raise record_error(source, record_id, f"{where}.{key}", "missing", "missing field")
            if not isinstance(turn[key], str):
                raise record_error(source, record_id, f"{where}.{key}", f"expected a string, got "
                                   f"{type(turn[key]).__name__}", "wrong type")
        if turn["from"] not in ROLES:
            raise record_error(source, record_id, f"{where}.from", f"{turn['from']!r} is not one of "
                               f"{sorted(ROLES)}", "unknown role")
        turns.append(Turn(role=ROLES[turn["from"]], text=turn["value"]))
    if not any(turn.role == "assistant" for turn in turns):
        raise record_error(source, record_id, "conversations", "no assistant ('gpt') turn, so nothing to learn",
                           "no assistant turn")
    for index, turn in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected or (index == len(turns) - 1 and turn.role == "user"):
            raise record_error(source, record_id, f"conversations[{index}].from", "turns must alternate "
                               "human, gpt, human, gpt, ... starting with human and ending with gpt", "turn order")
    return turns


def _parse_image(raw: dict, source: str, record_id: str, image_root: Path) -> Path | None:
    value = raw.get("image")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise record_error(source, record_id, "image", f"expected a relative path string or null, got {value!r}",
                           "wrong type")
    image = image_root / value
    if not image.is_file():
        raise record_error(source, record_id, "image", f"image file not found: {image} (resolved against "
                           f"{image_root}; pass image_folder= if images live elsewhere)", "image not found")
    return image


def _check_image_markers(turns: list[Turn], image: Path | None, source: str, record_id: str) -> None:
    for index, turn in enumerate(turns):
        if turn.role == "assistant" and IMAGE_MARKER in turn.text:
            raise record_error(source, record_id, f"conversations[{index}].value", f"{IMAGE_MARKER} in a gpt "
                               "turn; the image marker belongs in a human turn", "image marker")
    markers = sum(turn.text.count(IMAGE_MARKER) for turn in turns)
    if image is None and markers:
        raise record_error(source, record_id, "conversations", f"{markers} {IMAGE_MARKER} marker(s) but the "
                           "record has no image; add an 'image' or remove the marker", "image marker")
    if image is not None and markers > 1:
        raise record_error(source, record_id, "conversations", f"{markers} {IMAGE_MARKER} markers for one image; "
                           "use exactly one", "image marker")
    if image is not None and markers == 0:  # the LLaVA convention (module docstring)
        turns[0].text = f"{IMAGE_MARKER}\n{turns[0].text}"
