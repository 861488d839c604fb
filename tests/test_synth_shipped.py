"""The shipped base: written by `ship`, found only for its content key, checked by hash, installed by
`pretrain_base` instead of training."""

import json

import pytest

from cmlora import vlm
from cmlora.synth import base as base_module
from cmlora.synth import shipped, write_suite
from cmlora.synth.base import PretrainConfig, content_hash, pretrain_base

MINI = {"train_per_task": 2, "eval_per_task": 2, "mme_images_per_subtask": 1, "pretrain_images": 12,
        "pretrain_eval_per_skill": 1}


def fake_base(folder, key):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    (folder / "base_eval.json").write_text(json.dumps({"key": key, "skills": {"colour": {"accuracy": 0.9}}}))
    (folder / "base_eval_predictions.jsonl").write_text("{}\n")
    return folder


def test_ship_records_key_commands_and_hashes_and_find_checks_them(tmp_path):
    root = tmp_path / "shipped_base"
    manifest = shipped.ship(fake_base(tmp_path / "base", "k1"), ["cmlora synth --out suite --seed 0"], root)
    assert manifest["key"] == "k1" and manifest["skills"] == {"colour": 0.9}
    assert set(manifest["sha256"]) == {"model.safetensors", "config.json", "base_eval.json"}  # no predictions
    assert sorted(p.name for p in root.iterdir()) == ["SHIPPED.json", "base_eval.json", "config.json",
                                                      "model.safetensors"]
    assert shipped.find_shipped("k1", root) == root and shipped.find_shipped("k2", root) is None
    assert shipped.find_shipped("k1", tmp_path / "nothing") is None
    (root / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(ValueError, match=r"model.safetensors: sha256 \w+, but .*SHIPPED.json records"):
        shipped.find_shipped("k1", root)
    (root / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="sha256 missing"):
        shipped.find_shipped("k1", root)


@pytest.fixture
def suite(tmp_path, monkeypatch):
    monkeypatch.setenv("CMLORA_CACHE", str(tmp_path / "cache"))
    write_suite(tmp_path / "suite", 0, **MINI)
    return tmp_path / "suite"


def test_the_content_key_does_not_depend_on_the_suites_folder_name(suite, tmp_path):
    write_suite(tmp_path / "elsewhere", 0, **MINI)
    assert content_hash(tmp_path / "elsewhere", PretrainConfig()) == content_hash(suite, PretrainConfig())
    write_suite(tmp_path / "seed1", 1, **MINI)
    assert content_hash(tmp_path / "seed1", PretrainConfig()) != content_hash(suite, PretrainConfig())


def test_the_key_hashes_what_a_base_reads_and_a_record_scale_changes_none_of_it(suite, tmp_path):
    from cmlora.synth.base import language_corpus

    key = content_hash(suite, PretrainConfig())
    scaled = tmp_path / "scaled"
    write_suite(scaled, 0, **MINI, record_scales={"digit_sum": 8, "count_colour": 3})
    assert (scaled / "train.json").read_bytes() != (suite / "train.json").read_bytes()
    assert language_corpus(scaled) == language_corpus(suite)  # the scaled records are not read
    assert content_hash(scaled, PretrainConfig()) == key

    def edited(name, old, new):
        path = suite / name
        text = path.read_text()
        assert old in text and new != old, (name, old)
        path.write_text(text.replace(old, new, 1))
        try:
            return content_hash(suite, PretrainConfig())
        finally:
            path.write_text(text)

    # A training image's scene, the manifest's summary of the training records: not read by a base.
    lines = (suite / "scenes.jsonl").read_text().splitlines()
    train_line = next(line for line in lines if line.startswith('{"image": "images/train/'))
    assert edited("scenes.jsonl", train_line, train_line.replace('"grid": 2', '"grid": 3')) == key
    assert edited("manifest.json", '"train_records"', '"train_records_"') == key
    # A pretraining image's scene, the image settings, a training instruction the corpus holds: read.
    base_line = next(line for line in lines if line.startswith('{"image": "images/pretrain/'))
    assert edited("scenes.jsonl", base_line, base_line.replace('"grid": 2', '"grid": 3')) != key
    assert edited("manifest.json", '"palette"', '"palette_"') != key
    answer = json.loads((suite / "train.json").read_text())[0]["conversations"][1]["value"]
    assert edited("train.json", f'"{answer}"', f'"{answer} ."') != key


def test_the_facts_are_part_of_the_key_only_when_the_base_reads_them(suite, monkeypatch):
    from cmlora.synth import knowledge

    without = content_hash(suite, PretrainConfig())
    with_facts = content_hash(suite, PretrainConfig(knowledge_repeats=2))
    assert with_facts not in (without, content_hash(suite, PretrainConfig(knowledge_repeats=1)))
    monkeypatch.setattr(knowledge, "facts", lambda: ["A triangle has 4 corners."])
    assert content_hash(suite, PretrainConfig()) == without  # the default recipe's key: the shipped base's
    assert content_hash(suite, PretrainConfig(knowledge_repeats=2)) != with_facts
    with pytest.raises(ValueError, match="knowledge_repeats must be 0 or more"):
        PretrainConfig(knowledge_repeats=-1)


def test_the_checks_and_their_phase_are_part_of_the_key_only_when_the_suite_has_them(tmp_path):
    unchecked = tmp_path / "unchecked"
    manifest = write_suite(unchecked, 0, **MINI)  # the default: no checks
    assert "options" not in manifest and "check" not in manifest["pretrain"]["skills"]
    assert "check_records" not in manifest["pretrain"]
    manifest = write_suite(tmp_path / "checked", 0, **MINI, checks=True)
    assert manifest["pretrain"]["check_records"] > 0 and "check" in manifest["pretrain"]["skills"]
    suite = tmp_path / "checked"
    assert not (unchecked / base_module.CHECKS_FILE).exists() and (suite / base_module.CHECKS_FILE).exists()
    # Without checks the phase's settings are not hashed: the key a suite had before the phase existed.
    assert content_hash(unchecked, PretrainConfig(check_steps=5)) == content_hash(unchecked, PretrainConfig())
    assert content_hash(suite, PretrainConfig(check_steps=5)) != content_hash(suite, PretrainConfig())
    assert content_hash(suite, PretrainConfig()) != content_hash(unchecked, PretrainConfig())
    key = content_hash(suite, PretrainConfig())
    path = suite / base_module.CHECKS_FILE
    path.write_text(path.read_text().replace('"yes"', '"no"', 1))
    assert content_hash(suite, PretrainConfig()) != key  # the checks' content is hashed


def test_the_base_folds_case_by_default_and_the_cased_tokenizer_has_a_key_of_its_own(suite):
    from dataclasses import replace

    from cmlora.synth.base import BASE_SPEC

    assert BASE_SPEC.fold_case
    cased = PretrainConfig(spec=replace(BASE_SPEC, fold_case=False))
    assert content_hash(suite, cased) != content_hash(suite, PretrainConfig())


def test_pretrain_base_installs_the_shipped_base_for_its_key_and_trains_otherwise(suite, tmp_path, monkeypatch):
    config = PretrainConfig()
    root = tmp_path / "shipped_base"
    shipped.ship(fake_base(tmp_path / "base", content_hash(suite, config)), ["cmd 1", "cmd 2"], root)
    monkeypatch.setattr(shipped, "SHIPPED", root)
    trained = []

    def train(suite, out, config):
        trained.append(config.seed)
        raise RuntimeError("trained")

    monkeypatch.setattr(base_module, "train_base", train)
    out = pretrain_base(suite, tmp_path / "out", config)
    assert (out / "model.safetensors").read_bytes() == b"weights" and (out / "SHIPPED.json").exists()
    assert trained == []
    for other, use_cache in ((PretrainConfig(seed=1), True), (config, False)):  # another key; --no-cache
        with pytest.raises(RuntimeError, match="trained"):
            pretrain_base(suite, tmp_path / "out2", other, use_cache=use_cache)
    assert trained == [1, 0]


def test_the_shipped_base_is_whole_and_loads():
    manifest = shipped.read_manifest()
    assert manifest is not None, f"the package ships a base, but {shipped.SHIPPED} has no {shipped.MANIFEST}"
    assert shipped.find_shipped(manifest["key"]) == shipped.SHIPPED  # every file's hash checked
    assert any(command.startswith("cmlora pretrain-base") for command in manifest["commands"])
    model, processor = vlm.load(shipped.SHIPPED)
    assert json.loads((shipped.SHIPPED / "base_eval.json").read_text())["key"] == manifest["key"]
    assert model.config.vision_feature_layer == -1 and processor.tokenizer is not None


@pytest.mark.slow
def test_the_shipped_base_serves_the_default_suite(tmp_path):
    """The suite `cmlora synth --out suite --seed 0` writes and the default recipe have the key the shipped base
    was trained for: a change to the generator or the recipe without `make shipped-base` fails here."""
    from cmlora.cli import main

    manifest = shipped.read_manifest()
    assert manifest is not None, f"the package ships a base, but {shipped.SHIPPED} has no {shipped.MANIFEST}"
    main(["synth", "--out", str(tmp_path / "my-suite"), "--seed", "0"])  # any folder name
    assert content_hash(tmp_path / "my-suite", PretrainConfig()) == manifest["key"]
