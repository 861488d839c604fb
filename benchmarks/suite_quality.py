"""The synthetic suite's quality bars (issue: built-in suite and tiny base), measured end to end per seed.

For each seed: pretrain the base (`cmlora pretrain-base`, cache off, wall time), instruction-tune it with LoRA
r=8 on all training tasks (`configs/suite_lora.yaml`, wall time), then evaluate with `cmlora eval`:
held-out records of the training tasks (train_eval.json), the base's skills after tuning (pretrain_eval.json),
the unseen tasks (mme/ and eval/), and the same unseen tasks with every image blanked (text-only baseline);
finally `cmlora interference` on the LoRA run (first-order form). Prints one JSON object and writes it to
benchmarks/results/suite_quality.json.

    python benchmarks/suite_quality.py --suite suite --out runs/quality --seeds 0 1 2

`--bases DIR` starts from bases trained before (`DIR/base-s<seed>`, as written by `cmlora pretrain-base`) instead
of pretraining them, and reports the wall time their `base_eval.json` does not hold as null. `--config F` tunes
with another config than configs/suite_lora.yaml.

The results file is rewritten after every seed (with "pending_seeds" until the last), so a run cut off keeps the
seeds it finished; `--resume` then keeps those and measures only the seeds the file does not hold yet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def cmlora(*args: str) -> float:
    """Run a cmlora command; returns its wall time in seconds."""
    start = time.time()
    subprocess.run([sys.executable, "-m", "cmlora", *args], check=True, stdout=subprocess.DEVNULL)
    return round(time.time() - start, 1)


def accuracies(scores: dict) -> dict[str, float]:
    return {task: round(value["accuracy"], 3) for task, value in scores.items()}


def mme_acc(scores: dict) -> dict[str, float]:
    return {name: round(value["acc"], 3) for name, value in scores["mme"]["subtasks"].items()}


def one_seed(suite: Path, out: Path, seed: int, interference_tasks: str | None, bases: Path | None = None,
             config_path: Path = ROOT / "configs/suite_lora.yaml") -> dict:
    base, run = (bases or out) / f"base-s{seed}", out / f"lora-s{seed}"
    result: dict = {"seed": seed, "base_seconds": None}
    if bases is None:
        result["base_seconds"] = cmlora("pretrain-base", "--suite", str(suite), "--out", str(base), "--seed",
                                        str(seed), "--no-cache")
    result["base"] = {k: round(v["accuracy"], 3)
                      for k, v in json.loads((base / "base_eval.json").read_text())["skills"].items()}
    config = yaml.safe_load(config_path.read_text())
    # The config's replay files, taken from the suite measured (configs/suite_lora.yaml names suite/...).
    files = config.get("replay_data") or []
    files = [files] if isinstance(files, str) else files
    replay = ["--replay_data", "[" + ", ".join(str(suite / Path(f).name) for f in files) + "]"] if files else []
    result["lora_seconds"] = cmlora("train", "--config", str(config_path), "--model", str(base),
                                    "--data", str(suite / "train.json"), "--image_folder", str(suite / "images"),
                                    "--output_dir", str(run), "--seed", str(seed), *replay)
    result["lora_train_runtime"] = round(json.loads((run / "metrics.json").read_text())["train_runtime"], 1)
    images = ["--heldout-images", str(suite / "images"), "--batch-size", "64"]
    for name, file in (("train_tasks", "train_eval.json"), ("base_skills_after", "pretrain_eval.json")):
        cmlora("eval", "--run", str(run), "--heldout", str(suite / file), *images, "--out", str(run / f"eval-{name}"))
        result[name] = accuracies(json.loads((run / f"eval-{name}" / "scores.json").read_text())["heldout"])
    for name, extra in (("unseen", []), ("unseen_text_only", ["--blank-images"])):
        cmlora("eval", "--run", str(run), "--mme", str(suite / "mme"), "--tasks", str(suite / "eval"),
               "--batch-size", "64", "--out", str(run / f"eval-{name}"), *extra)
        scores = json.loads((run / f"eval-{name}" / "scores.json").read_text())
        result[name] = {"mme_acc": mme_acc(scores), "tasks": accuracies(scores["tasks"]),
                        "summary": {k: v if v is None else round(v, 2) for k, v in scores["summary"].items()}}
    args = ["interference", "--run", str(run), "--data", str(suite / "train.json"), "--image-folder",
            str(suite / "images"), "--first-order-only", "--out", str(run / "interference")]
    if interference_tasks:
        args += ["--tasks", interference_tasks]
    cmlora(*args)
    report = json.loads((run / "interference" / "interference.json").read_text())
    result["interference"] = report.get("summary", report.get("negative_share"))
    return result


def write_results(path: Path, results: dict) -> str:
    """Write the results whole or not at all (a temporary file renamed over the old one); returns the text."""
    text = json.dumps(results, indent=1)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n")
    partial.replace(path)
    return text


def earlier_runs(path: Path, header: dict) -> list[dict]:
    """The runs a results file already holds, for `--resume`; it must measure the same suite with the same config."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    if {key: earlier.get(key) for key in header} != header:
        raise SystemExit(f"{path}: holds runs of suite {earlier.get('suite')!r} with config {earlier.get('config')!r}, "
                         f"not of {header['suite']!r} with {header['config']!r}; --resume only continues the same "
                         "measurement (give another --results)")
    return earlier["runs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--interference-tasks", default="count_objects_digit,count_objects_word,exists_yes_no,"
                        "exists_true_false,read_digit,digit_word")
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/suite_quality.json"))
    parser.add_argument("--bases", type=Path, default=None, help="use DIR/base-s<seed> instead of pretraining")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/suite_lora.yaml",
                        help="the instruction-tuning config (default: configs/suite_lora.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs --results already holds (same suite and config) and measure only the "
                             "other seeds")
    args = parser.parse_args()
    path, header = Path(args.results), {"suite": str(args.suite), "config": str(args.config)}
    runs = earlier_runs(path, header) if args.resume else []
    for seed in (kept := sorted({run["seed"] for run in runs} & set(args.seeds))):
        print(f"seed {seed}: kept from {path}", file=sys.stderr)
    pending = [seed for seed in args.seeds if seed not in kept]
    while pending:
        seed = pending.pop(0)
        runs.append(one_seed(Path(args.suite), Path(args.out), seed, args.interference_tasks, args.bases, args.config))
        if pending:  # after every seed, so that a run cut off keeps the seeds it finished (`--resume` goes on)
            write_results(path, {**header, "pending_seeds": pending, "runs": runs})
    print(write_results(path, {**header, "runs": runs}))


if __name__ == "__main__":
    main()
