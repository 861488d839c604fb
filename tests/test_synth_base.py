"""The tiny base's pretraining pipeline on a miniature suite: stage 0 (vision tower), stage 1, per-skill
evaluation, the content cache."""

import json
import random
import re
from collections import Counter

import pytest
import torch

from cmlora import vlm
from cmlora.data import TEMPLATES, Turn
from cmlora.synth import base as base_module
from cmlora.synth import knowledge, write_suite
from cmlora.synth.base import (
    PretrainConfig,
    balanced_by_kind,
    length_grouped_batches,
    pretrain_base,
    train_language_model,
)
from cmlora.synth.questions import question_kind
from cmlora.synth.scenes import COLOURS, SHAPES, SIZES, STYLES
from cmlora.synth.vision import (
    CONTENTS,
    IGNORE,
    VisionPretrainConfig,
    cell_features,
    cell_labels,
    load_part,
    pretrain_vision,
    word_vectors,
)

SMALL = vlm.TinySpec(vision_hidden=32, text_hidden=64, vocab_size=400, vision_feature_layer=-1)
MINI = {"train_per_task": 2, "eval_per_task": 2, "mme_images_per_subtask": 1, "pretrain_images": 48,
        "pretrain_eval_per_skill": 2}


@pytest.fixture
def suite(tmp_path, monkeypatch):
    monkeypatch.setenv("CMLORA_CACHE", str(tmp_path / "cache"))
    write_suite(tmp_path / "suite", 0, **MINI, checks=True)  # with the checks, so that every phase runs
    return tmp_path / "suite"


def test_cell_labels_follow_the_scene():
    scene = {"grid": 2, "style": "outline", "items": [
        {"kind": "shape", "label": "triangle", "colour": "blue", "row": 1, "col": 0, "size": "small"},
        {"kind": "digit", "label": "7", "colour": "red", "row": 0, "col": 1, "size": "large"},
        {"kind": "letter", "label": "Q", "colour": "white", "row": 1, "col": 1, "size": "large"}]}
    labels = cell_labels([scene])
    assert [CONTENTS[i] for i in labels["content"][0]] == ["empty", "digit 7", "triangle", "letter Q"]
    assert labels["colour"][0].tolist() == [IGNORE, COLOURS.index("red"), COLOURS.index("blue"),
                                           COLOURS.index("white")]
    assert labels["size"][0].tolist() == [IGNORE, IGNORE, SIZES.index("small"), IGNORE]
    assert labels["style"].tolist() == [STYLES.index("outline")]
    assert labels["cell"].tolist() == [[0, 1, 2, 3]]


def test_stage0_teaches_the_vision_tower_what_is_in_each_cell(tmp_path):
    """A few seconds of per-cell supervision: colour and shape well above chance on held-out images."""
    suite = tmp_path / "suite"
    write_suite(suite, 0, **{**MINI, "pretrain_images": 600, "pretrain_eval_per_skill": 20})
    torch.manual_seed(0)
    vlm.tiny(tmp_path / "model", SMALL, corpus=["a red circle"])
    model, processor = vlm.load(tmp_path / "model")
    before = model.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"].clone()
    config = VisionPretrainConfig(steps=150, batch_size=64, align_steps=150)
    report = pretrain_vision(model, processor, suite, config, lambda step, total: 1.0)
    accuracy = report["held_out_accuracy"]
    assert accuracy["colour"] > 0.9 and accuracy["empty"] > 0.9, accuracy
    assert accuracy["cell"] > 0.6, accuracy  # chance 1/4
    assert accuracy["shape"] > 2 / len(SHAPES), accuracy  # chance is 1/4 among the shapes alone
    after = model.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"]
    assert not torch.equal(before, after)
    # Stage 0b: a held-out image token points at its cell's colour word and shape word.
    pixels, labels = load_part(suite, "pretrain_eval", processor.image_processor)
    with torch.no_grad():
        tokens = model.model.multi_modal_projector(cell_features(model, pixels))
    colour = (tokens @ word_vectors(model, processor.tokenizer, list(COLOURS)).T).argmax(-1)
    has_item = labels["colour"] != IGNORE
    assert (colour == labels["colour"])[has_item].float().mean() > 0.9
    shape = (tokens @ word_vectors(model, processor.tokenizer, list(SHAPES)).T).argmax(-1) + 1
    is_shape = (labels["content"] >= 1) & (labels["content"] <= len(SHAPES))
    assert (shape == labels["content"])[is_shape].float().mean() > 0.5  # chance 1/4


