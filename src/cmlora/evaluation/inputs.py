"""Reading zero-shot evaluation inputs into checked `EvalExample`s: the reference code's `<task>.jsonl` files and
MME in its official release layout (or the reference code's MME JSONL files).

Every check that needs only the files happens here, before any generation starts, so that a bad record is reported
with its file, line and field instead of surfacing hours into an evaluation run. Nothing is skipped: a bad record,
a duplicate id or a missing image raises `EvalDataError`.

Task files (`<task>.jsonl`), one JSON object per line:
    {"unique_id": str | int, "image_path": str, "prompt": str, "target": str | [str, ...]}
`image_path` is relative to `image_root` (default: the file's folder) or absolute. The task is the file stem;
POPE comes as pope_random.jsonl / pope_popular.jsonl / pope_adversarial.jsonl, or as one pope.jsonl whose lines
carry "split" (task `pope_<split>`). Other fields are ignored.

MME (`read_mme`), per subtask, in whichever of these layouts the subtask uses:
    (a) <mme_dir>/<subtask>/images/<name>.jpg|png  and  <mme_dir>/<subtask>/questions_answers_YN/<name>.txt
    (b) <mme_dir>/<subtask>/<name>.jpg|png  next to  <mme_dir>/<subtask>/<name>.txt
    (c) <mme_dir>/<file>.jsonl, lines as in a task file plus an optional "subtask" (default: the file stem)
Each txt line is `question<TAB>Yes|No`; a UTF-8 BOM, CRLF line ends, trailing whitespace and blank lines are
tolerated, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

POPE_SPLITS = ("random", "popular", "adversarial")
MME_TASK = "mme"
MME_ANSWERS = ("Yes", "No")
MME_IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")  # lookup order for a question file's image
MME_QUESTIONS_FOLDER = "questions_answers_YN"
MME_IMAGES_FOLDER = "images"
FIX_HINT = "Fix the file; evaluation inputs are never skipped."


class EvalDataError(ValueError):
    """A bad evaluation file, record or image; the message names the file, the line/record and the problem."""


@dataclass(frozen=True)
class EvalExample:
    uid: str  # unique within its task
    task: str  # "mme" for MME; otherwise the task file's stem ("text_vqa", "pope_random", ...)
    image: Path | None  # absolute path, checked to exist at read time; None: a text-only prompt (held-out records
    # of text-only instruction data)
    prompt: str  # the question as written in the data (no answer-format suffix; a held-out record that puts its
    # image after text keeps its `<image>` marker there)
    target: str | tuple[str, ...]  # a tuple when several reference answers exist (Text-VQA)
    source: str  # "file:line", for error messages
    meta: dict[str, str] = field(default_factory=dict, hash=False)  # MME: subtask, image_id; POPE: split


# ---------------------------------------------------------------------------------------------------------------
# Task files


def read_task_file(path: Path, image_root: Path | None = None) -> list[EvalExample]:
    """Read and check one `<task>.jsonl` file (see the module docstring for the format)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    stem = path.stem
    split_from_name = _pope_split_of_stem(stem, path)
    examples: list[EvalExample] = []
    first_source: dict[tuple[str, str], str] = {}
    for source, raw in _jsonl_objects(path):
        uid, image, prompt, target = _parse_task_record(raw, source, root, allow_list_target=True)
        task, meta = stem, {}
        if stem == "pope":
            split = _pope_split_field(raw, source, uid, required=True)
            task, meta = f"pope_{split}", {"split": split}
        elif split_from_name is not None:
            split = _pope_split_field(raw, source, uid, required=False)
            if split is not None and split != split_from_name:
                raise _record_error(source, uid, "split", f"{split!r} contradicts the file name, which says "
                                    f"{split_from_name!r}; fix the field or move the record to pope_{split}.jsonl")
            meta = {"split": split_from_name}
        _check_unique(first_source, (task, uid), source, uid)
        examples.append(EvalExample(uid, task, image, prompt, target, source, meta))
    return examples


