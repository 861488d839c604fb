"""Held-out accuracy of the training tasks (exact match per task) and the blank-image text-only baseline."""

import json

import pytest
from PIL import Image

from cmlora import vlm
from cmlora.data import DataError
from cmlora.evaluation import GenerationSettings, PredictionsMismatchError, evaluate, predict
from cmlora.evaluation import generate as generate_module
from cmlora.evaluation.heldout import evaluate_heldout, records_as_examples
from cmlora.evaluation.tasks import spec_for


def record(rid, task, question, answer, image="a.png"):
    return {"id": rid, "image": image, "task_name": task,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def model_and_processor(tmp_path_factory):
    return vlm.load(vlm.tiny(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def heldout_file(tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    rows = [record("c1", "colour", "what colour ?", "red"), record("c2", "colour", "what colour ?", "Blue"),
            record("n1", "count", "how many ?", "two"), record("n2", "count", "how many ?", "3")]
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps(rows))
    return path


def test_heldout_accuracy_is_exact_match_per_task(model_and_processor, heldout_file, tmp_path, monkeypatch):
    model, processor = model_and_processor
    given = {"what colour ?": ["RED ", "blue"], "how many ?": ["2", "3"]}  # "2" is not "two": conventions count
    calls = {}

    def fake(model, processor, examples, spec, settings):
        assert spec.max_new_tokens >= 3
        answers = []
        for example in examples:
            index = calls.get(example.prompt, 0)
            calls[example.prompt] = index + 1
            answers.append(given[example.prompt][index])
        return answers

    monkeypatch.setattr(generate_module, "generate_answers", fake)
    scores = evaluate_heldout(model, processor, heldout_file, tmp_path / "p.jsonl", GenerationSettings(), "m#0")
    assert scores == {"colour": {"accuracy": 1.0, "count": 2}, "count": {"accuracy": 0.5, "count": 2}}
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[1])["target"] == "red"


def test_heldout_records_must_be_single_questions(heldout_file):
    rows = json.loads(heldout_file.read_text())
    rows[1]["conversations"] += [{"from": "human", "value": "and ?"}, {"from": "gpt", "value": "x"}]
    heldout_file.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"heldout.json\[#1\].*'c2'.*conversations.*exactly one question"):
        records_as_examples(heldout_file)


def test_a_text_only_record_is_asked_as_text(model_and_processor, heldout_file, tmp_path):
    rows = json.loads(heldout_file.read_text())
    del rows[1]["image"]
    rows[1]["conversations"][0]["value"] = rows[1]["conversations"][0]["value"].replace("<image>", "").strip()
    heldout_file.write_text(json.dumps(rows))
    examples = records_as_examples(heldout_file)
    assert examples[1].image is None and examples[1].prompt == "what colour ?" and examples[0].image is not None
    model, processor = model_and_processor
    scores = evaluate_heldout(model, processor, heldout_file, tmp_path / "p.jsonl", GenerationSettings(batch_size=4,
                              template="plain"), "m#0")
    assert scores["colour"]["count"] == 2 and scores["count"]["count"] == 2
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()[1:]]
    assert [line["uid"] for line in lines] == ["c1", "c2", "n1", "n2"]


def test_evaluate_writes_heldout_scores(model_and_processor, heldout_file, tmp_path):
    model, processor = model_and_processor
    scores = evaluate(model, processor, tmp_path / "eval", heldout=heldout_file,
                      settings=GenerationSettings(template="plain"), model_id="m#0")
    assert set(scores["heldout"]) == {"colour", "count"}
    assert json.loads((tmp_path / "eval" / "scores.json").read_text())["heldout"] == scores["heldout"]


def test_blank_images_are_black_and_part_of_the_predictions_header(model_and_processor, heldout_file, tmp_path):
    model, processor = model_and_processor
    seen = []

    class Spy:
        tokenizer = processor.tokenizer

        def __call__(self, images, **kwargs):
            assert all(len(prompt_images) == 1 for prompt_images in images)  # one list per prompt
            seen.extend(image for prompt_images in images for image in prompt_images)
            return processor(images=images, **kwargs)

        def __getattr__(self, name):
            return getattr(processor, name)

    examples = records_as_examples(heldout_file)
    spec, out = spec_for("colour"), tmp_path / "p.jsonl"
    predict(model, Spy(), examples, spec, out, GenerationSettings(blank_images=True, template="plain"), "m#0")
    assert len(seen) == 4 and all(image.getextrema() == ((0, 0), (0, 0), (0, 0)) for image in seen)
    assert seen[0].size == (32, 32)
    assert json.loads(out.read_text().splitlines()[0])["_meta"]["generation"]["blank_images"] is True
    with pytest.raises(PredictionsMismatchError, match="blank_images"):
        predict(model, processor, examples, spec, out, GenerationSettings(template="plain"), "m#0")


def test_a_heldout_record_is_asked_with_its_image_where_the_record_puts_it(model_and_processor, tmp_path):
    from cmlora.data import InstructionDataset, load_records
    from cmlora.evaluation.generate import prompt_text

    _, processor = model_and_processor
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    first = record("f", "colour", "what colour ?", "red")
    last = {**record("l", "colour", "what colour ?", "red"),
            "conversations": [{"from": "human", "value": "what colour ?\n<image>"}, {"from": "gpt", "value": "red"}]}
    bare = {**record("b", "colour", "what colour ?", "red"),
            "conversations": [{"from": "human", "value": "what colour ?"}, {"from": "gpt", "value": "red"}]}
    path = tmp_path / "placed.json"
    path.write_text(json.dumps([first, last, bare]))
    examples = records_as_examples(path)
    assert [e.prompt for e in examples] == ["what colour ?", "what colour ?\n<image>", "what colour ?"]
    # each prompt is the training prompt of its record, up to the answer
    records, _ = load_records(path)
    dataset = InstructionDataset(records, processor, template="plain", max_length=128)
    image = Image.open(tmp_path / "a.png")

    def prompt_ids(example):
        text = prompt_text(example, spec_for("colour"), processor, "plain")
        return processor(images=[image], text=[text], return_tensors="pt")["input_ids"][0].tolist()

    for index, example in enumerate(examples):
        item = dataset[index]
        answer_start = int((item["labels"] != -100).nonzero()[0])
        assert item["input_ids"][:answer_start].tolist() == prompt_ids(example), example.uid
    first_ids, last_ids = prompt_ids(examples[0]), prompt_ids(examples[1])
    assert first_ids != last_ids and sorted(first_ids) == sorted(last_ids)  # the same tokens, the image moved
