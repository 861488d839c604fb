"""The tiny pretrained base: a from-scratch LLaVA taught to link what it sees to words (LLaVA's stage 1 role).

`pretrain_base(suite_dir, out_dir)` builds a tiny LLaVA whose tokenizer is trained on the suite's texts, then
- stage 0 (`synth.vision`): pretrains the vision tower as a per-cell classifier on the scenes of the suite's
  pretraining images (the role CLIP plays for LLaVA), then aligns the projector's output with the language
  model's word embeddings for what each cell holds;
- stage 1: freezes the tower (and the projector, but in phase 4) and trains the language model in five phases: on the
  suite's `pretrain.json` (several question/answer pairs and a description per image, every answer supervised), then
  on the one lookup the conversations leave unformed (colour of a shape named) asked alone, then on all its questions
  asked one at a time (`one_question_each`), every kind equally often (`balanced_by_kind`), then on "where is ... ?"
  alone with the projector trained too (its tokens lose where a cell is), then on all the questions again; each phase
  is mixed with the text of `language_corpus` (the suite's instructions, answers and evaluation prompts, each alone,
  every token learned: the text pretraining an LLM has had; opt-in, with `knowledge.facts()` too: how many corners a
  triangle has, what 3 plus 4 is), with the recipe two studies on a 2-core CPU found to work
  (shared/platform-notes.md): patch-aligned cells, dense supervision, AdamW lr 2e-3, betas (0.9, 0.98), weight decay
  0.01, clipping 1.0, batch 32, 5 % warm-up, cosine decay to 5 %. Batches are drawn from length-sorted pools so that
  little of each step is padding;
then measures held-out accuracy per skill on `pretrain_eval.json`, and saves the model in Hugging Face format
with `base_eval.json` beside it. Results are cached by a content hash of what the base reads of the suite and of
the recipe (`content_hash`); the base the project ships (`synth.shipped`) serves the suite and recipe it was
trained for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from .. import vlm
from ..data import InstructionCollator, InstructionDataset, load_records
from ..data.records import IMAGE_MARKER, one_question_each
from . import knowledge, shipped
from .questions import DESCRIBE, question_kind
from .vision import BASE_IMAGE_FOLDERS, VisionPretrainConfig, pretrain_vision, scene_lines

# Part of the cache key (the package's version is not: a release that leaves the recipe alone keeps its cached and
# shipped bases). Bump it whenever the code changes what a base learns (template, loop, eval), then `make
# shipped-base`.
RECIPE_VERSION = 8
CHECKS_FILE = "pretrain_checks.json"
BASE_SPEC = vlm.TinySpec(image_size=32, patch_size=16, vision_hidden=96, vision_layers=2, vision_heads=4,
                         vision_intermediate=384, text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2,
                         intermediate=384, vocab_size=1024, vision_feature_layer=-1, fold_case=True)


@dataclass
class PretrainConfig:
    steps: int = 4000  # stage 1, first phase (conversations)
    batch_size: int = 32
    learning_rate: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.05
    final_lr_ratio: float = 0.05
    max_length: int = 192
    seed: int = 0
    eval_batch_size: int = 64
    spec: vlm.TinySpec = field(default_factory=lambda: BASE_SPEC)
    vision: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)  # stage 0
    freeze_vision: bool = True  # in stage 1, as LLaVA's stage 1 does
    # In stage 1 but its `locate` phase, keep the projector as stage 0b aligned it (image tokens pointing at their
    # words): measured (one seed, 2,000 steps, stage 0 without its cell head) "is the <colour> <shape> small or
    # large ?" 0.77 -> 0.97, existence 0.53 -> 0.75, and the first lookup learned in 1,000 steps instead of 1,500.
    freeze_projector: bool = True
    # Stage 1 has five phases, each mixed with the language corpus (BENCHMARKS.md, "Three phases", "Position: the
    # projector"):
    # 1. `steps` on the conversations (warm-up, cosine decay to `final_lr_ratio`);
    # 2. `focus_steps` on the questions of kind `focus_kind` asked one at a time (one_question_each), at a constant
    #    `question_learning_rate` after a warm-up. The lookup by shape ("what colour is the triangle ?") is the one
    #    the conversations leave unformed (0.51-0.66 after them); alone, it forms (seed 1: 0.51 -> 0.89), while
    #    the other lookups fade (shape-of-colour 0.42, digit 0.36, word 0.13);
    # 3. `question_steps` on every single question, each kind as often as the most common one
    #    (`balanced_by_kind`; the descriptions stay in phase 1), at `question_learning_rate` with cosine decay to
    #    `question_final_lr_ratio`: the faded lookups come back and the focused one stays. Seeds 0, 1, 2: every
    #    skill but position (0.74-0.80) at 0.84 or more; phase 3 alone (seed 1) left colour at 0.57.
    focus_steps: int = 800
    focus_kind: str = "colour"
    question_steps: int = 1000
    # 4. `locate_steps` on the "where is ... ?" questions alone (every way of naming the object, balanced), the
    #    projector trained too, then 5. `settle_steps` as phase 3 (projector frozen again); both at
    #    `question_learning_rate` with cosine decay. Without them "where is ... ?" stayed at 0.71-0.80 (seeds 0, 1,
    #    2) because the answer is missing from the image tokens, not because the object is not found: on images of
    #    4 objects the same lookups answered "is the <name> small or large ?" at 0.95 and "where is the <name> ?"
    #    at 0.46, and a linear probe reads the cell off only 0.72 of the projector's tokens. 1,000 more steps of
    #    phase 3 left position at 0.71; phase 4 with the projector frozen reached 0.80, with it trained 0.89, and
    #    phase 5 took it to 0.98-0.99 (seeds 0, 1, 2) and brought the other skills back. Run before phase 3
    #    instead, phase 3 undid it (seed 0: 0.74). BENCHMARKS.md, "Position: the projector". With the tailed
    #    wording and the case-folding tokenizer, 1,000 settle steps were too few: seed 2 ended phase 3 with colour
    #    0.56 and existence 0.74, and phase 5 left them at 0.77 and 0.85 (position 0.89); 2,000 steps from the
    #    same state reached 0.91, 0.90 and 0.96 (BENCHMARKS.md, "The tailed wording as the default").
    locate_steps: int = 1000
    locate_kind: str = "position"  # every kind that starts with it: position by shape, by colour, by both
    settle_steps: int = 2000  # run only after a locate phase
    question_learning_rate: float = 1e-3
    question_final_lr_ratio: float = 0.05
    # 6. `check_steps` on the yes/no checks of pretrain_checks.json ("is the red circle small ?", "is there a red
    #    circle at the top-left of the image ?"; `questions.check_questions`), each kind as often as the most common,
    #    as many of them (`check_items`) as of phase 3's questions, at `question_learning_rate` with cosine decay,
    #    projector frozen. Run on the shipped base of recipe 8 (development runs), 2,000 steps taught them (held
    #    out: colour, shape, size and count 0.98-1.00, style 0.88-0.91, position 0.84, word 0.81) and kept every
    #    skill; the base then answered MME's size, count, colour and shape checks at 0.80-0.90 before any tuning,
    #    against chance without; in the recipe (seed 0), check 0.95 and every skill 0.87 or more, in about 20 minutes
    #    (BENCHMARKS.md, "Checks in the base"). Runs only for a suite written with `cmlora synth --checks` (opt-in);
    #    without the file the phase's settings are not part of the content key.
    check_steps: int = 2000
    check_items: int = 12000
    # How often each sentence of `knowledge.facts()` is in the text mixed into every phase (the language corpus has
    # each of its texts once): the facts the knowledge-intensive tasks need, read as an LLM read them. Opt-in
    # (`--knowledge-repeats 2`): on three seeds it lifted digit_word, digit_parity and letter_vowel, but not the
    # number of tasks at 0.8 or more (23, 23, 20 against 21 without), and seed 0's base was weaker (BENCHMARKS.md,
    # "Facts of the world"). At 0 the facts are neither read nor part of the content hash.
    knowledge_repeats: int = 0

    def __post_init__(self) -> None:
        if self.knowledge_repeats < 0:
            raise ValueError(f"knowledge_repeats must be 0 or more, got {self.knowledge_repeats}")


def cache_dir() -> Path:
    return Path(os.environ.get("CMLORA_CACHE", Path.home() / ".cache" / "cmlora"))


# What of a suite a base reads, and so all its content key hashes. The image folders (`vision.BASE_IMAGE_FOLDERS`):
# their scenes (stage 0's labels) and, through the manifest's sections below, how their pixels were drawn (the
# generator, the seed, the image settings and font, the pretraining options). The other sections describe the
# training and evaluation records, which a base reads only as text (`language_corpus`, hashed itself): a
# `--record-scale`, which changes them and nothing a base reads, keeps the key, so the shipped base serves a scaled
# suite.
BASE_MANIFEST_SECTIONS = ("generator", "format_version", "seed", "sizes", "image", "pretrain", "options")
TUNING_OPTIONS = ("record_scales",)  # suite options that change the training records only


def content_hash(suite: Path, config: PretrainConfig) -> str:
    digest = hashlib.sha256()
    for name in ("pretrain.json", CHECKS_FILE, "pretrain_eval.json"):
        if name == CHECKS_FILE and not (suite / name).exists():
            continue
        digest.update(name.encode())
        digest.update((suite / name).read_bytes())
    manifest = json.loads((suite / "manifest.json").read_text())
    sections = {key: manifest[key] for key in BASE_MANIFEST_SECTIONS if key in manifest}
    options = {key: value for key, value in sections.pop("options", {}).items() if key not in TUNING_OPTIONS}
    if options:
        sections["options"] = options
    digest.update(b"manifest.json")
    digest.update(json.dumps(sections, sort_keys=True).encode())
    digest.update(b"scenes.jsonl")
    for line, _row in scene_lines(suite, BASE_IMAGE_FOLDERS):
        digest.update(line.encode())
    digest.update("\n".join(language_corpus(suite)).encode())
    recipe = asdict(config)
    if config.knowledge_repeats:
        digest.update("\n".join(knowledge.facts()).encode())
    else:  # the recipe without facts keeps the key it had before the option existed (and the shipped base)
        del recipe["knowledge_repeats"]
    if not config.spec.fold_case:  # the cased tokenizer keeps the key it had before the option existed
        del recipe["spec"]["fold_case"]
    if not (suite / CHECKS_FILE).exists():  # no checks, no phase 6: the key it had before the phase existed
        del recipe["check_steps"], recipe["check_items"]
    digest.update(json.dumps(recipe, sort_keys=True, default=str).encode())
    digest.update(f"recipe {RECIPE_VERSION}".encode())
    return digest.hexdigest()[:16]


def _lr_factor(step: int, total: int, warmup_ratio: float, final_ratio: float) -> float:
    warmup = max(1, int(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                           pool_batches: int = 64) -> list[list[int]]:
    """One epoch of batches: a random permutation cut into pools of `pool_batches` batches, each pool sorted by
    length and cut into batches, the batches shuffled. Batches stay random, and padding stays small."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), batch_size * pool_batches):
        pool = sorted(order[start:start + batch_size * pool_batches], key=lengths.__getitem__)
        batches += [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def language_corpus(suite: Path) -> list[str]:
    """The text a tiny language model must have read to take part in the study, in the role of an LLM's text
    pretraining: every distinct instruction and every distinct answer of the training tasks (each on its own,
    never a question with its answer), and every distinct prompt of the evaluation tasks as they are asked
    (never their targets). Without it, LoRA cannot read the instructions: the embeddings of words that only
    the tasks use stay at their random initialisation, and LoRA does not train embeddings.

    Of each training task, only its first `train_per_task` records (the manifest's size): those every suite of
    that seed and size has, whatever its `--record-scale`, so that scaling a task changes nothing a base reads."""
    from ..evaluation.inputs import read_mme, read_task_dir
    from ..evaluation.tasks import spec_for

    texts: dict[str, None] = {}
    path = suite / "train.json"
    if path.exists():
        per_task = json.loads((suite / "manifest.json").read_text())["sizes"]["train_per_task"]
        seen: Counter[str] = Counter()
        for record in json.loads(path.read_text()):
            seen[record["task_name"]] += 1
            if seen[record["task_name"]] > per_task:
                continue
            for turn in record["conversations"]:
                texts[turn["value"].replace(IMAGE_MARKER, "").strip()] = None
    examples = []
    if (suite / "eval").is_dir():
        examples += [e for task in read_task_dir(suite / "eval").values() for e in task]
    if (suite / "mme").is_dir():
        examples += read_mme(suite / "mme")
    for example in examples:
        spec = spec_for("mme" if example.task == "mme" else example.task)
        texts[f"{example.prompt} {spec.suffix}".strip() if spec.suffix else example.prompt] = None
    return list(texts)


def _tokenizer_corpus(suite: Path, language: list[str]) -> list[str]:
    """Texts the tokenizer is trained on: the pretraining conversations and the language corpus."""
    texts = [turn["value"] for record in json.loads((suite / "pretrain.json").read_text())
             for turn in record["conversations"]]
    return texts + language


def balanced_by_kind(kinds: list[str], rng: random.Random) -> list[int]:
    """Indexes into `kinds` with every kind as often as the most common one: each kind's indexes repeated whole as
    many times as fit, the rest drawn without replacement. Kinds in order of first appearance, indexes in order."""
    by_kind: dict[str, list[int]] = {}
    for index, kind in enumerate(kinds):
        by_kind.setdefault(kind, []).append(index)
    most = max(map(len, by_kind.values()), default=0)
    chosen = []
    for indexes in by_kind.values():
        chosen += indexes * (most // len(indexes)) + rng.sample(indexes, most % len(indexes))
    return chosen


def text_items(texts: list[str], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Text-only training items, every token learned (the end token too)."""
    items = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids[: max_length - 1] + [tokenizer.eos_token_id]
        input_ids = torch.tensor(ids)
        items.append({"input_ids": input_ids, "labels": input_ids.clone(), "pixel_values": None})
    return items


class Phase(NamedTuple):
    """One phase of stage 1: which records (`source`) and which of them (`chosen`, repeats allowed), for how many
    steps, at what learning rate (cosine decay to `final_lr_ratio` of it), and whether the projector trains."""

    name: str
    source: str  # "conversations" or "questions" (single questions)
    chosen: list[int]
    steps: int
    learning_rate: float
    final_lr_ratio: float
    trains_projector: bool = False


def train_base(suite: Path, out: Path, config: PretrainConfig, log_every: int = 200) -> dict[str, Any]:
    """Build and train the base in `out` (stage 0, then stage 1); returns training statistics."""
    torch.manual_seed(config.seed)
    records, _ = load_records(suite / "pretrain.json", suite / "images")
    # Single questions (one_question_each), measured on the seed-0 suite (BENCHMARKS.md): after 4,000 steps of
    # conversations, "what colour is the triangle ?" (the lookup by shape) was at 0.66, and had stayed at
    # 0.58-0.66 since step 1,000; 1,000 steps on single questions took it to 0.89. A likely reason: in a
    # conversation most questions follow others (71 %), and 30 % of them are answered by an earlier turn's words,
    # so the loss can be met without looking at the image; the evaluation, like every instruction-tuning task,
    # asks one question about a fresh image. Single questions from the start are no cure either: the lookup by
    # colour then never formed (shape-of-colour 0.57 after 4,000 steps). The descriptions stay in the first
    # phase: asked alone, they slowed the lookup by shape down (600 steps: colour-of-shape 0.72 with them, 0.86
    # without; one seed).
    questions = [r for r in one_question_each(records) if not r.conversations[0].text.endswith(DESCRIBE)]
    kinds = [question_kind(r.conversations[0].text) for r in questions]
    if config.focus_steps and config.focus_kind not in kinds:
        raise ValueError(f"focus_kind {config.focus_kind!r} is no question kind of {suite / 'pretrain.json'}; "
                         f"its kinds: {sorted(set(kinds))}")
    located = [i for i, kind in enumerate(kinds) if kind.startswith(config.locate_kind)]
    if config.locate_steps and not located:
        raise ValueError(f"locate_kind {config.locate_kind!r} starts no question kind of {suite / 'pretrain.json'}; "
                         f"its kinds: {sorted(set(kinds))}")
    # The corpus is read once (it parses every evaluation file of the suite); the facts join it, if asked for.
    language = language_corpus(suite) + knowledge.facts() * config.knowledge_repeats
    vlm.tiny(out, config.spec, corpus=_tokenizer_corpus(suite, language))
    model, processor = vlm.load(out)
    vision = pretrain_vision(model, processor, suite, config.vision,
                             lambda step, total: _lr_factor(step, total, config.warmup_ratio, config.final_lr_ratio))
    tqdm.write(f"stage 0 (vision tower): {vision['seconds']} s, held-out {vision['held_out_accuracy']}")
    if config.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    text = text_items(language, processor.tokenizer, config.max_length)
    stats: dict[str, Any] = {"vision": vision}
    datasets = {source: InstructionDataset(source_records, processor, template="plain", max_length=config.max_length)
                for source, source_records in (("conversations", records), ("questions", questions))}
    balanced = balanced_by_kind(kinds, random.Random(config.seed))
    q_lr, q_final = config.question_learning_rate, config.question_final_lr_ratio
    located_balanced = [located[i] for i in balanced_by_kind([kinds[i] for i in located], random.Random(config.seed))]
    phases = (Phase("conversations", "conversations", list(range(len(records))), config.steps, config.learning_rate,
                    config.final_lr_ratio),
              Phase("focus", "questions", [i for i, kind in enumerate(kinds) if kind == config.focus_kind],
                    config.focus_steps, q_lr, 1.0),
              Phase("questions", "questions", balanced, config.question_steps, q_lr, q_final),
              Phase("locate", "questions", located_balanced, config.locate_steps, q_lr, q_final, trains_projector=True),
              Phase("settle", "questions", balanced, config.settle_steps if config.locate_steps else 0, q_lr, q_final))
    encoded: dict[tuple[str, int], dict[str, Any]] = {}  # each record encoded once, whichever phases use it
    for name, source, chosen, steps, learning_rate, final_lr_ratio, trains_projector in phases:
        if not steps:
            continue
        model.model.multi_modal_projector.requires_grad_(trains_projector or not config.freeze_projector)
        for key in tqdm(sorted({(source, i) for i in chosen} - encoded.keys()), desc=f"encoding {name}", unit="rec"):
            encoded[key] = datasets[source][key[1]]
        items = [encoded[source, i] for i in chosen] + text
        stats[name] = train_language_model(model, processor, items, steps, learning_rate, final_lr_ratio, config,
                                           name, log_every)
    if config.check_steps and (suite / CHECKS_FILE).exists():
        model.model.multi_modal_projector.requires_grad_(not config.freeze_projector)
        stats["checks"] = train_language_model(
            model, processor, _check_items(suite, processor, config, balanced, datasets["questions"], encoded) + text,
            config.check_steps, q_lr, q_final, config, "checks", log_every)
    model.save_pretrained(out)
    return stats


def _check_items(suite: Path, processor: Any, config: PretrainConfig, balanced: list[int], questions: Any,
                 encoded: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Phase 6's items: `check_items` checks of pretrain_checks.json balanced by what they check, and as many of
    phase 3's balanced single questions, so that the skills the checks name are asked as well."""
    checks, _ = load_records(suite / CHECKS_FILE, suite / "images")
    rng = random.Random(config.seed)
    chosen = balanced_by_kind([record.task_name for record in checks], rng)
    chosen = rng.sample(chosen, min(config.check_items, len(chosen)))
    kept = rng.sample(balanced, min(len(chosen), len(balanced)))
    dataset = InstructionDataset(checks, processor, template="plain", max_length=config.max_length)
    items = [dataset[i] for i in tqdm(chosen, desc="encoding checks", unit="rec")]
    for i in kept:
        if ("questions", i) not in encoded:
            encoded["questions", i] = questions[i]
        items.append(encoded["questions", i])
    return items


def train_language_model(model: Any, processor: Any, items: list[dict[str, Any]], steps: int, learning_rate: float,
                         final_lr_ratio: float, config: PretrainConfig, name: str,
                         log_every: int = 200) -> dict[str, Any]:
    """One phase of stage 1: AdamW on the trainable parameters over length-grouped batches of `items`, with its own
    warm-up and cosine decay to `final_lr_ratio` x `learning_rate` (1.0: constant after the warm-up)."""
    lengths = [len(item["input_ids"]) for item in items]
    collate = InstructionCollator(processor.tokenizer.pad_token_id, task_ids_key=None)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=config.betas, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    queue: list[list[int]] = []
    model.train()
    if config.freeze_vision:
        model.model.vision_tower.eval()
    start, losses = time.time(), []
    for step in tqdm(range(steps), desc=f"pretraining ({name})", unit="step"):
        if not queue:
            queue = length_grouped_batches(lengths, config.batch_size, generator)
        batch = collate([items[i] for i in queue.pop()])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * _lr_factor(step, steps, config.warmup_ratio, final_lr_ratio)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step} of the {name} phase")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            tqdm.write(f"{name} step {step + 1}: loss {sum(losses[-log_every:]) / log_every:.4f}")
    model.eval()
    return {"steps": steps, "items": len(items), "seconds": round(time.time() - start, 1), "final_loss": losses[-1],
            "mean_loss_last_100": sum(losses[-100:]) / len(losses[-100:])}


@torch.no_grad()
def evaluate_base(model: Any, processor: Any, eval_file: Path, image_folder: Path, out_path: Path,
                  batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Held-out accuracy per skill (task_name): the greedy answer, prompted in the pretraining template, equals
    the target after lower-casing and stripping. Predictions are written to `out_path`."""
    from ..evaluation.generate import GenerationSettings
    from ..evaluation.heldout import evaluate_heldout

    settings = GenerationSettings(batch_size=batch_size, template="plain")
    return evaluate_heldout(model, processor, eval_file, out_path, settings, image_folder=image_folder,
                            overwrite=True)


def pretrain_base(suite_dir: str | Path, out_dir: str | Path, config: PretrainConfig | None = None,
                  use_cache: bool = True) -> Path:
    """The pretrained base for a suite, copied to `out_dir`: from the cache (keyed by `content_hash`), else the
    shipped base if it was trained for the same key (`synth.shipped`), else trained now and cached. With
    `use_cache=False` it is trained whatever the cache and the shipped base hold."""
    suite, out = Path(suite_dir), Path(out_dir)
    config = config or PretrainConfig()
    key = content_hash(suite, config)
    cached = cache_dir() / "bases" / key
    if not (use_cache and (cached / "base_eval.json").exists()):
        staging = cached.with_name(f".{key}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        if use_cache and (found := shipped.find_shipped(key)) is not None:
            tqdm.write(f"[cmlora] using the shipped base {found} (trained for this suite and recipe by: "
                       + " && ".join(shipped.read_manifest(found)["commands"]) + ")")
            shipped.install(found, staging)
        else:
            stats = train_base(suite, staging, config)
            model, processor = vlm.load(staging)
            skills = evaluate_base(model, processor, suite / "pretrain_eval.json", suite / "images",
                                   staging / "base_eval_predictions.jsonl", config.eval_batch_size)
            report = {"key": key, "training": stats, "skills": skills, "config": asdict(config)}
            (staging / "base_eval.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        shutil.rmtree(cached, ignore_errors=True)
        staging.rename(cached)
    if out.resolve() != cached.resolve():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(cached, out)
    return out
