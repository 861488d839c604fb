"""Zero-shot evaluation of a model: predictions, scores.json and a markdown table per run.

    evaluate(model, processor, out_dir, mme_dir=..., tasks_dir=...)   ->  out_dir/
        predictions/<task>.jsonl      answers, written as produced (resumable)
        predictions/heldout.jsonl     answers to held-out records of the training tasks (heldout=...)
        mme_results/<subtask>.txt     MME's official results layout, for rescoring with the official tool
        scores.json                   every score; table.md the paper's table

The paper's columns: MME perception, cognition and total; Text-VQA, VSR, SNLI-VE, CIFAR-10, CIFAR-100, MNIST and
POPE (mean accuracy of its three splits); the mean of those seven.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .generate import GenerationSettings, predict
from .heldout import evaluate_heldout
from .inputs import read_mme, read_task_dir
from .mme import PERCEPTION, MMERow, score_mme, write_official_results
from .scoring import score_task
from .tasks import SEVEN, spec_for, task_family


def evaluate_mme(model: nn.Module, processor: Any, mme_dir: Path, out_dir: Path, settings: GenerationSettings,
                 model_id: str, overwrite: bool = False) -> dict[str, Any]:
    examples = read_mme(mme_dir)
    predictions = predict(model, processor, examples, spec_for("mme"), out_dir / "predictions" / "mme.jsonl",
                          settings, model_id, overwrite)
    rows = [MMERow(subtask=e.meta["subtask"], image=e.meta["image_id"], question=e.prompt, answer=str(e.target),
                   prediction=p["prediction"]) for e, p in zip(examples, predictions, strict=True)]
    write_official_results(rows, out_dir / "mme_results")
    subtasks = {row.subtask for row in rows}
    official = {*PERCEPTION, "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"}
    # The official 14 subtasks are scored strictly; a custom MME-style suite (other subtask names) groups its own.
    return score_mme(rows, strict=subtasks <= official)


def evaluate_tasks(model: nn.Module, processor: Any, tasks_dir: Path, out_dir: Path, settings: GenerationSettings,
                   model_id: str, only: Sequence[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    scores = {}
    for task, examples in read_task_dir(tasks_dir, only).items():
        spec = spec_for(task)
        predictions = predict(model, processor, examples, spec, out_dir / "predictions" / f"{task}.jsonl",
                              settings, model_id, overwrite)
        targets = [e.target for e in examples]
        # Classification: a prediction names a label only if no other label of the task's label set is in it.
        labels = sorted({str(t) for t in targets}) if spec.kind == "label" else None
        scores[task] = score_task(spec.kind, [p["prediction"] for p in predictions], targets, labels=labels)
    return scores


def summarize(mme: dict[str, Any] | None, tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The paper's columns (accuracies in percent); a dataset without results is None, and so is the mean then."""
    columns: dict[str, float | None] = {}
    if mme is not None:
        columns.update(mme_perception=mme.get("perception"), mme_cognition=mme.get("cognition"),
                       mme_total=mme.get("total"))
    families: dict[str, list[float]] = {}
    for task, result in tasks.items():
        families.setdefault(task_family(task), []).append(100.0 * result["accuracy"])
    for family, values in families.items():
        columns[family] = sum(values) / len(values)
    seven = [columns.get(name) for name in SEVEN]
    columns["mean_of_seven"] = None if any(v is None for v in seven) else sum(seven) / len(seven)
    return columns