def read_task_dir(tasks_dir: Path, only: Sequence[str] | None = None, *,
                  image_root: Path | None = None) -> dict[str, list[EvalExample]]:
    """Read every `*.jsonl` of `tasks_dir` (or those `only` names): task name -> examples, sorted by task name.

    `only` holds task names: a file stem ("text_vqa"), "pope" for all POPE splits, or one split ("pope_random",
    served by pope_random.jsonl or by the matching lines of pope.jsonl). `image_root` applies to every file.
    """
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise EvalDataError(f"{tasks_dir}: not a folder; expected a folder of <task>.jsonl evaluation files.")
    files = {path.stem: path for path in sorted(tasks_dir.glob("*.jsonl")) if path.is_file()}
    if not files:
        raise EvalDataError(f"{tasks_dir}: no <task>.jsonl files found; expected e.g. text_vqa.jsonl, pope.jsonl.")
    wanted = _select_files(tasks_dir, files, only)
    tasks: dict[str, list[EvalExample]] = {}
    task_file: dict[str, Path] = {}
    for stem, keep in wanted.items():
        grouped: dict[str, list[EvalExample]] = {}
        for example in read_task_file(files[stem], image_root):
            grouped.setdefault(example.task, []).append(example)
        if keep is not None:
            missing = sorted(keep - grouped.keys())
            if missing:
                raise EvalDataError(f"{files[stem]}: no records for {', '.join(missing)} (its lines carry the "
                                    f"splits {sorted(grouped)}). Add the records or drop the name from only=.")
            grouped = {task: grouped[task] for task in keep}
        for task, examples in grouped.items():
            if task in tasks:
                raise EvalDataError(f"task {task!r} comes from two files, {task_file[task]} and {files[stem]}; "
                                    "keep one of them.")
            tasks[task], task_file[task] = examples, files[stem]
    return dict(sorted(tasks.items()))


def _select_files(tasks_dir: Path, files: dict[str, Path], only: Sequence[str] | None) -> dict[str, set[str] | None]:
    """stem -> the tasks to keep from that file (None: all of them), for the names in `only`."""
    if only is None:
        return {stem: None for stem in files}
    if isinstance(only, str):
        only = [only]
    if not only:
        raise EvalDataError(f"{tasks_dir}: only= is empty; pass None to read every task, or name some tasks.")
    wanted: dict[str, set[str] | None] = {}
    for name in dict.fromkeys(only):
        if name == "pope":
            stems = [stem for stem in files if stem == "pope" or stem.startswith("pope_")]
        elif name in files:
            stems = [name]
        elif name.startswith("pope_") and "pope" in files:
            keep = wanted.get("pope", set())
            if keep is not None:
                wanted["pope"] = keep | {name}
            continue
        else:
            stems = []
        if not stems:
            available = sorted(files) + (["pope"] if any(s.startswith("pope") for s in files) else [])
            raise EvalDataError(f"{tasks_dir}: no evaluation file for task {name!r}; available: "
                                f"{', '.join(available)}. Fix the name or add {name}.jsonl.")
        for stem in stems:
            wanted[stem] = None
    return wanted


def _pope_split_of_stem(stem: str, path: Path) -> str | None:
    if not stem.startswith("pope_"):
        return None
    split = stem[len("pope_"):]
    if split not in POPE_SPLITS:
        logger.warning("%s: %r is not one of POPE's splits %s; reading the file as POPE split %r.",
                       path, split, POPE_SPLITS, split)
    return split


def _pope_split_field(raw: dict, source: str, uid: str, required: bool) -> str | None:
    if "split" not in raw and not required:
        return None
    split = raw.get("split")
    if split not in POPE_SPLITS:
        got = "missing" if "split" not in raw else repr(split)
        raise _record_error(source, uid, "split", f"expected one of {', '.join(POPE_SPLITS)}, got {got}; "
                            "pope.jsonl must name each record's split (or use pope_<split>.jsonl files)")
    return split


# ---------------------------------------------------------------------------------------------------------------
# MME


