"""What the analyses share: the model of a run (or a base with a fresh adapter), per-task batches, layer choice."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def block_index(module_name: str) -> int | None:
    """The transformer block of an adapted module ('...language_model.layers.3.self_attn.q_proj' -> 3)."""
    match = _BLOCK.search(module_name)
    return int(match.group(1)) if match else None


def select_layers(spec: str | Sequence[int], available: Sequence[int]) -> list[int]:
    """Block indices from a spec such as "0,mid,last" or "0,5,11" (mid = the middle of the available blocks)."""
    blocks = sorted(set(available))
    if not blocks:
        raise ValueError("the model has no adapted transformer block")
    names = {"first": blocks[0], "mid": blocks[len(blocks) // 2], "last": blocks[-1]}
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen = []
    for item in items:
        key = str(item).strip()
        value = names.get(key, None)
        if value is None:
            if not key.lstrip("-").isdigit():
                raise ValueError(f"layer {key!r}: use block indices or first/mid/last")
            value = int(key) if int(key) >= 0 else blocks[int(key)]
        if value not in blocks:
            raise ValueError(f"layer {value} has no adapter; adapted blocks: {blocks}")
        if value not in chosen:
            chosen.append(value)
    return chosen


@dataclass
class AnalysisModel:
    model: nn.Module
    processor: Any
    template: str
    name: str  # for titles and file names
    task_names: list[str] | None = None  # a run's task vocabulary (the ids MixLoRA's routing='task' was trained on)


def load_analysis_model(run: str | Path | None = None, *, base: str | None = None, adapter: str | None = None,
                        fresh: str | None = None, seed: int = 0, **fresh_options: Any) -> AnalysisModel:
    """The model to analyse: a trained run (`run`), a base with a saved PEFT adapter (`base` + `adapter`), or a
    base with a freshly initialised adapter (`base` + `fresh` = "lora" or "mixlora"; options as in TrainConfig),
    which shows interference at the start of training."""
    from peft import PeftModel

    from .. import vlm
    from ..train import TrainConfig, build_adapter_model, load_config, load_run, resolve_template

    if run is not None:
        model, processor = load_run(run)
        template = load_config(Path(run) / "config.yaml").template
        name = Path(run).name
        vocabulary = Path(run) / "task_names.json"
        task_names = json.loads(vocabulary.read_text()) if vocabulary.exists() else None
        return AnalysisModel(model.eval(), processor, resolve_template(template, model, processor), name, task_names)
    elif base is not None and adapter is not None:
        model, processor = vlm.load(base)
        model = PeftModel.from_pretrained(model, adapter)
        template, name = "auto", Path(adapter).name
    elif base is not None and fresh is not None:
        torch.manual_seed(seed)
        model, processor = vlm.load(base)
        model = build_adapter_model(model, TrainConfig(model=base, adapter=fresh, **fresh_options))
        template, name = "auto", f"fresh-{fresh}"
    else:
        raise ValueError("give a run, or a base with an adapter folder, or a base with fresh='lora'|'mixlora'")
    return AnalysisModel(model.eval(), processor, resolve_template(template, model, processor), name)


def task_batches(analysis: AnalysisModel, data: str | Path, tasks: Sequence[str] | None = None, *,
                 image_folder: str | Path | None = None, batch_size: int = 8, max_batches: int = 4,
                 max_length: int = 1024) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Up to `max_batches` collated batches per task (records in file order), ready for `model(**batch)`.

    Batches carry `mixlora_task_ids`, which MixLoRA models read and other models must not receive (use
    `model_inputs(model, batch)`): a task's index in the run's task vocabulary when the model comes from a run,
    tasks the run never saw numbered after it; else its index in `tasks`.
    """
    from ..data import InstructionCollator, InstructionDataset, load_records

    records, _ = load_records(data, image_folder)
    present = sorted({r.task_name or "unknown" for r in records})
    wanted = list(tasks) if tasks else present
    missing = [t for t in wanted if t not in present]
    if missing:
        raise ValueError(f"{data}: no records of task(s) {missing}; tasks in the file: {present}")
    tokenizer = getattr(analysis.processor, "tokenizer", analysis.processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = InstructionCollator(pad)
    vocabulary = list(analysis.task_names or [])
    vocabulary += [task for task in wanted if task not in vocabulary]
    batches: dict[str, list[dict[str, torch.Tensor]]] = {}
    for task in wanted:
        chosen = [r for r in records if (r.task_name or "unknown") == task][: batch_size * max_batches]
        dataset = InstructionDataset(chosen, analysis.processor, template=analysis.template, max_length=max_length,
                                     task_names=vocabulary)
        items = [dataset[i] for i in range(len(dataset))]
        batches[task] = [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    return batches


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch on the model's device, without the MixLoRA task ids unless the model is a MixLoRA model."""
    from ..model import MixLoraModel

    is_mixlora = any(isinstance(m, MixLoraModel) for m in model.modules())
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items() if is_mixlora or k != "mixlora_task_ids"}


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    return path