def test_stage0_refuses_cells_that_are_not_patches(suite, tmp_path):
    vlm.tiny(tmp_path / "model", vlm.TinySpec(**{**vars(SMALL), "patch_size": 8}), corpus=["a red circle"])
    model, processor = vlm.load(tmp_path / "model")
    with pytest.raises(ValueError, match="16 patch tokens but the suite's grid has 4 cells"):
        pretrain_vision(model, processor, suite, VisionPretrainConfig(steps=1), lambda s, t: 1.0)


def test_length_grouped_batches_cover_every_record_once_with_little_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(5, 100, (1000,), generator=generator)]
    batches = length_grouped_batches(lengths, 32, generator, pool_batches=8)
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    assert padded < 1.15 * sum(lengths)  # random batches of 32 would pad to ~1.8x


def test_balanced_by_kind_gives_every_kind_as_many_items_as_the_commonest():
    kinds = ["a", "b", "a", "c", "a", "b", "a", "a", "b"]  # a: 5, b: 3, c: 1
    chosen = balanced_by_kind(kinds, random.Random(0))
    assert Counter(kinds[i] for i in chosen) == {"a": 5, "b": 5, "c": 5}
    assert sorted(i for i in chosen if kinds[i] == "a") == [0, 2, 4, 6, 7]  # the commonest kind, each once
    b = Counter(i for i in chosen if kinds[i] == "b")
    assert set(b) == {1, 5, 8} and sorted(b.values()) == [1, 2, 2]  # all once, then 2 of 3 drawn without replacement
    assert chosen == balanced_by_kind(kinds, random.Random(0)) and balanced_by_kind([], random.Random(0)) == []


def test_an_unknown_focus_kind_fails_before_any_training(suite, tmp_path, monkeypatch):
    monkeypatch.setattr(base_module, "pretrain_vision", lambda *args: pytest.fail("stage 0 ran"))
    with pytest.raises(ValueError, match=r"focus_kind 'colour by shape' is no question kind of .*pretrain.json"):
        pretrain_base(suite, tmp_path / "base", PretrainConfig(focus_kind="colour by shape", spec=SMALL))
    with pytest.raises(ValueError, match=r"locate_kind 'place' starts no question kind of .*pretrain.json"):
        pretrain_base(suite, tmp_path / "base", PretrainConfig(locate_kind="place", spec=SMALL))


def test_plain_template_has_no_system_prompt_and_no_roles():
    turns = [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red"), Turn("user", "Shape?"),
             Turn("assistant", "a square")]
    plain = TEMPLATES["plain"](turns)
    assert plain.text == "<image>\nWhat colour? red</s>Shape? a square</s>"
    assert [plain.text[a:b] for a, b in plain.answer_spans] == ["red</s>", "a square</s>"]


