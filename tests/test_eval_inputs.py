"""Evaluation input readers: task JSONL files, POPE splits, MME's release layouts, the input fingerprint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cmlora.evaluation.inputs import (
    EvalDataError,
    EvalExample,
    input_fingerprint,
    read_mme,
    read_task_dir,
    read_task_file,
)


def make_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), (255, 0, 0)).save(path, format="PNG")
    return path


def record(uid: str | int, image: str = "img/a.png", prompt: str = "What is shown?", target: object = "a cat",
           **extra: object) -> dict:
    return {"unique_id": uid, "image_path": image, "prompt": prompt, "target": target, **extra}


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def task_dir(tmp_path: Path) -> Path:
    make_image(tmp_path / "img" / "a.png")
    make_image(tmp_path / "img" / "b.png")
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# Task files


def test_task_file_reads_records_with_absolute_images_and_list_targets(task_dir: Path) -> None:
    path = write_jsonl(task_dir / "text_vqa.jsonl", [
        record("q1", target="stop"),
        "",  # blank lines are not records
        record(7, image="img/b.png", prompt="Read the sign.", target=["stop", "stop sign"]),
    ])
    first, second = read_task_file(path)
    assert first == EvalExample("q1", "text_vqa", task_dir / "img" / "a.png", "What is shown?", "stop",
                                f"{path}:1", {})
    assert first.image.is_absolute()
    assert second.uid == "7" and second.target == ("stop", "stop sign") and second.source == f"{path}:3"
    assert second.image == task_dir / "img" / "b.png" and second.prompt == "Read the sign."


def test_task_file_image_root_and_absolute_paths(tmp_path: Path) -> None:
    image = make_image(tmp_path / "elsewhere" / "x.png")
    path = write_jsonl(tmp_path / "eval" / "custom_task.jsonl",
                       [record("r", image="x.png"), record("s", image=str(image))])
    examples = read_task_file(path, image_root=tmp_path / "elsewhere")
    assert [e.image for e in examples] == [image, image]
    assert {e.task for e in examples} == {"custom_task"}  # custom task names are allowed


def test_task_file_tolerates_bom_and_crlf(task_dir: Path) -> None:
    path = task_dir / "vsr.jsonl"
    text = "\r\n".join(json.dumps(r) for r in [record("a"), record("b", target="False")]) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert [(e.uid, e.target) for e in read_task_file(path)] == [("a", "a cat"), ("b", "False")]


@pytest.mark.parametrize(("line", "expected"), [
    ('{"unique_id": "a", ', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"image_path": "img/a.png", "prompt": "p", "target": "t"}), "field 'unique_id'"),
    (json.dumps(record("a", prompt=None)), "field 'prompt'"),
    (json.dumps(record("a", target=3)), "field 'target'"),
    (json.dumps(record("a", target=[])), "field 'target'"),
    (json.dumps(record("a", target=["x", 1])), "field 'target'"),
    (json.dumps(record(True)), "field 'unique_id'"),
    (json.dumps({"unique_id": "a", "prompt": "p", "target": "t"}), "field 'image_path'"),
])
def test_task_file_bad_record_names_file_line_and_field(task_dir: Path, line: str, expected: str) -> None:
    path = write_jsonl(task_dir / "mnist.jsonl", [record("ok"), line])
    with pytest.raises(EvalDataError, match="mnist.jsonl:2") as info:
        read_task_file(path)
    assert expected in str(info.value)


def test_task_file_missing_image_names_the_path(task_dir: Path) -> None:
    path = write_jsonl(task_dir / "cifar10.jsonl", [record("a", image="img/missing.png")])
    with pytest.raises(EvalDataError, match=r"cifar10.jsonl:1: record 'a': field 'image_path'") as info:
        read_task_file(path)
    assert str(task_dir / "img" / "missing.png") in str(info.value)


def test_task_file_duplicate_uid_names_both_lines(task_dir: Path) -> None:
    path = write_jsonl(task_dir / "snli_ve.jsonl", [record("a"), record("b"), record("a")])
    with pytest.raises(EvalDataError, match=r"snli_ve.jsonl:3: record 'a'.*duplicate.*snli_ve.jsonl:1"):
        read_task_file(path)


def test_task_file_empty_is_an_error(task_dir: Path) -> None:
    path = task_dir / "cifar100.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"cifar100.jsonl: the file is empty"):
        read_task_file(path)


# ---------------------------------------------------------------------------------------------------------------
# POPE


def test_pope_split_from_file_name(task_dir: Path) -> None:
    path = write_jsonl(task_dir / "pope_popular.jsonl", [record("1", target="yes"), record("2", target="no")])
    examples = read_task_file(path)
    assert {(e.task, e.meta["split"]) for e in examples} == {("pope_popular", "popular")}


def test_pope_split_from_field(task_dir: Path) -> None:
    path = write_jsonl(task_dir / "pope.jsonl", [
        record("1", split="random"), record("1", split="adversarial"), record("2", split="random")])
    examples = read_task_file(path)
    assert [(e.task, e.uid, e.meta) for e in examples] == [
        ("pope_random", "1", {"split": "random"}), ("pope_adversarial", "1", {"split": "adversarial"}),
        ("pope_random", "2", {"split": "random"})]


@pytest.mark.parametrize("extra", [{"split": "hard"}, {}])
def test_pope_unknown_or_missing_split_is_an_error(task_dir: Path, extra: dict) -> None:
    path = write_jsonl(task_dir / "pope.jsonl", [record("1", **extra)])
    with pytest.raises(EvalDataError, match=r"pope.jsonl:1: record '1': field 'split'.*random, popular, adversarial"):
        read_task_file(path)


def test_pope_split_field_contradicting_file_name(task_dir: Path) -> None:
    path = write_jsonl(task_dir / "pope_random.jsonl", [record("1", split="random"), record("2", split="popular")])
    with pytest.raises(EvalDataError, match=r"pope_random.jsonl:2: record '2': field 'split'"):
        read_task_file(path)


# ---------------------------------------------------------------------------------------------------------------
# Task folders


def test_task_dir_reads_all_and_filters(task_dir: Path) -> None:
    write_jsonl(task_dir / "text_vqa.jsonl", [record("a", target=["x", "y"])])
    write_jsonl(task_dir / "vsr.jsonl", [record("a", target="True")])
    write_jsonl(task_dir / "pope_random.jsonl", [record("a")])
    write_jsonl(task_dir / "pope_adversarial.jsonl", [record("a")])
    assert list(read_task_dir(task_dir)) == ["pope_adversarial", "pope_random", "text_vqa", "vsr"]
    selected = read_task_dir(task_dir, only=["text_vqa", "pope"])
    assert list(selected) == ["pope_adversarial", "pope_random", "text_vqa"]
    assert selected["text_vqa"][0].target == ("x", "y")
    assert list(read_task_dir(task_dir, only=["pope_random"])) == ["pope_random"]


def test_task_dir_selects_splits_of_a_single_pope_file(task_dir: Path) -> None:
    write_jsonl(task_dir / "pope.jsonl", [record("1", split="random"), record("2", split="popular")])
    assert list(read_task_dir(task_dir, only=["pope"])) == ["pope_popular", "pope_random"]
    only_random = read_task_dir(task_dir, only=["pope_random"])
    assert list(only_random) == ["pope_random"] and only_random["pope_random"][0].uid == "1"
    with pytest.raises(EvalDataError, match=r"pope.jsonl: no records for pope_adversarial"):
        read_task_dir(task_dir, only=["pope_adversarial"])


def test_task_dir_unknown_only_name_lists_what_exists(task_dir: Path) -> None:
    write_jsonl(task_dir / "vsr.jsonl", [record("a")])
    write_jsonl(task_dir / "mnist.jsonl", [record("a")])
    with pytest.raises(EvalDataError, match=r"no evaluation file for task 'text_vqa'; available: mnist, vsr"):
        read_task_dir(task_dir, only=["text_vqa"])


def test_task_dir_pope_from_two_files_is_an_error(task_dir: Path) -> None:
    write_jsonl(task_dir / "pope.jsonl", [record("1", split="random")])
    write_jsonl(task_dir / "pope_random.jsonl", [record("1")])
    with pytest.raises(EvalDataError, match=r"task 'pope_random' comes from two files"):
        read_task_dir(task_dir)


def test_task_dir_without_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match=r"no <task>.jsonl files"):
        read_task_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# MME


def write_questions(path: Path, lines: list[str], *, bom: bool = False, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines).encode("utf-8"))
    return path


def pair(question: str) -> list[str]:
    return [f"{question}\tYes", f"Is it not {question}\tNo"]


def make_mme(root: Path) -> Path:
    """artwork in layout (a), existence in layout (b), OCR as a reference JSONL file (c)."""
    art = root / "artwork"
    make_image(art / "images" / "20.jpg")
    make_image(art / "images" / "10.PNG")
    write_questions(art / "questions_answers_YN" / "20.txt", pair("Is this by Monet?"))
    write_questions(art / "questions_answers_YN" / "10.txt", pair("Is this a fresco?"), bom=True, newline="\r\n")
    existence = root / "existence"
    make_image(existence / "000b.jpg")
    make_image(existence / "000a.png")
    write_questions(existence / "000b.txt", ["Is there a dog in this image?\tNo  ", "Is there a cat?\tYes", "", ""])
    write_questions(existence / "000a.txt", pair("Is there a car?"))
    make_image(root / "ocr_images" / "sign.jpg")
    write_jsonl(root / "OCR.jsonl", [record(5, image="ocr_images/sign.jpg", prompt="Does it say STOP?", target="yes"),
                                     record(6, image="ocr_images/sign.jpg", prompt="Does it say GO?", target="No")])
    return root


def test_mme_reads_all_three_layouts(tmp_path: Path) -> None:
    root = make_mme(tmp_path / "MME")
    examples = read_mme(root)
    assert [e.uid for e in examples] == [
        "OCR/5", "OCR/6",
        "artwork/10.PNG/0", "artwork/10.PNG/1", "artwork/20.jpg/0", "artwork/20.jpg/1",
        "existence/000a.png/0", "existence/000a.png/1", "existence/000b.jpg/0", "existence/000b.jpg/1"]
    assert {e.task for e in examples} == {"mme"}
    by_uid = {e.uid: e for e in examples}
    art = by_uid["artwork/10.PNG/0"]
    assert art.image == root / "artwork" / "images" / "10.PNG" and art.image.is_absolute()
    assert art.prompt == "Is this a fresco?" and art.target == "Yes"  # BOM and CRLF tolerated
    assert art.meta == {"subtask": "artwork", "image_id": "10.PNG"}
    assert art.source == f"{root / 'artwork' / 'questions_answers_YN' / '10.txt'}:1"
    dog = by_uid["existence/000b.jpg/0"]
    assert (dog.prompt, dog.target) == ("Is there a dog in this image?", "No")
    assert dog.image == root / "existence" / "000b.jpg"
    ocr = by_uid["OCR/5"]
    assert ocr.target == "Yes" and ocr.meta == {"subtask": "OCR", "image_id": "sign.jpg"}
    assert ocr.image == root / "ocr_images" / "sign.jpg"


def test_mme_subtasks_filter(tmp_path: Path) -> None:
    root = make_mme(tmp_path / "MME")
    assert {e.meta["subtask"] for e in read_mme(root, subtasks=["existence", "OCR"])} == {"existence", "OCR"}
    with pytest.raises(EvalDataError, match=r"unknown MME subtask\(s\) 'color'; available: OCR, artwork, existence"):
        read_mme(root, subtasks=["color"])


def test_mme_jsonl_subtask_field_and_image_root(tmp_path: Path) -> None:
    image = make_image(tmp_path / "pics" / "p.png")
    write_jsonl(tmp_path / "mme" / "all.jsonl", [record("1", image="p.png", target="Yes", subtask="color"),
                                                 record("1", image="p.png", target="No", subtask="count")])
    examples = read_mme(tmp_path / "mme", image_root=tmp_path / "pics")
    assert [(e.uid, e.meta["subtask"], e.image) for e in examples] == [("color/1", "color", image),
                                                                        ("count/1", "count", image)]


def test_mme_prefers_jpg_and_flags_the_unused_image(tmp_path: Path) -> None:
    folder = tmp_path / "mme" / "scene"
    make_image(folder / "x.jpeg")
    write_questions(folder / "x.txt", pair("Is it a beach?"))
    assert read_mme(tmp_path / "mme")[0].meta["image_id"] == "x.jpeg"
    make_image(folder / "x.JPG")
    with pytest.raises(EvalDataError, match=r"x.jpeg: image without a question file"):
        read_mme(tmp_path / "mme")


@pytest.mark.parametrize(("lines", "expected"), [
    (["Is there a dog? Yes", "Is there a cat?\tNo"], r"q.txt:1: expected 'question<TAB>Yes\|No'"),
    (["Is there a dog?\tYes", "Is there a cat?\tmaybe"], r"q.txt:2: answer 'maybe' is not Yes or No"),
    (["Is there a dog?\tYes\tNo"], r"q.txt:1: expected 'question<TAB>Yes\|No', found 2 tabs"),
    (["", "  "], r"q.txt: the question file is empty"),
])
def test_mme_bad_question_file(tmp_path: Path, lines: list[str], expected: str) -> None:
    folder = tmp_path / "mme" / "count"
    make_image(folder / "q.jpg")
    write_questions(folder / "q.txt", lines)
    with pytest.raises(EvalDataError, match=expected):
        read_mme(tmp_path / "mme")


def test_mme_question_file_without_image(tmp_path: Path) -> None:
    folder = tmp_path / "mme" / "posters"
    make_image(folder / "images" / "a.jpg")
    write_questions(folder / "questions_answers_YN" / "a.txt", pair("Is it Jaws?"))
    write_questions(folder / "questions_answers_YN" / "b.txt", pair("Is it Alien?"))
    with pytest.raises(EvalDataError, match=r"questions_answers_YN/b.txt: no image for this question file"):
        read_mme(tmp_path / "mme")


def test_mme_image_without_question_file(tmp_path: Path) -> None:
    folder = tmp_path / "mme" / "color"
    make_image(folder / "a.jpg")
    make_image(folder / "b.png")
    write_questions(folder / "a.txt", pair("Is it red?"))
    with pytest.raises(EvalDataError, match=r"color/b.png: image without a question file"):
        read_mme(tmp_path / "mme")


def test_mme_jsonl_target_must_be_yes_or_no(tmp_path: Path) -> None:
    make_image(tmp_path / "mme" / "a.png")
    write_jsonl(tmp_path / "mme" / "OCR.jsonl", [record("1", image="a.png", target="stop")])
    with pytest.raises(EvalDataError, match=r"OCR.jsonl:1: record '1': field 'target'"):
        read_mme(tmp_path / "mme")


def test_mme_without_subtasks_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "mme" / "eval_tool").mkdir(parents=True)  # not a subtask: no question files
    with pytest.raises(EvalDataError, match=r"no MME subtask found"):
        read_mme(tmp_path / "mme")
    write_questions(tmp_path / "mme" / "eval_tool" / "questions_answers_YN" / "a.txt", pair("Is it?"))
    with pytest.raises(EvalDataError, match=r"eval_tool: this looks like one subtask's folder"):
        read_mme(tmp_path / "mme" / "eval_tool")
    make_image(tmp_path / "existence" / "a.jpg")
    write_questions(tmp_path / "existence" / "a.txt", pair("Is it?"))
    with pytest.raises(EvalDataError, match=r"existence: this looks like one subtask's folder"):
        read_mme(tmp_path / "existence")


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_stable_under_moves_and_sensitive_to_content(task_dir: Path, tmp_path_factory) -> None:
    path = write_jsonl(task_dir / "eval" / "vsr.jsonl",
                       [record("a", image="../img/a.png"), record("b", image="../img/b.png", target=["x"])])
    examples = read_task_file(path)
    fingerprint = input_fingerprint(examples)
    assert len(fingerprint) == 64 and fingerprint == input_fingerprint(read_task_file(path))
    moved = tmp_path_factory.mktemp("moved") / "copy"
    shutil.copytree(task_dir, moved)
    assert input_fingerprint(read_task_file(moved / "eval" / "vsr.jsonl")) == fingerprint
    write_jsonl(path, [record("a", image="../img/a.png", prompt="Changed?"),
                       record("b", image="../img/b.png", target=["x"])])
    assert input_fingerprint(read_task_file(path)) != fingerprint
    assert input_fingerprint(examples[::-1]) != fingerprint
    single_string_target = [examples[0], EvalExample(**{**examples[1].__dict__, "target": "x"})]
    assert input_fingerprint(single_string_target) != fingerprint


def test_mme_reports_what_it_does_not_read_and_unpaired_images(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "mme" / "landmark"
    make_image(folder / "a.jpg")
    write_questions(folder / "a.txt", ["Is it Paris?\tYes", "Is it Rome?\tYes"])
    (tmp_path / "mme" / "eval_tool").mkdir()
    with caplog.at_level("WARNING", logger="cmlora.evaluation.inputs"):
        examples = read_mme(tmp_path / "mme")
    assert [e.target for e in examples] == ["Yes", "Yes"]
    assert "eval_tool: not an MME subtask" in caplog.text
    assert "'landmark': 1 of 1 images do not have exactly one Yes and one No" in caplog.text
    assert len({examples[0], examples[1]}) == 2  # hashable despite the meta dict
