"""`write_suite`: the whole synthetic suite in one folder, deterministically (same arguments -> identical bytes).

    suite/
      train.json            Vision-Flan records of the training tasks (images relative to suite/images)
      train_eval.json       held-out records of the same tasks (new images, same instructions and conventions)
      pretrain.json         stage-1 records for the base: one multi-turn conversation per image
      pretrain_checks.json  yes/no checks about the same images, single questions (the base's last phase)
      pretrain_eval.json    single-question held-out records per skill (task_name = the skill; "check" too)
      eval/<task>.jsonl     the seven dataset analogues (POPE as pope_<split>.jsonl); images in eval/images
      mme/<subtask>/        MME's official layout (b): <name>.png beside <name>.txt ("question<TAB>Yes|No")
      scenes.jsonl          every image's scene (what is where), so any answer can be re-derived
      manifest.json         tasks, categories, counts, chance levels, sizes, seed, digit split (machine-readable)
      README.md             the same for people, and the command that generated the suite

Every random stream is seeded from (seed, stream name), so changing one size never changes another part.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..evaluation.tasks import SHORT_ANSWER
from . import eval_tasks as ev
from . import train_tasks as tt
from .questions import (
    CHECK,
    COUNT_BY,
    DEFAULT_STYLE,
    DESCRIBE,
    TAIL_PROBABILITY,
    TAILED_STYLES,
    YES_NO,
    check_questions,
    count_questions,
    pretrain_questions,
    pretrain_skills,
    tailed_check,
)
from .scenes import (
    CELL,
    COLOURS,
    DIGITS_HELDOUT_START,
    LETTERS,
    PALETTE,
    SHAPES,
    SIZE_PX,
    STYLES,
    WORDS,
    Sampler,
    Scene,
    fitting_words,
    font_kind,
    positions,
    render,
)

GENERATOR = "cmlora synth"
FORMAT_VERSION = 1
# The share of the pretraining images holding only shapes that also get a count-by-colour or count-by-shape
# question (`write_pretrain`). Opt-in: on four bases (two seeds twice) LoRA learned 20, 21, 23 and 28 of 34 tasks,
# against 25-27 from the shipped base (BENCHMARKS.md, "Counting by colour and by shape").
COUNT_SHARE = 0.0
# Whether the suite holds the base's yes/no checks (pretrain_checks.json and the held-out skill "check"), which the
# base's sixth phase trains on. Opt-in (`cmlora synth --checks`): with the checks as written now, LoRA answered 3 MME
# subtasks at 0.65 or more on three seeds, as from the shipped base, with POPE 87-93 and MNIST 38-47 against 98 and
# 64-87; without the plain existence check (a first version), MME 4-5 but POPE 75-90 (BENCHMARKS.md, "Checks in the
# base").
CHECKS = False
CHECKS_PER_IMAGE = 2
OUTPUTS = ("images", "eval", "mme", "train.json", "train_eval.json",
           "pretrain.json", "pretrain_checks.json", "pretrain_eval.json", "scenes.jsonl",
           "manifest.json", "README.md")


def stream(seed: int, name: str) -> random.Random:
    return random.Random(f"cmlora-synth:{seed}:{name}")  # str seeds hash with SHA-512: stable across runs


class Writer:
    """Renders scenes to PNG files and remembers every scene for scenes.jsonl."""

    def __init__(self, root: Path, font: str) -> None:
        self.root, self.font, self.scenes = root, font, []

    def save(self, scene: Scene, relative: str) -> str:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        render(scene, self.font).save(path, format="PNG")
        self.scenes.append({"image": relative, "scene": scene.to_dict()})
        return relative


def _record(record_id: str, image: str, task: str, turns: list[tuple[str, str]]) -> dict[str, Any]:
    conversations = []
    for index, (question, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": f"<image>\n{question}" if index == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": record_id, "image": image, "task_name": task, "conversations": conversations}


def _dump(path: Path, data: Any) -> None:
    """JSON; a list of records is written one record per line (fast to write, easy to read and diff)."""
    if isinstance(data, list):
        text = "[\n" + ",\n".join(json.dumps(row, ensure_ascii=False) for row in data) + "\n]\n"
    else:
        text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Training tasks


def _pools() -> dict[str, list[tt.TaskSpec]]:
    pools: dict[str, list[tt.TaskSpec]] = {}
    for task in tt.TASKS:
        pools.setdefault(task.image_pool, []).append(task)
    for name, tasks in pools.items():
        if len({task.scene for task in tasks}) != 1:
            raise ValueError(f"the tasks of pool {name!r} use different scene recipes")
    return pools


def write_train(writer: Writer, seed: int, grid: int, per_task: int, part: str = "train",
                short_answer_share: float = 0.0, record_scales: Mapping[str, int] | None = None,
                ) -> tuple[list[dict], list[Scene]]:
    """Records of every training task; part "train" (train.json) or "train_eval" (held-out: other streams, other
    images, the same instructions and conventions).

    In part "train" a task has `per_task * record_scales.get(task, 1)` records. A pool's first `per_task` images
    are asked by every task of the pool; the images after them only by the tasks scaled up, so that the first
    `per_task` records of every task are those of a suite without the scales. Returned with the records: the
    scenes of the images every task of their pool asks about (the training images' statistics, e.g. POPE's
    popular objects, do not follow the scales)."""
    records: dict[str, list[dict]] = {task.name: [] for task in tt.TASKS}
    shared_scenes: list[Scene] = []
    prefix = "" if part == "train" else f"{part}:"
    for pool, tasks in _pools().items():
        sampler = Sampler(stream(seed, f"{prefix}pool:{pool}"), grid, tt.MAX_ITEMS)
        rngs = {task.name: stream(seed, f"{prefix}task:{task.name}") for task in tasks}
        counts = {task.name: per_task * ((record_scales or {}).get(task.name, 1) if part == "train" else 1)
                  for task in tasks}
        for index in range(max(counts.values())):
            active = [task for task in tasks if index < counts[task.name]]
            for _attempt in range(1000):
                scene = tt.SCENES[tasks[0].scene](sampler)
                asked = [tt.ask(task, scene, rngs[task.name], short_answer_share) for task in active]
                if all(asked):
                    break
            else:
                raise RuntimeError(f"pool {pool!r}: no scene answers all of its tasks in 1000 draws")
            image = writer.save(scene, f"images/{part}/{pool}/{index:05d}.png")
            if len(active) == len(tasks):
                shared_scenes.append(scene)
            for task, (question, answer) in zip(active, asked, strict=True):
                record_id = f"{task.name}-{index:05d}" if part == "train" else f"{part}-{task.name}-{index:05d}"
                records[task.name].append(_record(record_id, image[len("images/"):], task.name,
                                                  [(question, answer)]))
    return [record for task in tt.TASKS for record in records[task.name]], shared_scenes


# ----------------------------------------------------------------------------------------------------------------
# Pretraining (shared/platform-notes.md: dense supervision, several QA pairs then a description per image)


def pretrain_scene(s: Sampler) -> Scene:
    kind = s.rng.choices(("unique", "crowd", "digits", "letters", "word", "mixed"), (45, 15, 12, 10, 6, 12))[0]
    style = s.style(weights=(0.55, 0.15, 0.15, 0.15))
    if kind in ("unique", "crowd"):
        return s.shapes(s.count(1), style, unique=kind == "unique")
    if kind == "digits":
        return s.digits(s.count(1))
    if kind == "letters":
        return s.letters("".join(s.rng.choices(LETTERS, k=s.count(1))), in_order=False)
    return s.word() if kind == "word" else s.mixed(style)


def write_pretrain(writer: Writer, seed: int, grid: int, images: int, eval_per_skill: int,
                   style: str = DEFAULT_STYLE, count_share: float = 0.0, checks: bool = False) -> dict[str, Any]:
    """pretrain.json (one conversation per image: 1-6 questions of the skills the scene answers, then its
    description 80 % of the time) and pretrain_eval.json (single questions on new images, per skill).

    `count_share`: the share of the images holding only shapes whose conversation also counts one colour or one
    shape (`questions.count_questions`), asked before the description. Its draws come from a stream of their own,
    so the rest of the conversations stay as they are without it."""
    sampler = Sampler(stream(seed, "pretrain"), grid)
    # The counts and the checks draw from streams of their own: pretrain.json is the same with or without them.
    rng, count_rng, check_rng = sampler.rng, stream(seed, "pretrain:count_by"), stream(seed, "pretrain:checks")
    records, check_records = [], []
    for index in range(images):
        scene = pretrain_scene(sampler)
        available = pretrain_questions(scene, rng, style)
        skills = rng.sample(sorted(available), min(rng.randint(1, 6), len(available)))
        turns = [rng.choice(available[skill]) for skill in skills]
        if count_share and (counted := count_questions(scene, count_rng, style)) and count_rng.random() < count_share:
            turns.append(counted[count_rng.choice(COUNT_BY)][0])
        if rng.random() < 0.8:
            turns.append((DESCRIBE, scene.describe()))
        image = writer.save(scene, f"images/pretrain/{index:06d}.png")
        records.append(_record(f"pretrain-{index:06d}", image[len("images/"):], "pretrain", turns))
        if checks:
            check_records += _checks(scene, records[-1]["id"], records[-1]["image"], check_rng)
    _dump(writer.root / "pretrain.json", records)
    if checks:
        _dump(writer.root / "pretrain_checks.json", check_records)
    held_out, counts = [], {}
    skills = pretrain_skills(style, count_by=count_share > 0)
    for skill in skills:
        sampler = Sampler(stream(seed, f"pretrain_eval:{skill}"), grid)
        ask = count_questions if skill in COUNT_BY else pretrain_questions
        for index in range(eval_per_skill):
            while skill not in (available := ask(scene := pretrain_scene(sampler), sampler.rng, style)):
                pass
            image = writer.save(scene, f"images/pretrain_eval/{skill}/{index:05d}.png")
            held_out.append(_record(f"pretrain_eval-{skill}-{index:05d}", image[len("images/"):], skill,
                                    [sampler.rng.choice(available[skill])]))
        counts[skill] = eval_per_skill
    sampler = Sampler(stream(seed, f"pretrain_eval:{CHECK}"), grid)
    for index in range(eval_per_skill if checks else 0):
        scene = pretrain_scene(sampler)
        _, question, answer = sampler.rng.choice(check_questions(scene, sampler.rng))
        image = writer.save(scene, f"images/pretrain_eval/{CHECK}/{index:05d}.png")
        held_out.append(_record(f"pretrain_eval-{CHECK}-{index:05d}", image[len("images/"):], CHECK,
                                [(question, answer)]))
    if checks:
        counts[CHECK] = eval_per_skill
        skills = (*skills, CHECK)
    _dump(writer.root / "pretrain_eval.json", held_out)
    answers = {"colour": len(COLOURS), "shape": len(SHAPES), "count": min(tt.MAX_ITEMS, grid * grid),
               "position": grid * grid, "existence": 2, "size": 2, "style": len(STYLES), "digit": 10,
               "letter": len(LETTERS), "word": len(fitting_words(grid)), "verify": 2, CHECK: 2,
               **dict.fromkeys(COUNT_BY, min(tt.MAX_ITEMS, grid * grid) + 1)}  # 0 to the most objects
    summary = {"records": len(records), "images": images, "skills": list(skills), "describe_probability": 0.8,
               "questions_per_image": [1, 6], "eval_per_skill": counts,
               "eval_chance": {skill: 1 / answers[skill] for skill in skills}}
    summary["questions"] = style
    if style in TAILED_STYLES:
        summary["tail_probability"] = TAIL_PROBABILITY
    if count_share:
        summary |= {"count_share": count_share}
    if checks:
        summary |= {"check_records": len(check_records), "checks_per_image": CHECKS_PER_IMAGE}
    return summary


def _checks(scene: Scene, record_id: str, image: str, rng: random.Random) -> list[dict]:
    """The records of pretrain_checks.json about one pretraining image: `CHECKS_PER_IMAGE` checks
    (`questions.check_questions`), a single question each, task_name "check <what is checked>"."""
    found = check_questions(scene, rng)
    return [_record(f"{record_id}-check-{index}", image, f"{CHECK} {what}", [(tailed_check(question, rng), answer)])
            for index, (what, question, answer) in enumerate(rng.sample(found, min(CHECKS_PER_IMAGE, len(found))))]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def write_eval(writer: Writer, seed: int, grid: int, per_task: int, stats: ev.ObjectStats) -> list[dict]:
    folder = writer.root / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    summary = []
    for name, spec in ev.EVAL_TASKS.items():
        sampler, rows = Sampler(stream(seed, f"eval:{name}"), grid), []
        for index in range(per_task):
            scene, prompt, target = spec.make(sampler)
            image = writer.save(scene, f"eval/images/{name}/{index:05d}.png")
            rows.append({"unique_id": f"{name}-{index:05d}", "image_path": image[len("eval/"):], "prompt": prompt,
                         "target": target})
        _jsonl(folder / f"{name}.jsonl", rows)
        size = spec.answers(grid)
        summary.append({"name": name, "file": f"eval/{name}.jsonl", "measures": spec.kind, "count": len(rows),
                        "answer_set_size": size, "chance": 1 / size, "majority_share": _majority(rows)})
    scenes, splits = ev.pope(Sampler(stream(seed, "eval:pope"), grid), math.ceil(per_task / 2), stats)
    images = [writer.save(scene, f"eval/images/pope/{i:05d}.png") for i, scene in enumerate(scenes)]
    for split, questions in splits.items():
        rows = [{"unique_id": f"pope_{split}-{n:05d}", "image_path": images[i][len("eval/"):], "prompt": prompt,
                 "target": answer} for n, (i, prompt, answer) in enumerate(questions)]
        _jsonl(folder / f"pope_{split}.jsonl", rows)
        summary.append({"name": f"pope_{split}", "file": f"eval/pope_{split}.jsonl", "count": len(rows),
                        "measures": f"object existence, {split} negatives (yes/no, half yes)", "answer_set_size": 2,
                        "chance": 0.5, "majority_share": _majority(rows)})
    return summary


def _majority(rows: list[dict]) -> float:
    """The share of the most frequent target (the accuracy of always giving that answer)."""
    targets = Counter(str(row["target"][0] if isinstance(row["target"], list) else row["target"]) for row in rows)
    return max(targets.values()) / len(rows)


def write_mme(writer: Writer, seed: int, grid: int, images: int) -> list[dict]:
    summary = []
    for subtask, (group, _) in ev.MME_SUBTASKS.items():
        sampler = Sampler(stream(seed, f"mme:{subtask}"), grid)
        for index in range(images):
            scene, lines = ev.mme_item(subtask, sampler)
            image = writer.save(scene, f"mme/{subtask}/{subtask}_{index:04d}.png")
            text = "".join(f"{question}\t{answer}\n" for question, answer in lines)
            (writer.root / image).with_suffix(".txt").write_text(text, encoding="utf-8")
        summary.append({"name": subtask, "group": group, "images": images, "questions": 2 * images,
                        "chance_acc": 0.5, "chance_acc_plus": 0.25, "chance_score": 75.0})
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The suite


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; the suite needs a folder")
    if out.exists() and any(out.iterdir()):
        manifest = out / "manifest.json"
        if not manifest.is_file() or json.loads(manifest.read_text()).get("generator") != GENERATOR:
            raise FileExistsError(f"{out} is not empty and holds no synthetic suite; choose an empty folder")
        for name in OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _part(image: str) -> str:
    """'images/train/objects/00001.png' -> 'train'; 'eval/images/mnist/00001.png' -> 'eval/mnist'; MME -> 'mme'."""
    parts = image.split("/")
    return parts[1] if parts[0] == "images" else f"eval/{parts[2]}" if parts[0] == "eval" else "mme"


def _digits_used(scenes: list[dict]) -> dict[str, list[int]]:
    """Which load_digits samples the images of each part use."""
    used: dict[str, set[int]] = {}
    for entry in scenes:
        for item in entry["scene"]["items"]:
            if item["digit_index"] is not None:
                used.setdefault(_part(entry["image"]), set()).add(item["digit_index"])
    return {part: sorted(indices) for part, indices in sorted(used.items())}


def command(out: str, seed: int, sizes: dict[str, Any]) -> str:
    def flag(key: str, value: Any) -> str:
        name = key.replace("_", "-")
        if isinstance(value, bool):  # a switch: --checks / --no-checks
            return f"--{name}" if value else f"--no-{name}"
        if isinstance(value, dict):  # a repeated TASK=K flag: --record-scale digit_sum=8
            return " ".join(f"--{name.removesuffix('s')} {k}={v}" for k, v in value.items())
        return f"--{name} {value}"

    flags = " ".join(flag(key, value) for key, value in sizes.items())
    return f"cmlora synth --out {out} --seed {seed} {flags}"


def write_suite(out: str | Path, seed: int = 0, *, grid: int = 2, train_per_task: int = 300, eval_per_task: int = 100,
                mme_images_per_subtask: int = 30, pretrain_images: int = 20000, pretrain_eval_per_skill: int = 100,
                train_eval_per_task: int = 30, font: str = "auto", questions: str = DEFAULT_STYLE,
                short_answer_share: float = 0.0, count_share: float = COUNT_SHARE,
                checks: bool = CHECKS, record_scales: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Generate the suite in `out` (an empty folder, or one holding an earlier suite, which is replaced);
    returns the manifest. See the module docstring for the layout.

    `questions`: the wording of the base's pretraining questions (`questions.QUESTION_STYLES`); `short_answer_share`:
    the share of training instructions followed by LLaVA-1.5's short-answer instruction. Both are opt-in
    (BENCHMARKS.md, ninth session). `count_share`: the share of the pretraining images of shapes alone that are
    also asked to count one colour or one shape (`write_pretrain`). `record_scales`: training tasks written with
    that many times `train_per_task` records (`write_train`; opt-in, BENCHMARKS.md, "LoRA+ and the hard tasks'
    share"). Options are recorded in the manifest only when not the default."""
    out = Path(out)
    positions(grid)  # validates the grid
    sizes = {"grid": grid, "train_per_task": train_per_task, "eval_per_task": eval_per_task,
             "mme_images_per_subtask": mme_images_per_subtask, "pretrain_images": pretrain_images,
             "pretrain_eval_per_skill": pretrain_eval_per_skill, "train_eval_per_task": train_eval_per_task}
    if min(train_per_task, eval_per_task, mme_images_per_subtask, pretrain_eval_per_skill, train_eval_per_task) < 1 \
            or pretrain_images < 0:
        raise ValueError(f"sizes must be positive: {sizes}")
    for name, share in (("short_answer_share", short_answer_share), ("count_share", count_share)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {share}")
    pretrain_skills(questions)  # validates the style
    record_scales = dict(record_scales or {})
    unknown = sorted(set(record_scales) - {task.name for task in tt.TASKS})
    if unknown or not all(isinstance(k, int) and k >= 1 for k in record_scales.values()):
        raise ValueError(f"record_scales: training task names with whole scales of 1 or more, got {record_scales}"
                         + (f" (no training task {', '.join(unknown)})" if unknown else ""))
    options = {key: value for key, value, default in (("questions", questions, DEFAULT_STYLE),
                                                       ("short_answer_share", short_answer_share, 0.0),
                                                       ("count_share", count_share, COUNT_SHARE),
                                                       ("checks", checks, CHECKS),
                                                       ("record_scales", record_scales, {}))
               if value != default}
    _prepare(out)
    writer = Writer(out, font_kind(font))
    records, train_scenes = write_train(writer, seed, grid, train_per_task, short_answer_share=short_answer_share,
                                        record_scales=record_scales)
    _dump(out / "train.json", records)
    held_out, _ = write_train(writer, seed, grid, train_eval_per_task, "train_eval", short_answer_share)
    _dump(out / "train_eval.json", held_out)
    eval_summary = write_eval(writer, seed, grid, eval_per_task, ev.ObjectStats.of(train_scenes))
    mme_summary = write_mme(writer, seed, grid, mme_images_per_subtask)
    pretrain = write_pretrain(writer, seed, grid, pretrain_images, pretrain_eval_per_skill, questions, count_share,
                              checks)
    _jsonl(out / "scenes.jsonl", writer.scenes)
    manifest = {
        "generator": GENERATOR, "format_version": FORMAT_VERSION, "seed": seed, "sizes": sizes,
        **({"options": options} if options else {}),
        "command": command(out.name or ".", seed, {**sizes, "font": writer.font, **options}),
        "image": {"grid": grid, "cell": CELL, "size": grid * CELL, "font": writer.font, "palette": PALETTE,
                  "shapes": list(SHAPES), "object_sizes_px": SIZE_PX, "styles": list(STYLES),
                  "positions": positions(grid), "words": [w for w in WORDS if len(w) <= grid * grid]},
        "categories": {category: [t.name for t in tt.TASKS if t.category == category] for category in tt.CATEGORIES},
        "train_tasks": [_train_entry(task, grid, records) for task in tt.TASKS],
        "train_records": len(records),
        "train_eval_records": len(held_out),
        "eval_tasks": eval_summary,
        "mme": {"layout": "official release layout (b): mme/<subtask>/<name>.png + <name>.txt",
                "subtasks": mme_summary},
        "pretrain": pretrain,
        "digits": {"source": "sklearn.datasets.load_digits", "train_part": [0, DIGITS_HELDOUT_START],
                   "heldout_part": [DIGITS_HELDOUT_START, 1797], "heldout_used_only_by": "eval/mnist.jsonl",
                   "indices_used": _digits_used(writer.scenes)},
    }
    _dump(out / "manifest.json", manifest)
    (out / "README.md").write_text(readme(manifest), encoding="utf-8")
    return manifest


def _train_entry(task: tt.TaskSpec, grid: int, records: list[dict]) -> dict[str, Any]:
    answers = tt.answer_set(task, grid) if task.query != "describe" else None
    given = Counter(r["conversations"][1]["value"] for r in records if r["task_name"] == task.name)
    count = sum(given.values())
    return {"name": task.name, "category": task.category, "image_pool": task.image_pool, "query": task.query,
            "convention": task.convention or None, "templates": list(task.templates), "answers": answers,
            "answer_set_size": len(answers) if answers else tt.describe_size(grid), "chance": tt.chance(task, grid),
            "count": count, "majority_share": max(given.values()) / count}


def _answers_text(entry: dict[str, Any]) -> str:
    answers = entry["answers"]
    if answers is None:
        return f"free text ({entry['answer_set_size']:,} possible)"
    shown = ", ".join(answers if len(answers) <= 10 else answers[:6] + ["..."])
    return f"{len(answers)}: {shown}"


def _wording(p: dict[str, Any]) -> str:
    """The suite README's words for the pretraining wording (suites written before it was recorded are plain)."""
    style = p.get("questions", "plain")
    tails = f"a share ({p.get('tail_probability')}) with an answer-format tail ('{YES_NO}', '{SHORT_ANSWER}')"
    return {"plain": "in the 'plain' wording (lower case, the question mark apart); ",
            "tailed": f"in the 'tailed' wording: plain, {tails}; ",
            "natural": f"in the 'natural' wording: written as instructions are, 'verify' asking yes or no about what "
                       f"the others name (half of it true), {tails}; "}[style]


def readme(m: dict[str, Any]) -> str:
    """The suite's README.md, written from its manifest."""
    image = m["image"]
    lines = [
        "# Synthetic multimodal instruction-tuning suite", "",
        f"Generated with `{m['command']}` (seed {m['seed']}; the same command writes byte-identical files).", "",
        f"Images: {image['size']}x{image['size']} pixels, a {image['grid']}x{image['grid']} grid of {image['cell']}-px "
        f"cells (one cell per image token at patch size {image['cell']}); shapes {', '.join(image['shapes'])} in "
        f"{', '.join(image['palette'])}, small ({image['object_sizes_px']['small']} px) or large "
        f"({image['object_sizes_px']['large']} px); styles {', '.join(image['styles'])}; uppercase letters "
        f"({image['font']} font); real handwritten digits from sklearn's load_digits. `scenes.jsonl` holds every "
        "image's content.", "",
        f"## Training tasks (`train.json`, {m['train_records']} records, Vision-Flan format)", "",
        f"`train_eval.json` holds {m['train_eval_records']} held-out records of the same tasks (new images, the same "
        "instructions and answer conventions), to check what instruction tuning learned.", "",
        "Images are relative to `images/`. Tasks sharing an image pool ask about the same pictures with different "
        f"targets and answer conventions. A share ({m.get('options', {}).get('short_answer_share', 0)}) of the "
        f"instructions, the descriptions' excepted, end with LLaVA-1.5's short-answer instruction '{SHORT_ANSWER}'. "
        "Chance = accuracy of a uniform "
        "guess over the answer set; majority = accuracy of always giving this suite's most frequent answer.", "",
        "| task | category | pool | answers | chance | majority | records | one of its instructions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {t['name']} | {t['category']} | {t['image_pool']} | {_answers_text(t)} | {t['chance']:.3g} | "
              f"{t['majority_share']:.2f} | {t['count']} | {t['templates'][0]} |" for t in m["train_tasks"]]
    lines += ["", "Categories: " + "; ".join(f"{c} ({len(names)})" for c, names in m["categories"].items()) + ".", "",
              "## Unseen evaluation tasks (`eval/<task>.jsonl`: unique_id, image_path, prompt, target)", "",
              "None of these instructions or task names occurs in train.json. Prompts state the answer format.", "",
              "| task | measures | examples | answer-set size | chance | majority |", "|---|---|---|---|---|---|"]
    lines += [f"| {e['name']} | {e['measures']} | {e['count']} | {e['answer_set_size']} | {e['chance']:.3g} | "
              f"{e['majority_share']:.2f} |" for e in m["eval_tasks"]]
    lines += ["", "SNLI-VE prompts ask for yes / no / maybe (read by the scorer as entailment / contradiction / "
              "neutral); neutral statements name a property no picture shows (weight, material, ...).", "",
              "## MME-style benchmark (`mme/`, official layout b)", "",
              "Each image has two questions, one answered Yes and one No, in random order. Chance: acc 0.5, acc+ 0.25, "
              "score 75 per subtask. The perception subtasks MME lacks (shape, size, style) are scored in the group "
              "'other' by `cmlora eval`.", "",
              "| subtask | group | images | questions |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['group']} | {s['images']} | {s['questions']} |" for s in m["mme"]["subtasks"]]
    p = m["pretrain"]
    lines += ["", "## Base pretraining (`pretrain.json`, `pretrain_checks.json`, `pretrain_eval.json`)", "",
              f"{p['records']} records, one per image: 1-6 questions about the image "
              f"(skills: {', '.join(k for k in p['skills'] if k not in COUNT_BY)}; 'where is' and 'small or large' "
              "name their object by shape, "
              "by colour or by both, whichever names it alone) "
              + _wording(p)
              + (f"on {p['count_share']:.0%} of the images that hold only shapes, one more question counting "
                 "one colour or one shape ('how many red objects are there ?', 'how many crosses are there ?'; "
                 "skills count_colour, count_shape); " if "count_share" in p else "")
              + f"then, with probability {p['describe_probability']}, the full description ('{DESCRIBE}'). "
              + (f"`pretrain_checks.json`: {p['check_records']} yes/no checks about the same images, "
                 f"{p['checks_per_image']} per image, each stating an object, size, position, colour, shape, count, "
                 "style or word that is true half the time ('is the red circle small ?', 'is there a red circle at "
                 "the top-left of the image ?'; skill check). " if "check_records" in p else "")
              + "pretrain_eval.json: single questions on new images, task_name = the skill; chance: "
              + ", ".join(f"{k} {v:.3g}" for k, v in p["eval_chance"].items()) + ".", "",
              "## Measuring what a model learns on this suite", "",
              "    cmlora pretrain-base --suite SUITE --out base            # the tiny base; base/base_eval.json",
              "    cmlora train --config configs/suite_lora.yaml --model base --data SUITE/train.json "
              "--image_folder SUITE/images --output_dir lora",
              "    cmlora eval --run lora --heldout SUITE/train_eval.json --heldout-images SUITE/images",
              "    cmlora eval --run lora --mme SUITE/mme --tasks SUITE/eval [--blank-images]",
              "    cmlora interference --run lora --data SUITE/train.json --image-folder SUITE/images", "",
              "`benchmarks/suite_quality.py` in the cmlora repository runs all of it per seed; the figures measured "
              "for the default suite are in its BENCHMARKS.md.", "",
              "## Digits", "",
              f"load_digits samples {m['digits']['train_part']} (half-open) are used by training, pretraining, MME "
              f"and the other evaluations; samples {m['digits']['heldout_part']} only by eval/mnist.jsonl.", ""]
    return "\n".join(lines)