def test_pretraining_learns_evaluates_per_skill_and_caches(suite, tmp_path, monkeypatch):
    config = PretrainConfig(steps=30, focus_steps=10, question_steps=10, locate_steps=10, settle_steps=10,
                            check_steps=10, check_items=20, batch_size=8, spec=SMALL, knowledge_repeats=1,
                            eval_batch_size=16, vision=VisionPretrainConfig(steps=5, batch_size=8, align_steps=5))
    after_stage0 = {}

    def stage0(model, *args):
        report = pretrain_vision(model, *args)
        after_stage0.update({k: v.clone() for k, v in model.state_dict().items()})
        return report

    trained = {}  # phase -> the modules whose parameters it trains

    def phase(model, processor, items, steps, learning_rate, final_lr_ratio, config, name, *args):
        trained[name] = {n.removeprefix("model.").split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        return train_language_model(model, processor, items, steps, learning_rate, final_lr_ratio, config, name,
                                    *args)

    monkeypatch.setattr(base_module, "pretrain_vision", stage0)
    monkeypatch.setattr(base_module, "train_language_model", phase)
    out = pretrain_base(suite, tmp_path / "base", config)
    monkeypatch.setattr(base_module, "pretrain_vision", pretrain_vision)
    monkeypatch.setattr(base_module, "train_language_model", train_language_model)
    # The tower stays frozen; the projector trains in the locate phase only.
    language = {"language_model", "lm_head"}
    assert trained == {"conversations": language, "focus": language, "questions": language,
                       "locate": language | {"multi_modal_projector"}, "settle": language, "checks": language}
    report = json.loads((out / "base_eval.json").read_text())
    assert set(report["skills"]) == {"colour", "shape", "count", "position", "existence", "size", "style", "digit",
                                     "letter", "word", "check"}
    training = report["training"]
    assert list(training) == ["vision", "conversations", "focus", "questions", "locate", "settle", "checks"]
    assert [training[name]["steps"] for name in list(training)[1:]] == [30, 10, 10, 10, 10, 10]
    assert training["questions"]["mean_loss_last_100"] < 5.5  # uniform guessing: ln 400 = 5.99
    # The focus phase asks the colour-of-a-shape questions alone; the last phase asks every question of the
    # conversations on its own (the descriptions excepted), each kind as often as the commonest.
    turns = [t["value"] for r in json.loads((suite / "pretrain.json").read_text()) for t in r["conversations"][::2]]
    kinds = Counter(question_kind(t) for t in turns if not t.endswith("describe the image ."))
    # The text mixed into every phase: the language corpus, and the facts of the world `knowledge_repeats` times.
    text = len(base_module.language_corpus(suite)) + config.knowledge_repeats * len(knowledge.facts())
    assert training["focus"]["items"] == kinds["colour"] + text
    located = [count for kind, count in kinds.items() if kind.startswith("position")]
    assert len(located) == 3 and training["locate"]["items"] == 3 * max(located) + text
    assert training["questions"]["items"] == training["settle"]["items"] == len(kinds) * max(kinds.values()) + text
    assert training["conversations"]["items"] == len(json.loads((suite / "pretrain.json").read_text())) + text
    assert training["checks"]["items"] == 2 * config.check_items + text  # as many single questions as checks
    assert training["vision"]["steps"] == 5 and "colour" in training["vision"]["held_out_accuracy"]
    model, processor = vlm.load(out)
    assert model.config.vision_feature_layer == -1
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_stage0[name]) == ("vision_tower" in name), name
    calls = []
    monkeypatch.setattr(base_module, "train_base", lambda *args, **kwargs: calls.append(1))
    again = pretrain_base(suite, tmp_path / "base2", config)  # same content: served from the cache
    assert not calls and (again / "base_eval.json").read_text() == (out / "base_eval.json").read_text()
    key = base_module.content_hash(suite, config)
    (suite / "pretrain.json").write_text((suite / "pretrain.json").read_text().replace("red", "crimson"))
    changed = base_module.content_hash(suite, config)
    assert changed != key  # changed content: a new key, trained anew
    (suite / "scenes.jsonl").write_text((suite / "scenes.jsonl").read_text().replace("red", "blue"))
    assert base_module.content_hash(suite, config) != changed  # stage 0's labels are part of the content


