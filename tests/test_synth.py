"""The synthetic suite (`cmlora synth`): determinism, formats the loaders accept, task coverage, train/eval
separation, answers re-derived from the scenes, held-out digits, manifest."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmlora.cli import main
from cmlora.data import load_records
from cmlora.evaluation.inputs import read_mme, read_task_dir
from cmlora.evaluation.mme import MMERow, score_mme
from cmlora.evaluation.scoring import score_task
from cmlora.evaluation.tasks import SHORT_ANSWER, spec_for
from cmlora.synth import write_suite
from cmlora.synth.questions import COUNT_BY, question_kind, untailed
from cmlora.synth.scenes import (
    COLOURS,
    DIGITS_HELDOUT_START,
    NUMBER_WORDS,
    SHAPES,
    SIZE_PX,
    STYLES,
    WORDS,
    Sampler,
    Scene,
    positions,
    render,
)
from cmlora.synth.train_tasks import CATEGORIES, CORNERS, TASKS, plural

SIZES = {"train_per_task": 12, "eval_per_task": 12, "mme_images_per_subtask": 4, "pretrain_images": 40,
         "pretrain_eval_per_skill": 3, "train_eval_per_task": 5}
EVAL_NAMES = {"text_vqa", "vsr", "snli_ve", "cifar10", "cifar100", "mnist", "pope_random", "pope_popular",
              "pope_adversarial"}
SHAPE = "|".join(SHAPES)
COLOUR = "|".join(COLOURS)


def _generate(parent: Path, seed: int) -> Path:
    out = parent / "suite"
    write_suite(out, seed, **SIZES)
    return out


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a") / "suite"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SIZES.items()]
    assert main(["synth", "--out", str(out), "--seed", "0", *flags]) == 0
    return out


@pytest.fixture(scope="module")
def manifest(suite) -> dict:
    return json.loads((suite / "manifest.json").read_text())


@pytest.fixture(scope="module")
def scenes(suite) -> dict[str, Scene]:
    lines = (suite / "scenes.jsonl").read_text().splitlines()
    return {entry["image"]: Scene.from_dict(entry["scene"]) for entry in map(json.loads, lines)}


@pytest.fixture(scope="module")
def train(suite) -> list[dict]:
    return json.loads((suite / "train.json").read_text())


@pytest.fixture(scope="module")
def train_eval(suite) -> list[dict]:
    return json.loads((suite / "train_eval.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _qa(record: dict) -> tuple[str, str]:
    return record["conversations"][0]["value"].removeprefix("<image>\n"), record["conversations"][1]["value"]


def test_same_seed_same_bytes_other_seed_differs(suite, tmp_path):
    first = _files(suite)
    assert first == _files(_generate(tmp_path / "b", 0))
    other = _files(_generate(tmp_path / "c", 1))
    assert other.keys() == first.keys()
    assert other["train.json"] != first["train.json"]
    changed = sum(first[name] != other[name] for name in first if name.endswith(".png"))
    assert changed > 0.9 * sum(name.endswith(".png") for name in first)


def test_regenerating_replaces_a_suite_but_never_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_suite(foreign, 0, **SIZES)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_training_records_load_and_cover_the_categories(suite, manifest, train):
    records, report = load_records(suite / "train.json", suite / "images")
    assert not report and len(records) == len(TASKS) * SIZES["train_per_task"] == manifest["train_records"]
    assert all(record.image is not None and record.image.is_file() and record.task_name for record in records)
    tasks = Counter(record.task_name for record in records)
    assert len(tasks) >= 24 and set(tasks.values()) == {SIZES["train_per_task"]}
    assert {task.category for task in TASKS} == set(CATEGORIES) and len(CATEGORIES) == 6
    templates = [template for task in TASKS for template in task.templates]
    assert len(templates) == len(set(templates))  # no two tasks ask the same question with different answers
    by_name = {entry["name"]: entry for entry in manifest["train_tasks"]}
    for record in train:
        templates = by_name[record["task_name"]]["templates"]
        assert len(set(templates)) >= 3
        question, answer = _qa(record)
        question = question.removesuffix(f" {SHORT_ANSWER}")
        patterns = [re.escape(t).replace(r"\{", "{").replace(r"\}", "}") for t in templates]
        assert any(re.fullmatch(re.sub(r"{\w+}", ".+?", p), question) for p in patterns), question
        assert answer.strip()
    for name in ("pretrain.json", "pretrain_eval.json"):
        load_records(suite / name, suite / "images")


def test_a_record_scale_adds_records_of_its_task_after_those_a_suite_without_it_has(tmp_path):
    sizes = {**SIZES, "train_per_task": 4, "pretrain_images": 6}
    write_suite(tmp_path / "plain", 0, **sizes)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in sizes.items()]
    assert main(["synth", "--out", str(tmp_path / "scaled"), "--seed", "0", *flags,
                 "--record-scale", "count_colour=3"]) == 0
    manifest = json.loads((tmp_path / "scaled" / "manifest.json").read_text())
    assert manifest["options"] == {"record_scales": {"count_colour": 3}}
    assert "--record-scale count_colour=3" in manifest["command"]
    plain = json.loads((tmp_path / "plain" / "train.json").read_text())
    records = json.loads((tmp_path / "scaled" / "train.json").read_text())
    counts = Counter(record["task_name"] for record in records)
    assert counts["count_colour"] == 12 and {n for t, n in counts.items() if t != "count_colour"} == {4}
    assert {entry["name"]: entry["count"] for entry in manifest["train_tasks"]}["count_colour"] == 12
    by_id = {record["id"]: record for record in records}
    assert all(by_id[record["id"]] == record for record in plain)  # every record of the unscaled suite, as it was
    extra = [r for r in records if r["id"] not in {p["id"] for p in plain}]
    assert len(extra) == 8 and {r["task_name"] for r in extra} == {"count_colour"}
    images = {r["image"] for r in extra}
    assert len(images) == 8 and not images & {r["image"] for r in plain}  # new images of the pool, for it alone
    for name in ("train_eval.json", "pretrain.json", "eval/pope_popular.jsonl"):  # not scaled, and unchanged
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "scaled" / name).read_bytes(), name
    for image in ["images/" + r["image"] for r in plain]:
        assert (tmp_path / "plain" / image).read_bytes() == (tmp_path / "scaled" / image).read_bytes()
    with pytest.raises(ValueError, match="no training task count_color"):
        write_suite(tmp_path / "bad", 0, **sizes, record_scales={"count_color": 2})
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path / "bad"), "--record-scale", "count_colour=0"])


def test_synth_command_writes_the_natural_wording_and_the_suffix_share_when_asked(tmp_path):
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SIZES.items()]
    assert main(["synth", "--out", str(tmp_path / "s"), *flags, "--questions", "natural",
                 "--short-answer-share", "0.5"]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["options"] == {"questions": "natural", "short_answer_share": 0.5}
    assert manifest["pretrain"]["questions"] == "natural" and "verify" in manifest["pretrain"]["skills"]
    questions = [turn["value"] for record in json.loads((tmp_path / "s" / "pretrain.json").read_text())
                 for turn in record["conversations"][::2]]
    assert any(q.startswith("<image>\nWhere is the ") for q in questions)
    assert "verify" in {question_kind(q) for q in questions}


def test_short_answer_share_ends_that_share_of_the_instructions_with_llava_short_answer_suffix(train, tmp_path):
    assert not any(SHORT_ANSWER in _qa(record)[0] for record in train)  # the default suite: none
    manifest = write_suite(tmp_path / "s", 0, **SIZES, short_answer_share=0.25)
    assert manifest["options"] == {"short_answer_share": 0.25} and "--short-answer-share 0.25" in manifest["command"]
    records = json.loads((tmp_path / "s" / "train.json").read_text())
    suffixed = Counter(_qa(record)[0].endswith(SHORT_ANSWER) for record in records
                       if record["task_name"] != "describe_scene")
    assert abs(suffixed[True] / suffixed.total() - 0.25) < 0.07
    assert not any(SHORT_ANSWER in _qa(record)[0] for record in records if record["task_name"] == "describe_scene")
    with pytest.raises(ValueError, match="short_answer_share"):
        write_suite(tmp_path / "t", 0, **SIZES, short_answer_share=1.5)
    with pytest.raises(ValueError, match="question style"):
        write_suite(tmp_path / "t", 0, **SIZES, questions="casual")


def test_interfering_tasks_share_images_with_different_conventions(train):
    by_image: dict[str, dict[str, str]] = {}
    for record in train:
        by_image.setdefault(record["image"], {})[record["task_name"]] = _qa(record)[1]
    shared = [answers for answers in by_image.values() if {"count_objects_digit", "count_objects_word"} <= set(answers)]
    assert shared
    words = ["zero", "one", "two", "three", "four"]
    assert all(words[int(a["count_objects_digit"])] == a["count_objects_word"] for a in shared)
    assert {a["exists_true_false"] for a in shared} == {"true", "false"}
    assert {a["exists_yes_no"] for a in shared} == {"yes", "no"}


def test_eval_tasks_are_unseen(suite, train, manifest):
    train_names = {record["task_name"] for record in train}
    eval_names = {entry["name"] for entry in manifest["eval_tasks"]}
    assert eval_names == EVAL_NAMES and not eval_names & train_names and "mme" not in train_names
    digest = {}

    def key(path: Path, question: str) -> tuple[str, str]:
        if path not in digest:
            digest[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digest[path], question

    seen = {key(suite / "images" / r["image"], _qa(r)[0]) for r in train}
    train_questions = {question for _, question in seen}
    examples = [e for task in read_task_dir(suite / "eval").values() for e in task] + read_mme(suite / "mme")
    for example in examples:
        assert example.prompt not in train_questions
        assert key(example.image, example.prompt) not in seen


def test_eval_files_read_and_score(suite, manifest):
    tasks = read_task_dir(suite / "eval")
    assert set(tasks) == EVAL_NAMES
    counts = {entry["name"]: entry["count"] for entry in manifest["eval_tasks"]}
    for task, examples in tasks.items():
        assert len(examples) == counts[task] >= SIZES["eval_per_task"]
        kind = spec_for(task).kind
        targets = [e.target for e in examples]
        perfect = [t if isinstance(t, str) else t[0] for t in targets]
        labels = sorted(set(targets)) if kind == "label" else None
        assert score_task(kind, perfect, targets, labels=labels)["accuracy"] == 1.0, task
        if kind != "vqa":
            wrong = ["xyzzy"] * len(targets)
            assert score_task(kind, wrong, targets, labels=labels)["accuracy"] < 1.0
    assert Counter(e.target for e in tasks["pope_random"]) == {"yes": 6, "no": 6}
    mme = read_mme(suite / "mme")
    answers: dict[tuple[str, str], list[str]] = {}
    for example in mme:
        answers.setdefault((example.meta["subtask"], example.meta["image_id"]), []).append(str(example.target))
    assert all(sorted(given) == ["No", "Yes"] for given in answers.values())
    assert len(answers) == len(manifest["mme"]["subtasks"]) * SIZES["mme_images_per_subtask"]
    rows = [MMERow(e.meta["subtask"], e.meta["image_id"], e.prompt, str(e.target), str(e.target)) for e in mme]
    scored = score_mme(rows, strict=False)
    assert all(s["score"] == 200 for s in scored["subtasks"].values())
    assert {"existence", "count", "position", "color", "OCR"} <= set(scored["subtasks"])


def _one(pattern: str, text: str) -> str:
    found = re.findall(rf"\b({pattern})s?\b", text)
    assert len(set(found)) == 1, (pattern, text)
    return found[0]


def test_heldout_training_records_are_new_images_of_the_same_tasks(suite, manifest, train, train_eval):
    records, _ = load_records(suite / "train_eval.json", suite / "images")
    assert len(records) == manifest["train_eval_records"] == len(TASKS) * SIZES["train_eval_per_task"]
    assert Counter(r.task_name for r in records) == {task.name: SIZES["train_eval_per_task"] for task in TASKS}
    assert not {r["image"] for r in train} & {r["image"] for r in train_eval}
    assert not {r["id"] for r in train} & {r["id"] for r in train_eval}
    assert all(r["image"].startswith("train_eval/") and len(r["conversations"]) == 2 for r in train_eval)


def test_training_answers_follow_from_the_scene(train, train_eval, scenes):
    checked = Counter()
    for record in train + train_eval:
        task, image = record["task_name"], "images/" + record["image"]
        scene, (question, answer) = scenes[image], _qa(record)
        shapes = {(i.colour, i.label): i for i in scene.items if i.kind == "shape"}
        if task in ("count_objects_digit", "noisy_count"):
            assert answer == str(len(scene.items))
        elif task in ("exists_yes_no", "exists_true_false"):
            present = (_one(COLOUR, question), _one(SHAPE, question)) in shapes
            assert answer == {True: "yes", False: "no"}[present] if task == "exists_yes_no" else str(present).lower()
        elif task in ("colour_of_shape", "noisy_colour"):
            assert [i.colour for i in scene.items if i.label == _one(SHAPE, question)] == [answer]
        elif task == "position_of_object":
            assert scene.position(shapes[(_one(COLOUR, question), _one(SHAPE, question))]) == answer
        elif task in ("colour_at_position", "letter_at_position"):
            item = scene.at(_one("|".join(positions(scene.grid)), question))
            assert (item.colour if task == "colour_at_position" else item.label) == answer
        elif task == "spatial_relation":
            pattern = rf"the ({COLOUR}) ({SHAPE}) (?:located |is )?(.+?) the ({COLOUR}) ({SHAPE})\?"
            c1, s1, relation, c2, s2 = re.search(pattern, question).groups()
            a, b = shapes[(c1, s1)], shapes[(c2, s2)]
            truth = {"to the left of": a.col < b.col, "to the right of": a.col > b.col, "above": a.row < b.row,
                     "below": a.row > b.row}[relation]
            assert answer == ("yes" if truth else "no")
        elif task == "count_colour":
            assert answer == str(sum(i.colour == _one(COLOUR, question) for i in scene.items))
        elif task == "majority_colour":
            (top, n), *rest = Counter(i.colour for i in scene.items).most_common()
            assert answer == top and all(m < n for _, m in rest)
        elif task == "count_shape":  # the plural is spelt right: "crosses", not "crosss"
            shape = next(shape for shape in SHAPES if plural(shape) in question.split())
            assert answer == str(sum(i.label == shape for i in scene.items))
        elif task == "digit_sum":
            assert answer == str(sum(int(i.label) for i in scene.items))
        elif task in ("read_word", "spell_word"):
            assert answer.replace(" ", "") == "".join(i.label for i in scene.ordered())
        elif task == "shape_corners":
            assert [str(CORNERS[i.label]) for i in scene.items if i.colour == _one(COLOUR, question)] == [answer]
        elif task == "style_classify":
            assert answer == scene.style
        elif task == "describe_scene":
            assert answer == scene.describe() and answer.count(" . ") == len(scene.items)
        else:
            continue
        checked[task] += 1
    assert len(checked) >= 15


def test_eval_answers_follow_from_the_scene(suite, scenes):
    for task, examples in read_task_dir(suite / "eval").items():
        for e in examples:
            scene = scenes[e.image.relative_to(suite.resolve()).as_posix()]
            shapes = {(i.colour, i.label) for i in scene.items if i.kind == "shape"}
            if task.startswith("pope"):
                colour, shape = re.search(rf"a ({COLOUR}) ({SHAPE}) in", e.prompt).groups()
                assert e.target == ("yes" if (colour, shape) in shapes else "no")
            elif task == "mnist":
                assert e.target == scene.items[0].label and len(scene.items) == 1
            elif task == "text_vqa":
                assert e.target[0] == "".join(i.label for i in scene.ordered())
            elif task == "cifar100":
                item = scene.items[0]
                assert e.target == f"{item.colour} {scene.style} {item.label}"
            elif task == "cifar10":
                item = scene.items[0]
                assert e.target == (f"{item.size} {item.label}" if item.kind == "shape" else item.kind)
            elif task == "snli_ve" and "There is a " in e.prompt:
                colour, shape = re.search(rf"There is a ({COLOUR}) ({SHAPE})\.", e.prompt).groups()
                assert e.target == ("entailment" if (colour, shape) in shapes else "contradiction")
    for e in read_mme(suite / "mme"):
        scene = scenes[e.image.relative_to(suite.resolve()).as_posix()]
        if e.meta["subtask"] == "existence":
            colour, shape = re.search(rf"a ({COLOUR}) ({SHAPE}) in", e.prompt).groups()
            assert e.target == ("Yes" if any((i.colour, i.label) == (colour, shape) for i in scene.items) else "No")
        elif e.meta["subtask"] == "numerical_calculation":
            total = int(re.search(r"equal to (\d+)\?", e.prompt).group(1))
            assert e.target == ("Yes" if total == sum(int(i.label) for i in scene.items) else "No")


def test_images_show_their_scene(suite, scenes):
    checked = 0
    for path, scene in scenes.items():
        image = np.asarray(Image.open(suite / path))
        assert image.shape == (scene.grid * 16, scene.grid * 16, 3)
        if scene.style != "filled":
            continue
        for item in scene.items:
            if item.kind == "shape":
                s = SIZE_PX[item.size]
                x = item.col * 16 + (16 - s) // 2 + item.dx + s // 2
                y = item.row * 16 + (16 - s) // 2 + item.dy + s // 2
                assert tuple(image[y, x]) == tuple(item.rgb), (path, item)
                checked += 1
    assert checked > 100


def test_heldout_digits_only_in_mnist(scenes, manifest):
    for path, scene in scenes.items():
        for item in scene.items:
            if item.digit_index is not None:
                assert (item.digit_index >= DIGITS_HELDOUT_START) == path.startswith("eval/images/mnist/"), path
    used = manifest["digits"]["indices_used"]
    assert all(i >= DIGITS_HELDOUT_START for i in used["eval/mnist"])
    assert all(i < DIGITS_HELDOUT_START for part, ids in used.items() if part != "eval/mnist" for i in ids)
    assert {"train", "pretrain"} <= set(used)


def test_manifest_counts_and_chance(suite, manifest, train):
    counts = Counter(record["task_name"] for record in train)
    for entry in manifest["train_tasks"]:
        assert 0 < entry["chance"] <= 1 and entry["count"] == counts[entry["name"]]
        if entry["answers"] is not None:
            assert entry["chance"] == pytest.approx(1 / len(entry["answers"]))
            assert {_qa(r)[1] for r in train if r["task_name"] == entry["name"]} <= set(entry["answers"])
    assert all(0 < entry["chance"] <= 1 for entry in manifest["eval_tasks"])
    assert all(0 < chance <= 1 for chance in manifest["pretrain"]["eval_chance"].values())
    assert sorted(name for names in manifest["categories"].values() for name in names) == sorted(counts)
    readme = (suite / "README.md").read_text()
    assert manifest["command"] in readme and all(task.name in readme for task in TASKS)


def test_pretrain_records_are_dense_and_eval_is_per_skill(suite, manifest):
    records = json.loads((suite / "pretrain.json").read_text())
    assert len(records) == SIZES["pretrain_images"]
    for record in records:
        turns = record["conversations"]
        questions = [t["value"] for t in turns[0::2]]
        described = questions[-1] == "describe the image ."
        counted = sum(question_kind(q) in COUNT_BY for q in questions)  # one extra question, on some images
        assert len(questions) - described - counted in range(1, 7) and counted <= 1
        assert len(set(questions)) == len(questions)
    assert any(r["conversations"][-2]["value"] == "describe the image ." for r in records)
    held_out = json.loads((suite / "pretrain_eval.json").read_text())
    skills = Counter(r["task_name"] for r in held_out)
    assert set(skills) == set(manifest["pretrain"]["skills"]) and set(skills.values()) == {3}
    assert all(len(r["conversations"]) == 2 and len(r["conversations"][1]["value"].split()) <= 2 for r in held_out)
    pretrain_images = {r["image"] for r in records}
    assert not pretrain_images & {r["image"] for r in held_out}


def test_count_questions_count_one_colour_or_one_shape_on_scenes_of_shapes_only():
    from cmlora.synth.questions import count_questions
    from cmlora.synth.suite import pretrain_scene

    singular = {plural(shape): shape for shape in SHAPES}
    sampler = Sampler(random.Random(6), grid=2)
    answers, asked = Counter(), 0
    for index in range(400):
        scene = pretrain_scene(sampler)
        style = ("plain", "natural")[index % 2]
        found = count_questions(scene, sampler.rng, style)
        if any(item.kind != "shape" for item in scene.items):
            assert found == {}
            continue
        assert set(found) == set(COUNT_BY)
        for skill, [(question, answer)] in found.items():
            assert question_kind(question) == skill
            named = untailed(question).split()[2]  # "how many red objects ...", "How many crosses are ..."
            if skill == "count_colour":
                assert named in COLOURS and answer == str(sum(i.colour == named for i in scene.items)), question
            else:
                assert answer == str(sum(i.label == singular[named] for i in scene.items)), question
            assert question.startswith("How many" if style == "natural" else "how many")
            answers[answer] += 1
            asked += 1
    assert asked > 300 and {"0", "1", "2"} <= set(answers)  # absent values are asked about too
    with pytest.raises(ValueError, match="not a pretraining question"):
        question_kind("how many dogs are there ?")


def test_count_share_adds_one_count_question_to_that_share_of_the_images_of_shapes_and_nothing_else(tmp_path):
    sizes = {**SIZES, "pretrain_images": 300}
    without = write_suite(tmp_path / "a", 0, **sizes)  # the default: none
    asked = write_suite(tmp_path / "b", 0, **sizes, count_share=0.5)
    assert asked["options"] == {"count_share": 0.5} and "--count-share 0.5" in asked["command"]
    assert "options" not in without and asked["pretrain"]["count_share"] == 0.5
    assert not set(COUNT_BY) & set(without["pretrain"]["skills"]) and "count_share" not in without["pretrain"]
    assert set(COUNT_BY) <= set(asked["pretrain"]["skills"])
    lines = (tmp_path / "b" / "scenes.jsonl").read_text().splitlines()
    scenes = {entry["image"]: Scene.from_dict(entry["scene"]) for entry in map(json.loads, lines)}
    shapes_only = Counter()
    plain, counted = (json.loads((tmp_path / name / "pretrain.json").read_text()) for name in ("a", "b"))
    for before, after in zip(plain, counted, strict=True):
        turns = [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in
                 zip(after["conversations"][::2], after["conversations"][1::2], strict=True)]
        kept = [turn for turn in turns if question_kind(turn[0]) not in COUNT_BY]
        assert [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(
            before["conversations"][::2], before["conversations"][1::2], strict=True)] == kept  # the rest unchanged
        extra = [i for i, turn in enumerate(turns) if question_kind(turn[0]) in COUNT_BY]
        only_shapes = all(item.kind == "shape" for item in scenes[f"images/{after['image']}"].items)
        assert only_shapes or not extra
        if extra and turns[-1][0] == "describe the image .":
            assert extra == [len(turns) - 2]  # asked before the description
        shapes_only[bool(extra)] += only_shapes
    assert 0.35 < shapes_only[True] / shapes_only.total() < 0.65
    held_out = {name: Counter(r["task_name"] for r in json.loads((tmp_path / name / "pretrain_eval.json").read_text()))
                for name in ("a", "b")}
    assert not set(COUNT_BY) & set(held_out["a"]) and all(held_out["b"][skill] == 3 for skill in COUNT_BY)
    with pytest.raises(ValueError, match="count_share"):
        write_suite(tmp_path / "c", 0, **SIZES, count_share=1.5)


def test_pretraining_asks_for_the_word_only_where_the_letters_spell_one():
    from cmlora.synth.questions import pretrain_questions

    sampler = Sampler(random.Random(3), grid=2)
    word = sampler.word()
    assert pretrain_questions(word, random.Random(0))["word"] == [("what word is written ?", word.word())]
    [(question, answer)] = pretrain_questions(word, random.Random(0), "natural")["word"]
    assert (untailed(question), answer) == ("What word is written?", word.word())
    assert word.word() in WORDS
    letters = sampler.letters("QZXK", in_order=True)
    assert "word" not in pretrain_questions(letters, random.Random(0))


def test_pretraining_names_an_object_by_shape_colour_or_both_whichever_is_unique():
    from cmlora.synth.questions import pretrain_questions, references
    from cmlora.synth.scenes import Item, Scene

    red_circle, red_square, blue_circle = (Item("shape", "circle", "red", 0, 0), Item("shape", "square", "red", 0, 1),
                                           Item("shape", "circle", "blue", 1, 0))
    scene = Scene(2, "filled", (0, 0, 0), [red_circle, red_square, blue_circle, Item("digit", "7", "green", 1, 1)])
    assert references(scene, red_circle) == ["red circle"]
    assert references(scene, red_square) == ["square", "red square"]
    assert references(scene, blue_circle) == ["blue object", "blue circle"]
    asked = Counter()
    for seed in range(40):
        found = pretrain_questions(scene, random.Random(seed), "plain")
        for question, answer in found["position"]:
            name = question.removeprefix("where is the ").removesuffix(" ?")
            item = next(i for i in scene.items if name in references(scene, i))
            assert answer == scene.position(item)
            asked[name] += 1
        assert {q.removeprefix("is the ").removesuffix(" small or large ?") for q, _ in found["size"]} <= {
            name for item in scene.items for name in references(scene, item)}
    assert set(asked) == {"red circle", "square", "red square", "blue object", "blue circle"}


def holds(scene, about: str, slots: dict) -> bool:
    """Whether the claim of a verify question about `about` with these slot values is true of `scene`."""
    from cmlora.synth.questions import references

    named = [i for i in scene.shapes() if slots.get("name") in references(scene, i)]
    if about == "colour":
        [item] = [i for i in scene.shapes() if i.label == slots["shape"]]
        return item.colour == slots["colour"]
    if about == "shape":
        [item] = [i for i in scene.items if i.colour == slots["colour"]]
        return item.label == slots["shape"]
    if about in ("size", "position"):
        [item] = named
        return item.size == slots["size"] if about == "size" else scene.position(item) == slots["position"]
    if about in ("one", "count"):
        return len(scene.items) == (1 if about == "one" else NUMBER_WORDS.index(slots["number"]))
    if about == "style":
        return scene.style == slots["style"]
    if about in ("digit", "letter"):
        return scene.at(slots["position"]).label == slots[about]
    return scene.word() == slots["word"]


def verified(scene, question: str) -> tuple[str, bool]:
    """What a verify question is about (its key in VERIFY) and whether its claim holds, re-derived from `scene`."""
    from cmlora.synth.questions import VERIFY, template_pattern

    for about, template in VERIFY.items():
        match = template_pattern(template).fullmatch(untailed(question))
        if match is None:
            continue
        return about, holds(scene, about, match.groupdict())
    raise AssertionError(f"no verify template writes {question!r}")


def test_verify_questions_are_true_as_often_as_false_and_their_answers_follow_the_scene():
    from cmlora.synth.questions import pretrain_questions
    from cmlora.synth.suite import pretrain_scene

    sampler = Sampler(random.Random(11), grid=2)
    answers, about = Counter(), Counter()
    for _ in range(400):
        scene = pretrain_scene(sampler)
        assert "verify" not in pretrain_questions(scene, random.Random(0))  # the default wording has none
        for question, answer in pretrain_questions(scene, sampler.rng, "natural")["verify"]:
            kind, true = verified(scene, question)
            assert answer == ("yes" if true else "no"), (question, scene.describe())
            answers[answer] += 1
            about[kind] += 1
    assert 0.45 < answers["yes"] / answers.total() < 0.55
    assert {"colour", "shape", "size", "one", "style", "digit", "letter", "word"} <= set(about)


def test_pretraining_questions_carry_answer_format_tails_on_a_share_and_never_an_mme_question(tmp_path):
    from cmlora.synth.questions import TAIL_PROBABILITY, YES_NO, pretrain_questions
    from cmlora.synth.suite import pretrain_scene

    sampler = Sampler(random.Random(4), grid=2)
    tails, asked = Counter(), set()
    for _ in range(500):
        for skill, pairs in pretrain_questions(pretrain_scene(sampler), sampler.rng, "natural").items():
            for question, _ in pairs:
                asked.add(untailed(question))
                tail = question[len(untailed(question)):].strip()
                assert tail in ("", YES_NO, SHORT_ANSWER, f"{YES_NO} {SHORT_ANSWER}"), question
                assert YES_NO not in tail or skill in ("existence", "verify"), question
                tails[bool(tail)] += 1
    assert abs(tails[True] / tails.total() - TAIL_PROBABILITY) < 0.03
    write_suite(tmp_path / "s", 0, train_per_task=1, eval_per_task=1, mme_images_per_subtask=20, pretrain_images=1,
                pretrain_eval_per_skill=1, questions="natural")
    mme = {line.split("\t")[0].removesuffix(" Please answer yes or no.")
           for path in (tmp_path / "s" / "mme").rglob("*.txt") for line in path.read_text().splitlines()}
    assert len(mme) > 150 and not mme & asked


def test_tailed_questions_are_the_plain_ones_with_natural_tails_and_no_verify():
    from cmlora.synth.questions import PLAIN, TAIL_PROBABILITY, YES_NO, pretrain_questions, template_pattern
    from cmlora.synth.suite import pretrain_scene

    sampler = Sampler(random.Random(8), grid=2)
    tailed = [(skill, question) for _ in range(300)
              for skill, pairs in pretrain_questions(pretrain_scene(sampler), sampler.rng, "tailed").items()
              for question, _ in pairs]
    plain = [template_pattern(template) for template in PLAIN.values()]
    assert "verify" not in {skill for skill, _ in tailed}
    for skill, question in tailed:
        assert any(pattern.fullmatch(untailed(question)) for pattern in plain), question
        assert question_kind(question).split(" by ")[0] == skill
    share = sum(question != untailed(question) for _, question in tailed) / len(tailed)
    assert abs(share - TAIL_PROBABILITY) < 0.04
    assert any(skill == "existence" and YES_NO in question for skill, question in tailed)


def test_the_default_suite_is_tailed_and_records_its_wording_but_only_other_wordings_as_options(suite, manifest,
                                                                                                 tmp_path):
    from cmlora.synth.questions import DEFAULT_STYLE, TAIL_PROBABILITY, untailed

    assert DEFAULT_STYLE == "tailed" and "options" not in manifest
    assert manifest["pretrain"]["questions"] == "tailed"
    assert manifest["pretrain"]["tail_probability"] == TAIL_PROBABILITY
    questions = [r["conversations"][0]["value"] for r in json.loads((suite / "pretrain_eval.json").read_text())]
    assert any(q != untailed(q) for q in questions) and "tail ('" in (suite / "README.md").read_text()
    plain = write_suite(tmp_path / "plain", 0, **SIZES, questions="plain")
    assert plain["options"] == {"questions": "plain"} and "tail_probability" not in plain["pretrain"]
    assert "'plain' wording" in (tmp_path / "plain" / "README.md").read_text()


def test_question_kind_names_every_pretraining_question_by_skill_and_way_of_naming():
    from cmlora.synth.questions import DESCRIBE, pretrain_questions, question_kind
    from cmlora.synth.suite import pretrain_scene

    sampler = Sampler(random.Random(5), grid=2)
    kinds = Counter()
    for index in range(600):
        style = ("plain", "natural")[index % 2]
        for skill, pairs in pretrain_questions(pretrain_scene(sampler), sampler.rng, style).items():
            for question, _ in pairs:
                kind = question_kind(f"<image>\n{question}" if kinds.total() % 2 else question)
                assert kind.split(" by ")[0] == skill, (question, kind)
                kinds[kind] += 1
    assert {f"{skill} by {way}" for skill in ("position", "size") for way in ("shape", "colour", "colour and shape")
            } <= set(kinds)
    assert {"colour", "shape", "count", "existence", "style", "digit", "letter", "word", "verify"} <= set(kinds)
    assert question_kind("Where is the red triangle?") == "position by colour and shape"
    assert question_kind("Is the blue object small or large? Answer the question using a single word or phrase."
                         ) == "size by colour"
    assert question_kind("Is the blue object small? Answer yes or no.") == "verify"
    assert question_kind(DESCRIBE) == "description"
    assert question_kind("where is the red triangle ?") == "position by colour and shape"
    for foreign in ("What is the capital of France?", "Where is the purple blob?", "Is the cat small or large?",
                    "where is the red triangle?"):
        with pytest.raises(ValueError, match="not a pretraining question"):
            question_kind(foreign)


def test_grid3_and_bitmap_font(tmp_path):
    manifest = write_suite(tmp_path / "g3", 0, grid=3, train_per_task=2, eval_per_task=2, mme_images_per_subtask=1,
                           pretrain_images=5, pretrain_eval_per_skill=1, font="bitmap")
    assert manifest["image"]["size"] == 48 and manifest["image"]["font"] == "bitmap"
    assert len(manifest["image"]["positions"]) == 9
    scene = Sampler(random.Random(0), 2).letters("AW", in_order=True)
    for font in ("bitmap", "freetype"):
        pixels = np.asarray(render(scene, font))
        assert pixels[:16, :16].max() > 150 and pixels[:16, 16:].max() > 150
    assert set(STYLES) == {"filled", "outline", "striped", "noisy"}


def test_the_base_reads_the_fact_each_knowledge_task_needs_and_no_fact_against_it(train, scenes):
    """Each answer of a task that needs world knowledge follows, by one fact of `knowledge.facts()`, from what the
    image shows (derived here from the scene, not from the answer); no fact states another answer."""
    from cmlora.synth.knowledge import facts
    from cmlora.synth.train_tasks import INVISIBLE, RELATIONS, TASKS_BY_NAME, VISIBLE, answer_set

    known = set(facts())
    templates = {"shape_corners": "A {shape} has {value} corners.", "colour_warmth": "{Colour} is a {value} colour.",
                 "digit_parity": "{a} is an {value} number.", "digit_word": "{a} is written {value} in words.",
                 "digit_sum": "{a} plus {b} is {value}.", "larger_digit": "The larger of {a} and {b} is {value}.",
                 "letter_vowel": "{letter} is a {value}.",
                 "visible_property": "The {prop} of an object {value} be seen in a picture."}
    checked = Counter()
    for record in train:
        task, scene, (question, answer) = record["task_name"], scenes["images/" + record["image"]], _qa(record)
        if task == "spatial_relation":
            pattern = rf"the ({COLOUR}) ({SHAPE}) (?:located |is )?(.+?) the ({COLOUR}) ({SHAPE})\?"
            c1, s1, relation, c2, s2 = re.search(pattern, question).groups()
            assert relation in RELATIONS
            cells = {(i.colour, i.label): scene.position(i) for i in scene.items}
            stated = f"Something at the {cells[c1, s1]} is {relation} something at the {cells[c2, s2]}." in known
            assert answer == ("yes" if stated else "no"), (question, cells)
            checked[task] += 1
        if task not in templates:
            continue
        digits = [i.label for i in scene.items if i.kind == "digit"] + ["", ""]
        slots = {"a": digits[0], "b": digits[1], "letter": scene.items[0].label,
                 "prop": next((p for p in VISIBLE + INVISIBLE if f" {p} of" in question), "")}
        if task == "shape_corners":
            [slots["shape"]] = [i.label for i in scene.items if i.colour == _one(COLOUR, question)]
        if task == "colour_warmth":
            [colour] = [i.colour for i in scene.items if i.label == _one(SHAPE, question)]
            slots["Colour"] = colour.capitalize()
        values = {"yes": "can", "no": "cannot"} if task == "visible_property" else {}

        sentences = {value: templates[task].format(value=values.get(value, value), **slots)
                     for value in answer_set(TASKS_BY_NAME[task], scene.grid)}
        assert sentences[answer] in known, (task, question, sentences[answer])
        assert len(sentences) > 1 and known & set(sentences.values()) == {sentences[answer]}, (task, question)
        checked[task] += 1
    assert set(checked) == {*templates, "spatial_relation"}


_IN, _OF = r"(?: in the (?:image|picture))?", r"(?: of the (?:image|picture))?"


def _check_truth(scene: Scene, question: str) -> tuple[str, bool]:
    """What a check states and whether the scene shows it, read back from its words (an oracle written apart
    from `check_questions`)."""
    q = untailed(question)
    one = {(i.colour, i.label): i for i in scene.shapes()}
    number = {word: n for n, word in enumerate(NUMBER_WORDS)}
    rules = [
        ("existence", rf"is there a (\w+) (\w+){_IN} \?", lambda c, s: (c, s) in one),
        ("size", rf"is the (\w+) (\w+){_IN} (small|large) \?", lambda c, s, z: one[c, s].size == z),
        ("size", rf"is there a (small|large) (\w+) (\w+){_IN} \?",
         lambda z, c, s: any((i.size, i.colour, i.label) == (z, c, s) for i in scene.shapes())),
        ("position", rf"is the (\w+) (\w+) at the ([\w-]+){_OF} \?", lambda c, s, p: scene.position(one[c, s]) == p),
        ("position", rf"is there a (\w+) (\w+) at the ([\w-]+){_OF} \?",
         lambda c, s, p: any((i.colour, i.label, scene.position(i)) == (c, s, p) for i in scene.shapes())),
        ("colour", rf"is the ({'|'.join(SHAPES)}){_IN} (\w+) \?",
         lambda s, c: [i.colour for i in scene.shapes() if i.label == s] == [c]),
        ("shape", rf"is the (\w+) object{_IN} a (\w+) \?",
         lambda c, s: [i.label for i in scene.shapes() if i.colour == c] == [s]),
        ("count", rf"is the number of objects{_IN} (\w+) \?", lambda n: len(scene.items) == number[n]),
        ("count", rf"is there one object{_IN} \?", lambda: len(scene.items) == 1),
        ("count", rf"are there (\w+) objects{_IN} \?", lambda n: len(scene.items) == number[n]),
        ("style", rf"is the style{_OF} (\w+) \?", lambda s: scene.style == s),
        ("style", r"is the image (\w+) \?", lambda s: scene.style == s),
        ("word", rf"is the word{_IN} (\w+) \?", lambda w: scene.word() == w),
    ]
    for what, pattern, holds in rules:
        if match := re.fullmatch(pattern, q):
            return what, holds(*match.groups())
    raise AssertionError(f"no check reads {question!r}")


def test_checks_state_a_value_true_half_the_time_in_both_forms_and_never_in_mme_words():
    from cmlora.synth.questions import check_questions, tailed_check
    from cmlora.synth.suite import pretrain_scene

    sampler = Sampler(random.Random(3), grid=2)
    seen, forms, places = Counter(), Counter(), Counter()
    for _ in range(600):
        scene = pretrain_scene(sampler)
        for what, question, answer in check_questions(scene, sampler.rng):
            assert _check_truth(scene, question) == (what, answer == "yes"), question
            seen[what, answer] += 1
            forms[what, question.startswith(("is there", "are there", "is the image"))] += 1
            places[" the image" in question or " the picture" in question] += 1
            tailed = tailed_check(question, sampler.rng)
            assert untailed(tailed) == question
            assert not re.search(r"this|drawn|please|\"", tailed.lower()), tailed  # MME's own words stay unseen
    for what in ("existence", "size", "position", "colour", "shape", "count", "style", "word"):
        assert seen[what, "yes"] > 10 and 0.3 < seen[what, "yes"] / (seen[what, "yes"] + seen[what, "no"]) < 0.7, what
    for what in ("size", "position", "count", "style"):  # the existence form and the statement form
        assert forms[what, True] > 10 and forms[what, False] > 10, what
    assert 0.2 < places[True] / places.total() < 0.6


def test_checks_file_asks_about_the_pretraining_images_and_leaves_pretrain_json_as_it_was(suite, manifest, tmp_path):
    assert not (suite / "pretrain_checks.json").exists() and "check" not in manifest["pretrain"]["skills"]
    plain_records = json.loads((suite / "pretrain.json").read_text())
    plain_held_out = json.loads((suite / "pretrain_eval.json").read_text())
    manifest = write_suite(tmp_path / "checked", 0, **SIZES, checks=True)
    assert manifest["options"] == {"checks": True} and manifest["command"].endswith("--checks")
    suite = tmp_path / "checked"
    assert json.loads((suite / "pretrain.json").read_text()) == plain_records  # the checks' own stream
    records = {r["image"]: r for r in plain_records}
    checks = json.loads((suite / "pretrain_checks.json").read_text())
    lines = (suite / "scenes.jsonl").read_text().splitlines()
    scenes = {entry["image"]: Scene.from_dict(entry["scene"]) for entry in map(json.loads, lines)}
    assert len(checks) == manifest["pretrain"]["check_records"] and len(checks) <= 2 * len(records)
    per_image = Counter(r["image"] for r in checks)
    assert set(per_image) == set(records) and set(per_image.values()) <= {1, 2}
    for record in checks:
        question, answer = (turn["value"] for turn in record["conversations"])
        what, holds = _check_truth(scenes[f"images/{record['image']}"], question.removeprefix("<image>\n"))
        assert record["task_name"] == f"check {what}" and answer == ("yes" if holds else "no")
    held_out = json.loads((suite / "pretrain_eval.json").read_text())
    assert [r for r in held_out if r["task_name"] != "check"] == plain_held_out  # the other skills as they were
    held_out = [r for r in held_out if r["task_name"] == "check"]
    assert len(held_out) == 3 and "check" in manifest["pretrain"]["skills"]
    assert manifest["pretrain"]["eval_chance"]["check"] == 0.5
    for record in held_out:
        question, answer = (turn["value"].removeprefix("<image>\n") for turn in record["conversations"])
        assert question == untailed(question) and record["image"] not in records
        assert answer == ("yes" if _check_truth(scenes[f"images/{record['image']}"], question)[1] else "no")
