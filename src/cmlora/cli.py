"""The `cmlora` command.

    cmlora train --config configs/tiny.yaml [--key value ...] [--resume]
    cmlora tiny-model --out runs/tiny-llava
    cmlora synth --out suite [--seed 0] [--grid 2] [--train-per-task 300] ...
    cmlora pretrain-base --suite suite --out base [--steps N] [--focus-steps N] [--question-steps N]
                         [--locate-steps N] [--settle-steps N] [--check-steps N] [--vision-steps N]
                         [--knowledge-repeats N] [--seed S]
    cmlora eval --run RUN_DIR | --base MODEL [--adapter DIR]  --mme DIR --tasks DIR [--heldout FILE] [--blank-images]
    cmlora compare RUN_A RUN_B ...
    cmlora interference --run RUN_DIR | --base MODEL (--adapter DIR | --fresh lora) --data train.json --tasks a,b
    cmlora routes --run RUN_DIR | --base MODEL (--adapter DIR | --fresh mixlora)  --data train.json [--unseen eval.json]
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from typing import Any, NoReturn

import yaml

from .synth.questions import DEFAULT_STYLE, QUESTION_STYLES
from .synth.suite import CHECKS, COUNT_SHARE


def _record_scale(text: str) -> tuple[str, int]:
    """`cmlora synth --record-scale TASK=K`."""
    task, _, scale = text.partition("=")
    if not task or not scale.isdigit() or int(scale) < 1:
        raise argparse.ArgumentTypeError(f"expected TASK=K with K a whole number of 1 or more, got {text!r}")
    return task, int(scale)


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


def add_model_source(parser: argparse.ArgumentParser, fresh: tuple[str, ...] = ()) -> None:
    """--run RUN_DIR, or --base MODEL with --adapter DIR (or, where offered, --fresh ADAPTER_KIND)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run directory written by cmlora train")
    source.add_argument("--base", help="a base model (hub id or folder), with --adapter"
                        + (" or --fresh" if fresh else ""))
    parser.add_argument("--adapter", help="a PEFT adapter folder to load on --base")
    if fresh:
        parser.add_argument("--fresh", choices=list(fresh), help="a freshly initialised adapter on --base")