def test_pretrain_base_command(suite, tmp_path, capsys):
    from cmlora.cli import main

    main(["pretrain-base", "--suite", str(suite), "--out", str(tmp_path / "base"), "--steps", "3",
          "--focus-steps", "4", "--question-steps", "2", "--locate-steps", "5", "--settle-steps", "6",
          "--check-steps", "7", "--vision-steps", "2", "--knowledge-repeats", "3", "--no-fold-case"])
    out = capsys.readouterr().out
    assert re.search(r"held-out accuracy: check \d\.\d{3}, colour \d\.\d{3}", out)
    report = json.loads((tmp_path / "base" / "base_eval.json").read_text())
    assert report["config"]["knowledge_repeats"] == 3 and report["config"]["spec"]["fold_case"] is False
    tokenizer = vlm.load(tmp_path / "base")[1].tokenizer  # cased: capitals are tokens of their own
    assert tokenizer("Is it red?").input_ids != tokenizer("is it red ?").input_ids
    training = report["training"]
    phases = ("vision", "conversations", "focus", "questions", "locate", "settle", "checks")
    assert [training[name]["steps"] for name in phases] == [2, 3, 4, 2, 5, 6, 7]


def test_language_corpus_has_instructions_answers_and_eval_prompts_but_no_pairs_or_targets(suite):
    from cmlora.evaluation.inputs import read_mme, read_task_dir
    from cmlora.evaluation.tasks import SHORT_ANSWER
    from cmlora.synth.base import language_corpus

    corpus = set(language_corpus(suite))
    train = json.loads((suite / "train.json").read_text())
    questions = {r["conversations"][0]["value"].removeprefix("<image>\n") for r in train}
    answers = {r["conversations"][1]["value"] for r in train}
    assert questions | answers <= corpus
    assert not any(f"{r['conversations'][0]['value'].removeprefix('<image>' + chr(10))} "
                   f"{r['conversations'][1]['value']}" in corpus for r in train)
    mme = read_mme(suite / "mme")
    assert {f"{e.prompt} {SHORT_ANSWER}" for e in mme} <= corpus
    tasks = [e for examples in read_task_dir(suite / "eval").values() for e in examples]
    assert {e.prompt for e in tasks} <= corpus
    targets = {t for e in tasks for t in ([e.target] if isinstance(e.target, str) else e.target)}
    assert corpus & targets <= answers  # an evaluation target is in the corpus only as a training answer


def test_text_items_learn_every_token(tmp_path):
    from cmlora.synth.base import text_items

    vlm.tiny(tmp_path / "m", SMALL, corpus=["is there a red circle ?"] * 20)
    _, processor = vlm.load(tmp_path / "m")
    [item] = text_items(["is there a red circle ?"], processor.tokenizer, 64)
    assert torch.equal(item["input_ids"], item["labels"]) and item["pixel_values"] is None
    assert item["input_ids"][-1] == processor.tokenizer.eos_token_id
    assert processor.tokenizer.decode(item["input_ids"][:-1]) == "is there a red circle ?"


def test_one_question_each_asks_every_question_right_after_the_image(tmp_path):
    from cmlora.data import Record
    from cmlora.data.records import one_question_each

    image = tmp_path / "x.png"
    record = Record("p1", [Turn("user", "<image>\nwhat colour is the square ?"), Turn("assistant", "red"),
                           Turn("user", "how many objects are there ?"), Turn("assistant", "2"),
                           Turn("user", "describe the image ."), Turn("assistant", "large red square top-left .")],
                    image, "pretrain", "pretrain.json[#0]")
    text = Record("t1", [Turn("user", "say hi"), Turn("assistant", "hi")], None, None, "pretrain.json[#1]")
    singles = one_question_each([record, text])
    assert [s.id for s in singles] == ["p1#0", "p1#1", "p1#2", "t1#0"]
    assert [[(t.role, t.text) for t in s.conversations] for s in singles] == [
        [("user", "<image>\nwhat colour is the square ?"), ("assistant", "red")],
        [("user", "<image>\nhow many objects are there ?"), ("assistant", "2")],
        [("user", "<image>\ndescribe the image ."), ("assistant", "large red square top-left .")],
        [("user", "say hi"), ("assistant", "hi")]]
    assert all(s.image == image and s.task_name == "pretrain" for s in singles[:3]) and singles[3].image is None