def read_mme(mme_dir: Path, subtasks: Sequence[str] | None = None, *,
             image_root: Path | None = None) -> list[EvalExample]:
    """Read MME (official release layouts (a)/(b) per subtask folder, or JSONL files (c)); see the module docstring.

    `image_root` applies to the image paths of JSONL files (default: `mme_dir`).
    Examples come sorted by subtask, then image file name, then question order. uids are
    `<subtask>/<image file name>/<question index from 0>` for (a)/(b) and `<subtask>/<unique_id>` for (c).
    """
    mme_dir = Path(mme_dir)
    if not mme_dir.is_dir():
        raise EvalDataError(f"{mme_dir}: not a folder; expected MME's release folder (one folder per subtask).")
    loose_images = _images_by_stem(mme_dir)
    if (mme_dir / MME_QUESTIONS_FOLDER).is_dir() or any(p.stem in loose_images for p in mme_dir.glob("*.txt")):
        raise EvalDataError(f"{mme_dir}: this looks like one subtask's folder, not MME's release folder; pass its "
                            "parent folder (and subtasks=[...] to read only some subtasks).")
    sources = _mme_subtask_sources(mme_dir, Path(image_root) if image_root is not None else mme_dir)
    if not sources:
        raise EvalDataError(f"{mme_dir}: no MME subtask found; expected <subtask>/ folders (with "
                            f"{MME_QUESTIONS_FOLDER}/ and {MME_IMAGES_FOLDER}/, or images next to .txt files) "
                            "or <subtask>.jsonl files.")
    if subtasks is not None:
        if isinstance(subtasks, str):
            subtasks = [subtasks]
        unknown = [name for name in subtasks if name not in sources]
        if unknown:
            raise EvalDataError(f"{mme_dir}: unknown MME subtask(s) {', '.join(map(repr, unknown))}; available: "
                                f"{', '.join(sorted(sources))}.")
        sources = {name: sources[name] for name in subtasks}
    examples: list[EvalExample] = []
    for subtask in sorted(sources):
        source = sources[subtask]
        subtask_examples = source if isinstance(source, list) else _read_mme_folder(source, subtask)
        _warn_unpaired(subtask, subtask_examples)
        examples.extend(subtask_examples)
    return examples


def _mme_subtask_sources(mme_dir: Path, image_root: Path) -> dict[str, Path | list[EvalExample]]:
    """subtask -> its folder (layouts a/b) or its already-read examples (layout c, JSONL)."""
    sources: dict[str, Path | list[EvalExample]] = {}
    origin: dict[str, Path] = {}
    for folder in sorted(p for p in mme_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))):
        if (folder / MME_QUESTIONS_FOLDER).is_dir() or any(p.is_file() for p in folder.glob("*.txt")):
            sources[folder.name], origin[folder.name] = folder, folder
        else:
            logger.warning("%s: not an MME subtask (no %s/ and no .txt files); ignored.", folder, MME_QUESTIONS_FOLDER)
    for path in sorted(p for p in mme_dir.glob("*.jsonl") if p.is_file()):
        for subtask, examples in _read_mme_jsonl(path, image_root).items():
            if subtask in sources:
                raise EvalDataError(f"MME subtask {subtask!r} comes from both {origin[subtask]} and {path}; "
                                    "keep one of them.")
            sources[subtask], origin[subtask] = examples, path
    return sources


def _read_mme_folder(folder: Path, subtask: str) -> list[EvalExample]:
    """Layouts (a) and (b): pair each question file with its image; every image and question file must pair."""
    if (folder / MME_QUESTIONS_FOLDER).is_dir():
        question_dir, image_dir = folder / MME_QUESTIONS_FOLDER, folder / MME_IMAGES_FOLDER
        if not image_dir.is_dir():
            raise EvalDataError(f"{folder}: has {MME_QUESTIONS_FOLDER}/ but no {MME_IMAGES_FOLDER}/ folder; the "
                                f"images of layout (a) belong in {image_dir}.")
    else:
        question_dir = image_dir = folder
    question_files = sorted(p for p in question_dir.glob("*.txt") if p.is_file() and not p.name.startswith("."))
    if not question_files:
        raise EvalDataError(f"{question_dir}: no question files (<image name>.txt) for MME subtask {subtask!r}.")
    images = _images_by_stem(image_dir)
    pairs: list[tuple[Path, Path]] = []
    used: set[Path] = set()
    for question_file in question_files:
        candidates = images.get(question_file.stem)
        if not candidates:
            raise EvalDataError(f"{question_file}: no image for this question file; looked for "
                                f"{question_file.stem} with {', '.join(MME_IMAGE_EXTENSIONS)} in {image_dir}.")
        pairs.append((candidates[0], question_file))
        used.add(candidates[0])
    unused = sorted(p for candidates in images.values() for p in candidates if p not in used)
    if unused:
        raise EvalDataError(f"{unused[0]}: image without a question file ({len(unused)} such image(s) in "
                            f"{image_dir}); add {unused[0].stem}.txt to {question_dir} or remove the image.")
    examples: list[EvalExample] = []
    for image, question_file in sorted(pairs, key=lambda pair: pair[0].name):
        for index, (line_number, question, answer) in enumerate(_read_mme_questions(question_file)):
            examples.append(EvalExample(
                uid=f"{subtask}/{image.name}/{index}", task=MME_TASK, image=_absolute(image), prompt=question,
                target=answer, source=f"{question_file}:{line_number}",
                meta={"subtask": subtask, "image_id": image.name}))
    return examples


