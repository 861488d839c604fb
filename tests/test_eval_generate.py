"""Batched generation, resumable predictions files, the evaluate() runner and the eval/compare commands."""

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

import cmlora
from cmlora import vlm
from cmlora.cli import main
from cmlora.evaluation import GenerationSettings, PredictionsMismatchError, evaluate, predict, read_task_file
from cmlora.evaluation import generate as generate_module
from cmlora.evaluation.tasks import spec_for

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30), (200, 200, 200)]


def draw(path: Path, index: int) -> str:
    Image.new("RGB", (32 + index % 3 * 8, 32), COLOURS[index % len(COLOURS)]).save(path)
    return path.name


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny LLaVA with a MixLoRA adapter, 10 VQA-style examples of varied prompt lengths and a 2-subtask MME."""
    root = tmp_path_factory.mktemp("eval")
    model_dir = vlm.tiny(root / "tiny")
    tasks = root / "tasks"
    tasks.mkdir()
    lines = []
    for i in range(10):
        image = draw(tasks / f"img{i}.png", i)
        prompt = "What colour is it?" + " Look closely." * (i % 4)
        lines.append(json.dumps({"unique_id": f"q{i}", "image_path": image, "prompt": prompt, "target": "red"}))
    (tasks / "colour_vqa.jsonl").write_text("\n".join(lines) + "\n")
    mme = root / "mme"
    for subtask in ("existence", "color"):
        folder = mme / subtask
        folder.mkdir(parents=True)
        for i in range(2):
            draw(folder / f"{subtask}{i}.png", i)
            (folder / f"{subtask}{i}.txt").write_text("Is it red?\tYes\nIs it blue?\tNo\n")
    model, processor = vlm.load(model_dir)
    import peft
    model = peft.get_peft_model(model, cmlora.MixLoraConfig(num_factors=8, r=2, init_weights=False,
                                                            **vlm.mixlora_targets(model))).eval()
    return root, model, processor, read_task_file(tasks / "colour_vqa.jsonl")


def answers(bench, out, batch_size, **settings):
    root, model, processor, examples = bench
    rows = predict(model, processor, examples, spec_for("colour_vqa"), out,
                   GenerationSettings(batch_size=batch_size, **settings), "tiny#0")
    return [row["prediction"] for row in rows]


def test_answers_do_not_depend_on_the_batch_size(bench, tmp_path):
    one = answers(bench, tmp_path / "b1.jsonl", 1)
    eight = answers(bench, tmp_path / "b8.jsonl", 8)
    assert one == eight
    assert len(set(one)) > 1  # the adapter's answers differ between examples: the comparison is not vacuous


def family_model(family, tmp_path):
    """A tiny model of `family` with a MixLoRA adapter (random B, so answers vary), and its processor."""
    build = {"llava_next": vlm.tiny_llava_next, "qwen2_vl": vlm.tiny_qwen2_vl, "qwen2_5_vl": vlm.tiny_qwen2_5_vl,
             "idefics3": vlm.tiny_idefics3, "smolvlm": vlm.tiny_smolvlm}[family]
    model, processor = vlm.load(build(tmp_path / "tiny"))
    import peft
    model = peft.get_peft_model(model, cmlora.MixLoraConfig(num_factors=8, r=2, init_weights=False,
                                                            **vlm.mixlora_targets(model))).eval()
    return model, processor


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"])
@pytest.mark.parametrize("template", ["chat", "vicuna_v1"])
def test_every_familys_answers_do_not_depend_on_the_batch_size(bench, tmp_path, family, template):
    """Left-padded batches of images of varied sizes (LLaVA-NeXT, Qwen: varied image token counts) answer as one at a
    time."""
    model, processor = family_model(family, tmp_path)
    examples = bench[3]
    runs = [predict(model, processor, examples, spec_for("colour_vqa"), tmp_path / f"b{size}.jsonl",
                    GenerationSettings(batch_size=size, template=template), f"{family}#0") for size in (1, 8)]
    one, eight = ([row["prediction"] for row in rows] for rows in runs)
    assert one == eight
    assert len(set(one)) > 1


def with_text_only(examples):
    """The bench's examples with a text-only one (no image) after every third, so that batches mix both."""
    mixed = []
    for i, example in enumerate(examples):
        mixed.append(example)
        if i % 3 == 2:
            mixed.append(dataclasses.replace(example, uid=f"t{i}", image=None, prompt="Name a colour." + " Now." * i))
    return mixed


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"])
@pytest.mark.parametrize("template", ["chat", "vicuna_v1"])
def test_text_only_examples_are_answered_in_mixed_batches_as_alone(bench, tmp_path, family, template):
    """A text-only example (a held-out record of text-only instruction data) is prompted without an image marker and
    generated apart from the image examples of its batch, so each family answers both kinds as one at a time."""
    model, processor = bench[1:3] if family == "llava" else family_model(family, tmp_path)
    examples = with_text_only(bench[3])
    settings = [GenerationSettings(batch_size=size, template=template) for size in (1, 8)]
    runs = [predict(model, processor, examples, spec_for("colour_vqa"), tmp_path / f"b{s.batch_size}.jsonl", s,
                    f"{family}#0") for s in settings]
    one, eight = ([row["prediction"] for row in rows] for rows in runs)
    assert one == eight
    assert [row["uid"] for row in runs[1]] == [example.uid for example in examples]
    prompt = generate_module.prompt_text(examples[3], spec_for("colour_vqa"), processor, template)
    assert examples[3].image is None and "Name a colour." in prompt
    image_token = getattr(processor, "image_token", "<image>")
    assert image_token not in prompt and "<image>" not in prompt


