"""MME scored exactly as the benchmark's official tool scores it (method.md 6), plus its results-file format.

MME has 14 yes/no subtasks; each image comes with two questions, one whose answer is "Yes" and one whose answer
is "No". The official tool (`eval_tool/calculation.py`) reads one `<subtask>.txt` per subtask, lines
`image<TAB>question<TAB>gt<TAB>prediction`, the two lines of an image adjacent, and reports per subtask

    acc      = correct questions / questions
    acc_plus = images with both questions right / images
    score    = 100 * acc + 100 * acc_plus                       (max 200)

Perception is the sum over its 10 subtasks (max 2000), Cognition over its 4 (max 800). `score_mme` computes the
same numbers from rows in memory; `write_official_results` writes the files the official tool reads, so the two
can be checked against each other, and `read_official_results` reads them back for a rescore.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {"perception": PERCEPTION, "cognition": COGNITION}
OTHER_GROUP = "other"  # where strict=False puts subtasks that no group names

# Keys of score_mme's result that a group name may not take.
_RESERVED_KEYS = ("subtasks", "total", "subtasks_scored", "missing", "complete", "note")
# Characters that end a line for Python's readlines (which the official tool uses) or str.splitlines, plus the
# field separator: none of them may appear inside a field of a results file.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_FIELD_BREAKS = "\t" + _LINE_BREAKS


@dataclass(frozen=True)
class MMERow:
    """One MME question and the model's answer to it."""

    subtask: str  # e.g. "existence"; also the name of the official results file, <subtask>.txt
    image: str  # the image's file name, e.g. "000000006040.jpg"; the key that pairs an image's two questions
    question: str
    answer: str  # the ground truth, "Yes" or "No" (any case)
    prediction: str  # the model's generated text, as decoded


def parse_yes_no(prediction: str) -> str:
    """The official tool's reading of a prediction: "yes", "no" or "other" (and "other" is always wrong).

    The rule, in order:
      1. lowercase the prediction and strip leading and trailing whitespace;
      2. if it is exactly "yes" or "no", that is the answer;
      3. otherwise look only at its first 4 characters: if they contain "yes" the answer is "yes", else if they
         contain "no" the answer is "no", else it is "other".

    Quirks that follow from the rule, kept on purpose because the published MME numbers were computed with them:
      - "No." -> "no", "Yes, there is a dog." -> "yes", "YES" -> "yes", " yes" -> "yes" (after the strip);
      - "Not sure" -> "no" and "None of them" -> "no" (their first 4 characters contain "no");
      - "Eyes are closed" -> "yes" ("eyes" contains "yes");
      - "I think yes" -> "other" (the first 4 characters are "i th"); "Y" -> "other".

    About the strip: calculation.py itself does not strip, but the LLaVA evaluation pipeline the reference code
    comes from strips the decoded text before writing it (model_vqa_loader), and write_official_results strips
    too, so the official tool reads the same answer from our files as this function does from the raw text.
    (Without a strip, "  yes" would read as "other": its first 4 characters are "  ye".)
    """
    text = prediction.lower().strip()
    if text in ("yes", "no"):
        return text
    first_four = text[:4]
    if "yes" in first_four:
        return "yes"
    if "no" in first_four:
        return "no"
    return "other"


def _ground_truth(row: MMERow) -> str:
    truth = row.answer.strip().lower()
    if truth not in ("yes", "no"):
        raise ValueError(
            f"MME subtask {row.subtask!r}, image {row.image!r}, question {row.question!r}: ground-truth answer "
            f"{row.answer!r} is not Yes or No; MME questions are yes/no questions, fix the row's answer field"
        )
    return truth


def _group_rows(rows: Iterable[MMERow]) -> dict[str, dict[str, list[MMERow]]]:
    """subtask -> image -> its rows, all in first-seen order."""
    grouped: dict[str, dict[str, list[MMERow]]] = {}
    for row in rows:
        grouped.setdefault(row.subtask, {}).setdefault(row.image, []).append(row)
    return grouped


