"""The `cmlora` command.

    cmlora train --config configs/tiny.yaml [--key value ...] [--resume]
    cmlora tiny-model --out runs/tiny-llava
    cmlora eval --run RUN_DIR | --base MODEL [--adapter DIR]  --mme DIR --tasks DIR [--only text_vqa,pope]
    cmlora compare RUN_A RUN_B ...
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--key value` pairs (values read as YAML scalars: 3, 4e-5, true, null, [q_proj, v_proj]) into a dict."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or len(token) <= 2:
            raise SystemExit(f"cmlora: expected --key value, got {token!r}")
        key = token[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            index += 1
        elif index + 1 < len(tokens):
            value = tokens[index + 1]
            index += 2
        else:
            raise SystemExit(f"cmlora: --{key} needs a value")
        overrides[key] = _scalar(value)
    return overrides


def _scalar(text: str) -> Any:
    """A YAML value, with numbers such as 4e-5 read as numbers (YAML 1.1 wants 4.0e-5)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmlora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="instruction-tune a VLM (MixLoRA, LoRA or full)",
                                       description="Any TrainConfig field can be overridden as --field value.")
    train_parser.add_argument("--config", help="YAML file of TrainConfig fields (configs/*.yaml)")
    train_parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    tiny_parser = commands.add_parser("tiny-model", help="write a tiny random LLaVA (model + processor), offline")
    tiny_parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    tiny_parser.add_argument("--seed", type=int, default=0)
    eval_parser = commands.add_parser("eval", help="zero-shot evaluation: MME and the <task>.jsonl datasets")
    source = eval_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run directory written by cmlora train")
    source.add_argument("--base", help="a base model (hub id or folder), optionally with --adapter")
    eval_parser.add_argument("--adapter", help="a PEFT adapter folder to load on --base")
    eval_parser.add_argument("--mme", help="MME folder (official release layout or <subtask>.jsonl files)")
    eval_parser.add_argument("--tasks", help="folder of <task>.jsonl files {unique_id, image_path, prompt, target}")
    eval_parser.add_argument("--only", help="comma-separated task names (mme, text_vqa, pope, ...)")
    eval_parser.add_argument("--out", help="output folder (default: RUN/eval, or ./eval)")
    eval_parser.add_argument("--batch-size", type=int, default=8)
    eval_parser.add_argument("--template", default=None, help="vicuna_v1, chat or auto (default: the run's)")
    eval_parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    eval_parser.add_argument("--temperature", type=float, default=0.2)
    eval_parser.add_argument("--top-p", type=float, default=1.0)
    eval_parser.add_argument("--seed", type=int, default=0)
    eval_parser.add_argument("--overwrite", action="store_true", help="regenerate existing predictions")
    compare_parser = commands.add_parser("compare", help="print runs' evaluation summaries side by side")
    compare_parser.add_argument("runs", nargs="+", help="run directories or scores.json files")
    args, rest = parser.parse_known_args(argv)
    if args.command != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "tiny-model":
        from .vlm import TinySpec, tiny

        print(f"[cmlora] tiny LLaVA written to {tiny(args.out, TinySpec(seed=args.seed))}")
    if args.command == "eval":
        from .evaluation.cli import run_eval

        run_eval(args)
    if args.command == "compare":
        from .evaluation.runner import compare

        print(compare(args.runs), end="")
    if args.command == "train":
        from .train import load_config, train

        config = load_config(args.config, parse_overrides(rest))
        run_dir = train(config, resume=args.resume)
        if os.environ.get("RANK", "0") == "0":  # one line per run, not per torchrun process
            print(f"[cmlora] run saved to {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