def test_a_rerun_continues_where_a_killed_run_stopped(bench, tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"
    full = answers(bench, path, 4)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])  # header + 3 answers + a line cut short
    generated = []
    original = generate_module.generate_answers

    def counting(model, processor, batch, spec, settings):
        generated.extend(example.uid for example in batch)
        return original(model, processor, batch, spec, settings)

    monkeypatch.setattr(generate_module, "generate_answers", counting)
    again = answers(bench, path, 4)
    assert again == full
    assert generated == [f"q{i}" for i in range(3, 10)]
    assert len(path.read_text().splitlines()) == 11


def test_predictions_for_another_model_or_input_set_are_refused(bench, tmp_path):
    root, model, processor, examples = bench
    path = tmp_path / "p.jsonl"
    answers(bench, path, 8)
    with pytest.raises(PredictionsMismatchError, match=r"p\.jsonl was written for another model"):
        predict(model, processor, examples, spec_for("x"), path, GenerationSettings(), "other#1")
    with pytest.raises(PredictionsMismatchError, match="inputs"):
        predict(model, processor, examples[:5], spec_for("x"), path, GenerationSettings(), "tiny#0")
    with pytest.raises(PredictionsMismatchError, match="generation"):
        answers(bench, path, 8, do_sample=True, seed=1)


def test_sampling_is_seeded(bench, tmp_path):
    first = answers(bench, tmp_path / "s1.jsonl", 8, do_sample=True, temperature=1.0, seed=7)
    second = answers(bench, tmp_path / "s2.jsonl", 8, do_sample=True, temperature=1.0, seed=7)
    greedy = answers(bench, tmp_path / "g.jsonl", 8)
    assert first == second and first != greedy


def test_evaluate_writes_scores_table_and_official_mme_files(bench, tmp_path):
    root, model, processor, _ = bench
    scores = evaluate(model, processor, tmp_path / "eval", mme_dir=root / "mme", tasks_dir=root / "tasks",
                      settings=GenerationSettings(batch_size=4), model_id="tiny#0")
    assert set(scores["mme"]["subtasks"]) == {"existence", "color"}
    assert scores["tasks"]["colour_vqa"]["count"] == 10
    assert (tmp_path / "eval" / "mme_results" / "color.txt").read_text().count("\n") == 4
    saved = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert saved["summary"]["mme_total"] == scores["mme"]["total"]
    assert "| mme_total |" in (tmp_path / "eval" / "table.md").read_text()


def test_eval_and_compare_commands(bench, tmp_path, capsys):
    root, model, processor, _ = bench
    model.save_pretrained(tmp_path / "adapter")
    for name in ("a", "b"):
        main(["eval", "--base", str(root / "tiny"), "--adapter", str(tmp_path / "adapter"), "--tasks",
              str(root / "tasks"), "--out", str(tmp_path / name / "eval"), "--batch-size", "5"])
    out = capsys.readouterr().out
    assert "colour_vqa" in out and "scores written to" in out
    main(["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    table = capsys.readouterr().out
    assert table.splitlines()[0] == "| metric | a | b |" and "| colour_vqa |" in table


def test_eval_of_a_training_run(tmp_path, capsys):
    from cmlora.train import TrainConfig, train

    from .synthetic_data import write_records

    model_dir = vlm.tiny(tmp_path / "tiny")
    data = write_records(tmp_path / "data", count=8)
    run = train(TrainConfig(model=str(model_dir), data=str(data), image_folder=str(data.parent / "images"),
                            output_dir=str(tmp_path / "run"), max_length=128, num_factors=8, r=2, batch_size=4,
                            max_steps=2, save_steps=100, use_cpu=True))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    draw(tasks / "a.png", 0)
    (tasks / "vsr.jsonl").write_text(json.dumps({"unique_id": 1, "image_path": "a.png", "prompt": "The cat is left "
                                                 "of the dog. True or false?", "target": "true"}) + "\n")
    main(["eval", "--run", str(run), "--tasks", str(tasks)])
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert scores["tasks"]["vsr"]["count"] == 1 and str(run.resolve()) in scores["model"]
    assert "| vsr |" in capsys.readouterr().out