def _images_by_stem(image_dir: Path) -> dict[str, list[Path]]:
    """stem -> image files with that stem, in lookup order (.jpg, .png, .jpeg; extensions in any letter case)."""
    images: dict[str, list[Path]] = {}
    for path in sorted(image_dir.iterdir()):
        suffix = path.suffix.lower()
        if path.is_file() and not path.name.startswith(".") and suffix in MME_IMAGE_EXTENSIONS:
            images.setdefault(path.stem, []).append(path)
    for candidates in images.values():
        candidates.sort(key=lambda p: (MME_IMAGE_EXTENSIONS.index(p.suffix.lower()), p.name))
    return images


def _read_mme_questions(path: Path) -> list[tuple[int, str, str]]:
    """(line number, question, "Yes"|"No") per non-blank line of an official MME question file."""
    questions = []
    for line_number, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip()  # trailing whitespace, including the \r of CRLF
        if not line:
            continue
        source = f"{path}:{line_number}"
        if line.count("\t") != 1:
            raise EvalDataError(f"{source}: expected 'question<TAB>Yes|No', found {line.count(chr(9))} tabs in "
                                f"{line[:80]!r}. {FIX_HINT}")
        question, answer = (part.strip() for part in line.split("\t"))
        if not question:
            raise EvalDataError(f"{source}: empty question before the tab. {FIX_HINT}")
        if answer not in MME_ANSWERS:
            raise EvalDataError(f"{source}: answer {answer!r} is not Yes or No. {FIX_HINT}")
        questions.append((line_number, question, answer))
    if not questions:
        raise EvalDataError(f"{path}: the question file is empty; expected lines 'question<TAB>Yes|No'.")
    return questions


def _read_mme_jsonl(path: Path, image_root: Path) -> dict[str, list[EvalExample]]:
    """Layout (c): subtask -> examples (sorted by image file name, then line order) of one reference JSONL file."""
    grouped: dict[str, list[EvalExample]] = {}
    first_source: dict[tuple[str, str], str] = {}
    image_of_id: dict[tuple[str, str], Path] = {}
    for source, raw in _jsonl_objects(path):
        uid, image, prompt, target = _parse_task_record(raw, source, image_root, allow_list_target=False)
        subtask = raw.get("subtask", path.stem)
        if not isinstance(subtask, str) or not subtask.strip():
            raise _record_error(source, uid, "subtask", f"expected a non-empty string, got {subtask!r}")
        if target.lower() not in ("yes", "no"):
            raise _record_error(source, uid, "target", f"MME answers are Yes or No, got {target!r}")
        _check_unique(first_source, (subtask, uid), source, uid)
        known = image_of_id.setdefault((subtask, image.name), image)
        if known != image:
            raise _record_error(source, uid, "image_path", f"two images named {image.name!r} in subtask "
                                f"{subtask!r} ({known} and {image}); MME pairs questions by image file name")
        grouped.setdefault(subtask, []).append(EvalExample(
            uid=f"{subtask}/{uid}", task=MME_TASK, image=image, prompt=prompt, target=target.capitalize(),
            source=source, meta={"subtask": subtask, "image_id": image.name}))
    return {subtask: sorted(examples, key=lambda e: e.image.name) for subtask, examples in grouped.items()}


def _warn_unpaired(subtask: str, examples: Sequence[EvalExample]) -> None:
    """MME has one Yes and one No question per image; say so when a subtask does not (acc+ assumes the pairs)."""
    answers: dict[str, list[str]] = {}
    for example in examples:
        answers.setdefault(example.meta["image_id"], []).append(str(example.target))
    odd = sorted(image for image, given in answers.items() if sorted(given) != ["No", "Yes"])
    if odd:
        logger.warning("MME subtask %r: %d of %d images do not have exactly one Yes and one No question "
                       "(first: %s); acc+ counts each image's questions as they are.", subtask, len(odd),
                       len(answers), odd[0])


# ---------------------------------------------------------------------------------------------------------------
# Shared parsing