def markdown_table(runs: dict[str, dict[str, Any]]) -> str:
    """Runs side by side: one row per column of the paper's table, one column per run."""
    keys: list[str] = []
    for summary in runs.values():
        keys += [key for key in summary if key not in keys]
    lines = ["| metric | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for key in keys:
        cells = [runs[name].get(key) for name in runs]
        lines.append(f"| {key} | " + " | ".join(_cell(v) for v in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | int | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def evaluate(model: nn.Module, processor: Any, out_dir: Path, *, mme_dir: Path | None = None,
             tasks_dir: Path | None = None, only: Sequence[str] | None = None,
             settings: GenerationSettings | None = None, model_id: str = "", overwrite: bool = False,
             heldout: Path | None = None, heldout_images: Path | None = None) -> dict:
    """Generate and score; writes predictions, MME's official layout, scores.json and table.md under out_dir.

    `heldout`: a Vision-Flan-format file of single-question records of the training tasks; their exact-match
    accuracy per task goes to scores.json["heldout"] (not into the paper's table)."""
    if mme_dir is None and tasks_dir is None and heldout is None:
        raise ValueError("evaluate: give mme_dir, tasks_dir or heldout")
    settings = settings or GenerationSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wants_mme = mme_dir is not None and (only is None or "mme" in only)
    task_only = None if only is None else [name for name in only if name != "mme"]
    mme = evaluate_mme(model, processor, Path(mme_dir), out_dir, settings, model_id, overwrite) if wants_mme else None
    tasks = {} if tasks_dir is None or task_only == [] else evaluate_tasks(
        model, processor, Path(tasks_dir), out_dir, settings, model_id, task_only, overwrite)
    scores = {"model": model_id, "generation": settings.for_header(), "mme": mme, "tasks": tasks,
              "summary": summarize(mme, tasks)}
    if heldout is not None:
        scores["heldout"] = evaluate_heldout(model, processor, Path(heldout), out_dir / "predictions" / "heldout.jsonl",
                                             settings, model_id, heldout_images, overwrite)
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    (out_dir / "table.md").write_text(markdown_table({out_dir.parent.name or "run": scores["summary"]}))
    return scores


def compare(score_files: Sequence[Path], at_least: float | None = None) -> str:
    """A markdown table of several runs' scores.json files, one column per run.

    Rows: the paper's summary columns, then (where any run has them) each MME subtask's accuracy and each held-out
    training task's accuracy with their mean, all in percent; with `at_least` (a fraction, e.g. 0.8) also how many
    held-out tasks reach it. A run directory stands for its eval/scores.json (`cmlora eval --run`'s default output).
    Columns are named by the shortest path suffix that tells the runs apart (a/eval-train, b/eval-train).
    """
    paths = [_scores_path(Path(path)) for path in score_files]
    rows = {name: _compare_rows(json.loads(path.read_text()), at_least)
            for name, path in zip(_column_names(paths), paths, strict=True)}
    return markdown_table(rows)


def _scores_path(path: Path) -> Path:
    if path.is_dir():
        path = path / "eval" / "scores.json" if (path / "eval" / "scores.json").exists() else path / "scores.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no scores.json; run cmlora eval first")
    return path


def _column_names(paths: list[Path]) -> list[str]:
    """Each file's folder (a run's, for RUN/eval/scores.json), extended by parent folders until the names differ."""
    resolved = [path.resolve() for path in paths]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise ValueError(f"{paths[index]}: the same scores.json is given twice")
    named = [path.absolute() for path in paths]  # the names the user gave, links not followed
    folders = [path.parent.parent if path.parent.name == "eval" else path.parent for path in named]
    parts = [folder.parts for folder in folders]
    depth = [1] * len(parts)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        clashing = {i for i, name in enumerate(names) if names.count(name) > 1}
        if not clashing:
            return names
        for i in clashing:
            depth[i] += 1


def _compare_rows(scores: dict[str, Any], at_least: float | None) -> dict[str, float | int | None]:
    rows: dict[str, float | int | None] = dict(scores["summary"])
    for subtask, result in sorted((scores.get("mme") or {}).get("subtasks", {}).items()):
        rows[f"mme {subtask} acc"] = 100.0 * result["acc"]
    heldout = scores.get("heldout") or {}
    for task, result in heldout.items():
        rows[f"heldout {task}"] = 100.0 * result["accuracy"]
    if heldout:
        accuracies = [result["accuracy"] for result in heldout.values()]
        rows["heldout mean"] = 100.0 * sum(accuracies) / len(accuracies)
        if at_least is not None:
            rows[f"heldout tasks >= {100 * at_least:g}"] = sum(value >= at_least for value in accuracies)
    return rows
