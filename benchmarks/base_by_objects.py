"""A tiny base's held-out accuracy per skill, split by how many objects its image holds.

The base's weak lookups (finding one object among several by its shape or colour, and saying where it is) hide
in its per-skill averages: images with one object are answered almost always, images with four far less often.
This reads what `cmlora pretrain-base` wrote (`base_eval_predictions.jsonl`) and the suite it was trained on
(`pretrain_eval.json`, `scenes.jsonl`); it trains and runs nothing. An answer counts as right as in
`evaluate_base` (`evaluation.heldout.exact_match`).

    python benchmarks/base_by_objects.py --base runs/suite-base --suite suite [--skills colour position]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from cmlora.evaluation.heldout import exact_match


def by_objects(base: Path, suite: Path) -> dict[str, dict[int, tuple[int, int]]]:
    """skill -> number of objects -> (right, asked)."""
    records = {record["id"]: record for record in json.loads((suite / "pretrain_eval.json").read_text())}
    scenes = {}
    for line in (suite / "scenes.jsonl").read_text().splitlines():
        row = json.loads(line)
        scenes[row["image"]] = row["scene"]
    counts: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    path = base / "base_eval_predictions.jsonl"
    for number, line in enumerate(path.read_text().splitlines(), 1):
        row = json.loads(line)
        if "_meta" in row:
            continue
        record = records.get(row["uid"])
        if record is None:
            raise KeyError(f"{path}, line {number}: uid {row['uid']!r} is not in {suite / 'pretrain_eval.json'}")
        scene = scenes[f"images/{record['image']}"]
        cell = counts[record["task_name"]][len(scene["items"])]
        cell[0] += exact_match(row["prediction"], row["target"])
        cell[1] += 1
    return {skill: {n: (right, asked) for n, (right, asked) in sorted(cells.items())}
            for skill, cells in counts.items()}


def table(result: dict[str, dict[int, tuple[int, int]]], skills: list[str] | None = None) -> str:
    numbers = sorted({n for cells in result.values() for n in cells})
    lines = ["| skill | " + " | ".join(f"{n} object{'s' * (n > 1)}" for n in numbers) + " |",
             "|---|" + "---|" * len(numbers)]
    for skill in skills or list(result):
        cells = result[skill]
        lines.append(f"| {skill} | " + " | ".join(
            f"{cells[n][0] / cells[n][1]:.2f} ({cells[n][1]})" if n in cells else "-" for n in numbers) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="a folder written by cmlora pretrain-base")
    parser.add_argument("--suite", type=Path, required=True, help="the suite the base was trained on")
    parser.add_argument("--skills", nargs="+", default=None, help="the skills to show (default: all)")
    args = parser.parse_args()
    print(table(by_objects(args.base, args.suite), args.skills))


if __name__ == "__main__":
    main()