def _score_subtask(subtask: str, images: Mapping[str, list[MMERow]], strict: bool) -> dict:
    questions = correct = images_all_right = other_answers = unpaired_images = 0
    for image, image_rows in images.items():
        if len(image_rows) != 2:
            if strict:
                raise ValueError(
                    f"MME subtask {subtask!r}, image {image!r}: {len(image_rows)} question(s), expected exactly 2 "
                    "(MME asks two questions per image, and acc+ counts images with both right); fix the rows, "
                    "or pass strict=False for a suite with a different number of questions per image"
                )
            unpaired_images += 1
        image_correct = 0
        for row in image_rows:
            parsed = parse_yes_no(row.prediction)
            other_answers += parsed == "other"
            image_correct += parsed == _ground_truth(row)
        questions += len(image_rows)
        correct += image_correct
        images_all_right += image_correct == len(image_rows)
    acc = correct / questions
    acc_plus = images_all_right / len(images)
    return {
        "acc": acc,
        "acc_plus": acc_plus,
        "score": 100 * acc + 100 * acc_plus,
        "questions": questions,
        "images": len(images),
        "other_answers": other_answers,  # predictions read as "other" (counted wrong), as the official tool reports
        "unpaired_images": unpaired_images,  # images without exactly 2 questions (always 0 when strict)
    }


def _check_groups(groups: Mapping[str, Sequence[str]]) -> None:
    owner: dict[str, str] = {}
    for group, subtasks in groups.items():
        if group in _RESERVED_KEYS:
            raise ValueError(f"MME group name {group!r} is reserved for a result key; rename the group")
        for subtask in subtasks:
            if subtask in owner:
                raise ValueError(f"MME subtask {subtask!r} is in two groups, {owner[subtask]!r} and {group!r}")
            owner[subtask] = group


def score_mme(
    rows: Iterable[MMERow], *, strict: bool = True, groups: Mapping[str, Sequence[str]] | None = None
) -> dict:
    """Score MME rows as the official tool does: per subtask acc, acc+ and score, and a total per group.

    Result:
        {"subtasks": {name: {"acc", "acc_plus", "score", "questions", "images", "other_answers",
                             "unpaired_images"}},
         "perception": float | None, "cognition": float | None,   # one key per group (see `groups`)
         "total": float,                                          # sum of the scores of all subtasks scored
         "subtasks_scored": [names], "missing": [names], "complete": bool, "note": str}

    - A prediction is read with `parse_yes_no`; "other" is always wrong. acc = correct / questions;
      acc_plus = images whose questions are all right / images; score = 100 * acc + 100 * acc_plus.
    - A group's total is the sum of the scores of its subtasks that are present in `rows`; subtasks a group names
      but `rows` lacks are listed in "missing", never counted as 0, and a group none of whose subtasks is present
      has total None. "complete" is true when nothing is missing; the paper's MME totals (Perception max 2000,
      Cognition max 800) are only comparable when it is.
    - `groups` maps a group name to its subtasks; default {"perception": PERCEPTION, "cognition": COGNITION}.
    - strict=True (the official setting): a subtask that no group names, or an image without exactly two
      questions, raises ValueError naming the subtask and the image. strict=False scores them: subtasks no group
      names go to a group "other" (first-seen order), and images with 1 or 3+ questions count in acc+ when all
      their questions are right ("unpaired_images" counts them). This is for custom MME-style suites.
    - A ground-truth answer that is not Yes/No (any case) raises ValueError in either mode: there is nothing to
      score the prediction against. No rows at all raises too.
    """
    groups = dict(DEFAULT_GROUPS if groups is None else groups)
    _check_groups(groups)
    grouped = _group_rows(rows)
    if not grouped:
        raise ValueError("no MME rows to score")
    known = {subtask for subtasks in groups.values() for subtask in subtasks}
    unknown = [subtask for subtask in grouped if subtask not in known]
    if unknown:
        if strict:
            subtask = unknown[0]
            image = next(iter(grouped[subtask]))
            raise ValueError(
                f"MME subtask {subtask!r} (image {image!r}) is not one of the subtasks scored "
                f"({', '.join(sorted(known))}); check the subtask name, pass groups= to define custom subtasks, "
                "or strict=False to score unknown subtasks in a group 'other'"
            )
        groups[OTHER_GROUP] = [*groups.get(OTHER_GROUP, ()), *unknown]

    subtasks: dict[str, dict] = {}
    result: dict = {"subtasks": subtasks}
    missing: list[str] = []
    for group, names in groups.items():
        present = [name for name in names if name in grouped]
        missing += [name for name in names if name not in grouped]
        for name in present:
            subtasks[name] = _score_subtask(name, grouped[name], strict)
        result[group] = sum(subtasks[name]["score"] for name in present) if present else None
    result["total"] = sum(scored["score"] for scored in subtasks.values())
    result["subtasks_scored"] = list(subtasks)
    result["missing"] = missing
    result["complete"] = not missing
    if missing:
        result["note"] = (
            f"totals sum the {len(subtasks)} subtasks present; {len(missing)} are missing "
            f"({', '.join(missing)}), so the totals are not comparable with full MME totals (all 14 subtasks)"
        )
    else:
        result["note"] = f"all {len(subtasks)} subtasks present"
    return result


