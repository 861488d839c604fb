"""`cmlora eval`: load the model a run (or a base + adapter) names, then evaluate it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import nn

from .generate import GenerationSettings, model_fingerprint
from .runner import evaluate


def load_for_eval(args: argparse.Namespace) -> tuple[nn.Module, Any, str, str, Path]:
    """Model, processor, template, model id and default output folder for the eval command's arguments."""
    from peft import PeftModel

    from .. import vlm
    from ..train import load_config, load_run, resolve_template

    if args.run:
        run = Path(args.run)
        model, processor = load_run(run)
        config = load_config(run / "config.yaml")
        weights = [run / ("model" if config.adapter == "full" else "adapter")]
        if config.adapter != "full" and Path(config.model).is_dir():
            weights.append(Path(config.model))
        template = args.template or config.template
        return model, processor, resolve_template(template, model, processor), _model_id(run, weights), run / "eval"
    model, processor = vlm.load(args.base)
    weights = [Path(args.base)] if Path(args.base).is_dir() else []
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
        weights.append(Path(args.adapter))
    model_id = _model_id(Path(args.adapter or args.base), weights)
    return model.eval(), processor, resolve_template(args.template or "auto", model, processor), model_id, Path("eval")


def _model_id(name: Path, weights: list[Path]) -> str:
    return f"{name.resolve() if name.exists() else name}#{model_fingerprint(*weights)}"


def run_eval(args: argparse.Namespace) -> dict:
    if not args.mme and not args.tasks and not args.heldout:
        raise SystemExit("cmlora eval: give --mme, --tasks, --heldout or several")
    model, processor, template, model_id, default_out = load_for_eval(args)
    settings = GenerationSettings(batch_size=args.batch_size, do_sample=args.sample, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed, template=template,
                                  blank_images=args.blank_images)
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    out = Path(args.out) if args.out else default_out
    scores = evaluate(model, processor, out, mme_dir=Path(args.mme) if args.mme else None,
                      tasks_dir=Path(args.tasks) if args.tasks else None, only=only, settings=settings,
                      model_id=model_id, overwrite=args.overwrite, heldout=args.heldout,
                      heldout_images=args.heldout_images)
    print((out / "table.md").read_text(), end="")
    if "heldout" in scores:
        print("held-out training tasks (exact match): " + ", ".join(
            f"{task} {value['accuracy']:.3f}" for task, value in scores["heldout"].items()))
    print(f"[cmlora] scores written to {out / 'scores.json'}")
    return scores
