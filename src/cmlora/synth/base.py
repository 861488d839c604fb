"""The tiny pretrained base: a from-scratch LLaVA taught to link what it sees to words (LLaVA's stage 1 role).

`pretrain_base(suite_dir, out_dir)` builds a tiny LLaVA whose tokenizer is trained on the suite's texts, trains
every weight (vision tower, projector, language model) on the suite's `pretrain.json` (several question/answer
pairs and a description per image, every answer supervised), measures held-out accuracy per skill on
`pretrain_eval.json`, and saves the model in Hugging Face format with `base_eval.json` beside it. The recipe is
the one two studies on a 2-core CPU found to work (shared/platform-notes.md): patch-aligned cells, dense
supervision, AdamW lr 2e-3, betas (0.9, 0.98), weight decay 0.01, clipping 1.0, batch 32, 5 % warm-up, cosine
decay to 5 %. Results are cached by a content hash of the suite's files, the recipe and the code version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__, vlm
from ..data import InstructionCollator, InstructionDataset, load_records
from ..data.records import IMAGE_MARKER

# Part of the cache key: bump it whenever the recipe's code changes what a base learns (template, loop, eval).
RECIPE_VERSION = 2
BASE_SPEC = vlm.TinySpec(image_size=32, patch_size=16, vision_hidden=96, vision_layers=2, vision_heads=4,
                         vision_intermediate=384, text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2,
                         intermediate=384, vocab_size=1024, vision_feature_layer=-1)


@dataclass
class PretrainConfig:
    steps: int = 5000
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


def cache_dir() -> Path:
    return Path(os.environ.get("CMLORA_CACHE", Path.home() / ".cache" / "cmlora"))


def content_hash(suite: Path, config: PretrainConfig) -> str:
    digest = hashlib.sha256()
    for name in ("pretrain.json", "pretrain_eval.json", "manifest.json"):
        digest.update(name.encode())
        digest.update((suite / name).read_bytes())
    digest.update(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    digest.update(f"{__version__}/{RECIPE_VERSION}".encode())
    return digest.hexdigest()[:16]


def _lr_factor(step: int, total: int, warmup_ratio: float, final_ratio: float) -> float:
    warmup = max(1, int(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _corpus(suite: Path) -> list[str]:
    texts = []
    for name in ("pretrain.json", "train.json"):
        path = suite / name
        if path.exists():
            for record in json.loads(path.read_text()):
                texts += [turn["value"] for turn in record["conversations"]]
    return texts


def train_base(suite: Path, out: Path, config: PretrainConfig, log_every: int = 200) -> dict[str, Any]:
    """Build and train the base in `out`; returns training statistics."""
    torch.manual_seed(config.seed)
    vlm.tiny(out, config.spec, corpus=_corpus(suite))
    model, processor = vlm.load(out)
    records, _ = load_records(suite / "pretrain.json", suite / "images")
    dataset = InstructionDataset(records, processor, template="plain", max_length=config.max_length)
    items = [dataset[i] for i in tqdm(range(len(dataset)), desc="encoding", unit="rec")]
    tokenizer = processor.tokenizer
    collate = InstructionCollator(tokenizer.pad_token_id, task_ids_key=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=config.betas,
                                  weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    model.train()
    start, losses = time.time(), []
    for step in tqdm(range(config.steps), desc="pretraining", unit="step"):
        if len(order) < config.batch_size:
            order += torch.randperm(len(items), generator=generator).tolist()
        batch = collate([items[i] for i in order[: config.batch_size]])
        del order[: config.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * _lr_factor(step, config.steps, config.warmup_ratio,
                                                            config.final_lr_ratio)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            tqdm.write(f"step {step + 1}: loss {sum(losses[-log_every:]) / log_every:.4f}")
    model.save_pretrained(out)
    return {"steps": config.steps, "seconds": round(time.time() - start, 1), "final_loss": losses[-1],
            "mean_loss_last_100": sum(losses[-100:]) / len(losses[-100:])}


@torch.no_grad()
def evaluate_base(model: Any, processor: Any, eval_file: Path, image_folder: Path,
                  batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Held-out accuracy per skill (task_name): greedy answer == target after lowercasing and stripping.

    Answers come from the evaluation's batched generation (left padding, new tokens only), prompted in the
    pretraining template.
    """
    from ..evaluation.generate import GenerationSettings, batches, generate_answers
    from ..evaluation.inputs import EvalExample
    from ..evaluation.tasks import TaskSpec

    records, _ = load_records(eval_file, image_folder)
    examples = [EvalExample(uid=r.id, task=r.task_name or "unknown", image=r.image,
                            prompt=r.conversations[0].text.replace(IMAGE_MARKER, "").strip(),
                            target=r.conversations[1].text, source=r.source) for r in records]
    spec, settings = TaskSpec("vqa", max_new_tokens=8), GenerationSettings(template="plain")
    model.eval()
    correct: dict[str, list[int]] = {}
    for chunk in batches(examples, batch_size):
        for example, answer in zip(chunk, generate_answers(model, processor, chunk, spec, settings), strict=True):
            correct.setdefault(example.task, []).append(int(answer.lower() == str(example.target).strip().lower()))
    return {skill: {"accuracy": sum(v) / len(v), "count": len(v)} for skill, v in sorted(correct.items())}


def pretrain_base(suite_dir: str | Path, out_dir: str | Path, config: PretrainConfig | None = None,
                  use_cache: bool = True) -> Path:
    """The pretrained base for a suite, trained once per content hash and copied to `out_dir`."""
    suite, out = Path(suite_dir), Path(out_dir)
    config = config or PretrainConfig()
    key = content_hash(suite, config)
    cached = cache_dir() / "bases" / key
    if not (use_cache and (cached / "base_eval.json").exists()):
        staging = cached.with_name(f".{key}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        stats = train_base(suite, staging, config)
        model, processor = vlm.load(staging)
        skills = evaluate_base(model, processor, suite / "pretrain_eval.json", suite / "images",
                               config.eval_batch_size)
        report = {"key": key, "training": stats, "skills": skills, "config": asdict(config)}
        (staging / "base_eval.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        shutil.rmtree(cached, ignore_errors=True)
        staging.rename(cached)
    if out.resolve() != cached.resolve():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(cached, out)
    return out