def _clean_prediction(prediction: str) -> str:
    for char in _FIELD_BREAKS:
        prediction = prediction.replace(char, " ")
    return prediction.strip()


def write_official_results(rows: Iterable[MMERow], out_dir: Path) -> list[Path]:
    """Write the files MME's official tool reads: one `<subtask>.txt` per subtask in `out_dir`.

    Each line is `image<TAB>question<TAB>gt<TAB>prediction` with gt as given (e.g. "Yes"); the lines of an image
    are adjacent (the tool pairs lines two by two), images in first-seen order, subtasks likewise. Returns the
    paths written.

    In the prediction, tabs and line breaks become spaces and leading/trailing whitespace is stripped: the tool
    splits each line on tabs (a tab in the answer would make five fields and crash it) and reads the file line by
    line (a newline would split one answer over two lines and shift every pair after it). Stripping makes the
    tool, which does not strip, read the same yes/no as `parse_yes_no`. Image, question and answer are data, not
    model output, so a tab or line break in them raises ValueError instead of being rewritten.
    """
    out_dir = Path(out_dir)
    grouped = _group_rows(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for subtask, images in grouped.items():
        if not subtask or "/" in subtask or "\\" in subtask or subtask in (".", ".."):
            raise ValueError(f"MME subtask name {subtask!r} cannot be a results file name <subtask>.txt")
        lines = []
        for image_rows in images.values():
            for row in image_rows:
                for field in ("image", "question", "answer"):
                    value = getattr(row, field)
                    if any(char in value for char in _FIELD_BREAKS):
                        raise ValueError(
                            f"MME subtask {subtask!r}, image {row.image!r}: the {field} {value!r} contains a tab or "
                            "line break, which the official results format cannot hold; clean the data"
                        )
                lines.append(f"{row.image}\t{row.question}\t{row.answer}\t{_clean_prediction(row.prediction)}\n")
        path = out_dir / f"{subtask}.txt"
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(lines)
        paths.append(path)
    return paths


def read_official_results(out_dir: Path) -> list[MMERow]:
    """Read every `<subtask>.txt` in `out_dir` (sorted by name) back into rows: the inverse of
    `write_official_results` (up to its cleaning of predictions), so that a results folder can be rescored.

    Lines are read as the official tool reads them (universal newlines) and must have exactly four tab-separated
    fields; a line that does not, an empty line included, raises ValueError naming the file and line number.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"MME results folder {out_dir} does not exist")
    rows = []
    for path in sorted(out_dir.glob("*.txt")):
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the newline that ends the last line
        for number, line in enumerate(lines, start=1):
            fields = line.split("\t")
            if len(fields) != 4:
                raise ValueError(
                    f"{path}:{number}: expected 4 tab-separated fields (image, question, gt, prediction), "
                    f"found {len(fields)}"
                )
            image, question, answer, prediction = fields
            rows.append(MMERow(path.stem, image, question, answer, prediction))
    return rows