def _jsonl_objects(path: Path) -> list[tuple[str, dict]]:
    """(source "file:line", object) per non-blank line; invalid JSON, a non-object or an empty file raise."""
    objects = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and other characters splitlines breaks on.
    for line_number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        source = f"{path}:{line_number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalDataError(f"{source}: invalid JSON at column {error.colno} ({error.msg}); each line must be "
                                f"one JSON object. {FIX_HINT}") from error
        if not isinstance(raw, dict):
            raise EvalDataError(f"{source}: expected a JSON object, got {type(raw).__name__}. {FIX_HINT}")
        objects.append((source, raw))
    if not objects:
        raise EvalDataError(f"{path}: the file is empty; expected JSON lines "
                            '{"unique_id", "image_path", "prompt", "target"}.')
    return objects


def _parse_task_record(raw: dict, source: str, image_root: Path,
                       allow_list_target: bool) -> tuple[str, Path, str, Any]:
    """(uid, absolute image path, prompt, target) of one record, each field checked."""
    uid = raw.get("unique_id")
    if isinstance(uid, bool) or not isinstance(uid, (str, int)) or not str(uid).strip():
        got = "missing" if "unique_id" not in raw else repr(uid)
        raise _record_error(source, None, "unique_id", f"expected a non-empty string or an integer, got {got}")
    uid = str(uid)
    image_path = _string_field(raw, "image_path", source, uid)
    image = _absolute(image_root / image_path)
    if not image.is_file():
        raise _record_error(source, uid, "image_path", f"image file {image} not found; paths are relative to "
                            f"{image_root} unless absolute")
    prompt = _string_field(raw, "prompt", source, uid)
    target = raw.get("target")
    if allow_list_target and isinstance(target, list):
        if not target or not all(isinstance(t, str) and t.strip() for t in target):
            raise _record_error(source, uid, "target", f"a list target must hold one or more non-empty strings, "
                                f"got {target!r}")
        return uid, image, prompt, tuple(target)
    expected = "a non-empty string or a list of strings" if allow_list_target else "a non-empty string"
    return uid, image, prompt, _string_field(raw, "target", source, uid, expected)


def _string_field(raw: dict, name: str, source: str, uid: str, expected: str = "a non-empty string") -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if name not in raw else f"{type(value).__name__} {value!r}"[:120]
        raise _record_error(source, uid, name, f"expected {expected}, got {got}")
    return value


def _record_error(source: str, uid: str | None, field_name: str, problem: str) -> EvalDataError:
    who = f"record {uid!r}" if uid is not None else "record without a unique_id"
    return EvalDataError(f"{source}: {who}: field {field_name!r}: {problem}. {FIX_HINT}")


def _check_unique(first_source: dict[tuple[str, str], str], key: tuple[str, str], source: str, uid: str) -> None:
    if key in first_source:
        raise _record_error(source, uid, "unique_id", f"duplicate id in {key[0]!r}, first used at "
                            f"{first_source[key]}; ids must be unique within a task")
    first_source[key] = source


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # utf-8-sig: a leading BOM is dropped
    except (OSError, UnicodeDecodeError) as error:
        raise EvalDataError(f"{path}: cannot read the file as UTF-8 text ({error}).") from error


def _absolute(path: Path) -> Path:
    """Absolute and normalised (no '..'), without resolving symlinks: the name a user gave stays visible."""
    return Path(os.path.normpath(Path(path).absolute()))


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint


def input_fingerprint(examples: Sequence[EvalExample]) -> str:
    """sha256 (hex) over (task, uid, image path, prompt, target) of every example, in order.

    Image paths enter relative to the deepest folder holding all the images, so a moved or copied data folder
    keeps its fingerprint; a changed, added, removed or reordered example changes it.
    """
    digest = hashlib.sha256(b"cmlora-eval-inputs-v1\n")
    for row in _fingerprint_rows(examples):
        digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _fingerprint_rows(examples: Sequence[EvalExample]) -> Iterable[list[Any]]:
    try:
        folders = [str(example.image.parent) for example in examples if example.image is not None]
        root = os.path.commonpath(folders) if folders else None
    except ValueError:  # images on different drives (Windows): no common folder
        root = None
    for example in examples:
        if example.image is None:
            image = None
        else:
            image = Path(os.path.relpath(example.image, root)).as_posix() if root else example.image.as_posix()
        target = list(example.target) if isinstance(example.target, tuple) else example.target
        yield [example.task, example.uid, image, example.prompt, target]