def end_process_group() -> None:
    """Under torchrun, leave the process group this process joined (Trainer never does) once every rank is done,
    as PyTorch asks, instead of leaving it to the interpreter's exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_skipping_teardown(code: int) -> NoReturn:
    """Exit after the atexit handlers (log and tracker flushes), but skip the interpreter's teardown.

    Twice in CI a torchrun rank aborted in its teardown ("terminate called without an active exception", exit
    code -6) after a run that had saved everything and left its process group; the launcher then failed the whole
    job. A C++ thread that gloo or DeepSpeed still holds is destroyed while joinable there; destroying the
    process group did not prevent it (the second abort came after `end_process_group` was added), and about 35
    runs on this machine (30 in an earlier session, 5 of ZeRO-3) never reproduced it. Nothing of ours is left to
    do at that point: files are written and closed."""
    atexit._run_exitfuncs()  # what a normal exit runs first: logging.shutdown, trackers' finish, ...
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> None:
    """The program (`cmlora`, `python -m cmlora`): `main`, then the exit; a distributed rank skips the teardown."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # set by torchrun, accelerate and the deepspeed launcher
        exit_skipping_teardown(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmlora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    # No abbreviations: "--r 8" is the field r, not a prefix of --resume.
    train_parser = commands.add_parser("train", help="instruction-tune a VLM (MixLoRA, LoRA or full)",
                                       description="Any TrainConfig field can be overridden as --field value.",
                                       allow_abbrev=False)
    train_parser.add_argument("--config", help="YAML file of TrainConfig fields (configs/*.yaml)")
    train_parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    tiny_parser = commands.add_parser("tiny-model", help="write a tiny random LLaVA (model + processor), offline")
    tiny_parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    tiny_parser.add_argument("--seed", type=int, default=0)
    synth_parser = commands.add_parser("synth", help="write the synthetic suite (train.json, eval/, mme/, pretrain)")
    synth_parser.add_argument("--out", required=True, help="folder to write the suite to (empty, or an earlier suite)")
    synth_parser.add_argument("--seed", type=int, default=0)
    for flag, default in (("--grid", 2), ("--train-per-task", 300), ("--eval-per-task", 100),
                          ("--mme-images-per-subtask", 30), ("--pretrain-images", 20000),
                          ("--pretrain-eval-per-skill", 100), ("--train-eval-per-task", 30)):
        synth_parser.add_argument(flag, type=int, default=default, help=f"default {default}")
    synth_parser.add_argument("--font", default="auto", choices=["auto", "freetype", "bitmap"])
    synth_parser.add_argument("--questions", default=DEFAULT_STYLE, choices=list(QUESTION_STYLES),
                              help="wording of the base's pretraining questions; plain: 'where is the red circle ?'; "
                                   "tailed (default): plain, a share with an answer-format tail ('... ? Answer yes "
                                   "or no.'); natural: as instructions are, with yes/no verify questions and the "
                                   "tails (see BENCHMARKS.md)")
    synth_parser.add_argument("--short-answer-share", type=float, default=0.0,
                              help="share of training instructions followed by LLaVA-1.5's 'Answer the question "
                                   "using a single word or phrase.' (default 0)")
    synth_parser.add_argument("--count-share", type=float, default=COUNT_SHARE,
                              help="share of the base's pretraining images of shapes alone that are also asked to "
                                   f"count one colour or one shape (default {COUNT_SHARE}; opt-in, see BENCHMARKS.md)")
    synth_parser.add_argument("--checks", action=argparse.BooleanOptionalAction, default=CHECKS,
                              help="write the base's yes/no checks (pretrain_checks.json, held-out skill 'check'), "
                                   "which its sixth phase trains on (default: %(default)s; opt-in, see BENCHMARKS.md)")
    synth_parser.add_argument("--record-scale", dest="record_scales", action="append", default=[],
                              type=_record_scale, metavar="TASK=K",
                              help="write K times --train-per-task records of training task TASK (repeatable; "
                                   "opt-in, see BENCHMARKS.md: digit_sum=8 lifted it from 0.17-0.27 to 0.63-0.93)")
    base_parser = commands.add_parser("pretrain-base", help="train the tiny base on a suite (cached by content)")
    base_parser.add_argument("--suite", required=True, help="a folder written by cmlora synth")
    base_parser.add_argument("--out", required=True, help="folder to copy the trained base to")
    base_parser.add_argument("--steps", type=int, default=None,
                             help="stage 1 optimizer steps on the conversations (default: the recipe's)")
    base_parser.add_argument("--focus-steps", type=int, default=None,
                             help="stage 1 optimizer steps on the colour-of-a-shape questions alone, after the "
                                  "conversations (default: the recipe's)")
    base_parser.add_argument("--locate-steps", type=int, default=None,
                             help="stage 1 optimizer steps on the where-is questions alone, projector trained, "
                                  "after the questions phase (default: the recipe's)")
    base_parser.add_argument("--settle-steps", type=int, default=None,
                             help="stage 1 optimizer steps on all single questions again, after the locate phase "
                                  "(default: the recipe's)")
    base_parser.add_argument("--check-steps", type=int, default=None,
                             help="stage 1 optimizer steps on the yes/no checks of pretrain_checks.json, with as "
                                  "many single questions, last (default: the recipe's; 0 skips the phase)")
    base_parser.add_argument("--question-steps", type=int, default=None,
                             help="stage 1 optimizer steps on all single questions, balanced by kind, after the "
                                  "focus phase (default: the recipe's)")
    base_parser.add_argument("--vision-steps", type=int, default=None,
                             help="stage 0 (vision tower) optimizer steps (default: the recipe's)")
    base_parser.add_argument("--knowledge-repeats", type=int, default=None,
                             help="mix the facts of the world the knowledge tasks need (cmlora.synth.knowledge) "
                                  "into stage 1's text, each this many times (default: the recipe's, 0)")
    base_parser.add_argument("--fold-case", action=argparse.BooleanOptionalAction, default=None,
                             help="a tokenizer that reads prose as the plain questions ('Is the circle red?' as "
                                  "'is the circle red ?'; default: the recipe's, on; --no-fold-case for the cased "
                                  "tokenizer of the bases before it, see BENCHMARKS.md)")
    base_parser.add_argument("--seed", type=int, default=0)
    base_parser.add_argument("--no-cache", action="store_true",
                             help="train even if the cache or the shipped base holds this base")
    eval_parser = commands.add_parser("eval", help="zero-shot evaluation: MME and the <task>.jsonl datasets")
    add_model_source(eval_parser)
    eval_parser.add_argument("--mme", help="MME folder (official release layout or <subtask>.jsonl files)")
    eval_parser.add_argument("--tasks", help="folder of <task>.jsonl files {unique_id, image_path, prompt, target}")
    eval_parser.add_argument("--heldout", help="Vision-Flan-format file of held-out single-question records of the "
                             "training tasks (e.g. suite/train_eval.json): exact-match accuracy per task")
    eval_parser.add_argument("--heldout-images", help="image folder of --heldout (default: the file's folder)")
    eval_parser.add_argument("--blank-images", action="store_true",
                             help="text-only baseline: replace every image by a black one of its size")
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
    compare_parser.add_argument("--at-least", type=float, default=None, metavar="FRACTION",
                                help="also count the held-out tasks whose accuracy reaches FRACTION (e.g. 0.8)")
    interference_parser = commands.add_parser("interference", help="task interference matrices (method.md 5)")
    add_model_source(interference_parser, fresh=("lora", "mixlora"))
    interference_parser.add_argument("--data", required=True, help="training records (JSON or JSONL)")
    interference_parser.add_argument("--image-folder", help="folder the records' image paths are in")
    interference_parser.add_argument("--tasks", help="comma-separated task names (default: all in --data)")
    interference_parser.add_argument("--layers", default="first,mid,last", help="blocks: indices or first/mid/last")
    interference_parser.add_argument("--batches", type=int, default=4, help="batches per task")
    interference_parser.add_argument("--batch-size", type=int, default=8)
    interference_parser.add_argument("--lam", type=float, default=1e-3, help="step length in parameter units")
    interference_parser.add_argument("--first-order-only", action="store_true", help="skip the exact form")
    interference_parser.add_argument("--out", help="output folder (default: RUN/analysis/interference)")
    routes_parser = commands.add_parser("routes", help="factor-selection patterns of a MixLoRA model per task")
    add_model_source(routes_parser, fresh=("mixlora", "lora"))
    routes_parser.add_argument("--num-factors", type=int, default=16, help="--fresh: factors per pool (E)")
    routes_parser.add_argument("--rank", type=int, default=4, help="--fresh: factors selected per instance (r)")
    routes_parser.add_argument("--routing", default="ifs+cfs", help="--fresh: MixLoRA routing")
    routes_parser.add_argument("--data", required=True, help="records of the seen (training) tasks")
    routes_parser.add_argument("--unseen", help="records of unseen tasks")
    routes_parser.add_argument("--image-folder", help="folder of --data's images (default: the file's folder)")
    routes_parser.add_argument("--unseen-image-folder", help="folder of --unseen's images")
    routes_parser.add_argument("--tasks", help="comma-separated seen tasks (default: all in --data)")
    routes_parser.add_argument("--unseen-tasks", help="comma-separated unseen tasks (default: all in --unseen)")
    routes_parser.add_argument("--layers", default="0,mid,last", help="transformer blocks: indices or first/mid/last")
    routes_parser.add_argument("--module", help="adapted module per block, e.g. v_proj (default: the first one)")
    routes_parser.add_argument("--batches", type=int, default=4, help="batches per task")
    routes_parser.add_argument("--batch-size", type=int, default=8)
    routes_parser.add_argument("--max-length", type=int, default=1024)
    routes_parser.add_argument("--min-share", type=float, default=0.05,
                               help="a task uses a factor selected by at least this share of its instances")
    routes_parser.add_argument("--collapse-threshold", type=float, default=0.9,
                               help="flag a layer whose r most selected factors take this share of selections")
    routes_parser.add_argument("--seed", type=int, default=0)
    routes_parser.add_argument("--out", help="output folder (default: RUN/analysis/routes, or ./analysis/routes)")
    args, rest = parser.parse_known_args(argv)
    if args.command != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "tiny-model":
        from .vlm import TinySpec, tiny

        print(f"[cmlora] tiny LLaVA written to {tiny(args.out, TinySpec(seed=args.seed))}")
    if args.command == "synth":
        from .synth import write_suite

        options = {k: v for k, v in vars(args).items() if k not in ("command", "out", "seed")}
        options["record_scales"] = dict(options["record_scales"])
        manifest = write_suite(args.out, args.seed, **options)
        print(f"[cmlora] suite written to {args.out}: {manifest['train_records']} training records, "
              f"{len(manifest['train_tasks'])} tasks, {len(manifest['eval_tasks'])} eval files, MME in {args.out}/mme")
    if args.command == "pretrain-base":
        import dataclasses
        import json

        from .synth.base import BASE_SPEC, PretrainConfig, pretrain_base
        from .synth.vision import VisionPretrainConfig

        vision = VisionPretrainConfig(seed=args.seed, **({"steps": args.vision_steps} if args.vision_steps else {}))
        overrides = {name: getattr(args, name) for name in ("steps", "focus_steps", "locate_steps", "settle_steps",
                                                            "check_steps", "question_steps", "knowledge_repeats")
                     if getattr(args, name) is not None}
        if args.fold_case is not None:
            overrides["spec"] = dataclasses.replace(BASE_SPEC, fold_case=args.fold_case)
        config = PretrainConfig(seed=args.seed, vision=vision, **overrides)
        out = pretrain_base(args.suite, args.out, config, use_cache=not args.no_cache)
        skills = json.loads((out / "base_eval.json").read_text())["skills"]
        print(f"[cmlora] base written to {out}; held-out accuracy: "
              + ", ".join(f"{name} {value['accuracy']:.3f}" for name, value in skills.items()))
    if args.command == "eval":
        from .evaluation.cli import run_eval

        run_eval(args)
    if args.command == "compare":
        from .evaluation.runner import compare

        print(compare(args.runs, args.at_least), end="")
    if args.command == "interference":
        from .analysis.interference import run_from_args

        run_from_args(args)
    if args.command == "routes":
        from .analysis.routes import run_routes

        run_routes(args)
    if args.command == "train":
        from .train import load_config, train

        config = load_config(args.config, parse_overrides(rest))
        run_dir = train(config, resume=args.resume)
        if os.environ.get("RANK", "0") == "0":  # one line per run, not per torchrun process
            print(f"[cmlora] run saved to {run_dir}")
        end_process_group()
    return 0


if __name__ == "__main__":
    run()
