"""Training-step throughput of a tiny LLaVA: PEFT LoRA r vs MixLoRA (E=32, same r), alternated in one run.

    python benchmarks/train_step.py                 # prints JSON
    python benchmarks/train_step.py --reps 20 --r 4

One step = forward with labels + backward + AdamW step on one batch (right-padded rows of image tokens + text,
labels on the last quarter of each row), for a tiny LLaVA written by `cmlora.vlm.tiny` (sizes below). The two
models are built from the same base weights; each round times one step of each, in alternating order, and the
median step time gives tokens per second (non-padding tokens per batch / step time). Target (issue #3):
MixLoRA >= 0.95 x LoRA tokens/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time

import peft
import torch

import cmlora
from cmlora import vlm


def build_models(model_dir: str, r: int, num_factors: int) -> dict[str, torch.nn.Module]:
    models = {}
    for name in ("lora", "mixlora"):
        model, _ = vlm.load(model_dir)
        targets = vlm.mixlora_targets(model)
        if name == "lora":
            config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, **targets)
        else:
            config = cmlora.MixLoraConfig(num_factors=num_factors, r=r, lora_dropout=0.05, **targets)
        models[name] = peft.get_peft_model(model, config).train()
    return models


def make_batch(model: torch.nn.Module, batch: int, text_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    image_tokens = config.image_seq_length
    lengths = torch.randint(text_len // 2, text_len + 1, (batch,), generator=generator)
    width = image_tokens + int(lengths.max())
    ids = torch.full((batch, width), config.text_config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, length in enumerate(lengths.tolist()):
        text = torch.randint(10, config.text_config.vocab_size - 10, (length,), generator=generator)
        text[text == config.image_token_index] = 11
        ids[row, :image_tokens] = config.image_token_index
        ids[row, image_tokens:image_tokens + length] = text
        mask[row, :image_tokens + length] = 1
        answer = max(1, length // 4)
        labels[row, image_tokens + length - answer:image_tokens + length] = text[-answer:]
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--num-factors", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--text-hidden", type=int, default=128)
    parser.add_argument("--text-layers", type=int, default=4)
    args = parser.parse_args()

    spec = vlm.TinySpec(text_hidden=args.text_hidden, text_layers=args.text_layers, intermediate=4 * args.text_hidden)
    with tempfile.TemporaryDirectory() as folder:
        vlm.tiny(folder, spec)
        models = build_models(folder, args.r, args.num_factors)
    batch = make_batch(models["lora"], args.batch, args.text_len)
    tokens = int(batch["attention_mask"].sum())
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for name, m in models.items()}

    def step(name: str) -> float:
        start = time.perf_counter()
        loss = models[name](**batch).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for rep in range(args.warmup + args.reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            elapsed = step(name)
            if rep >= args.warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    throughput = {name: tokens / seconds for name, seconds in median.items()}
    ratio = throughput["mixlora"] / throughput["lora"]
    print(json.dumps({
        "benchmark": "tiny LLaVA training step (forward + backward + AdamW), tokens/s",
        "environment": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "torch": torch.__version__, "peft": peft.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "config": {**vars(args), "tokens_per_batch": tokens,
                   "parameters": sum(p.numel() for p in models["lora"].parameters())},
        "median_step_s": median,
        "tokens_per_s": throughput,
        "mixlora_over_lora_tokens_per_s": round(ratio, 4),
        "target": {"value": round(ratio, 4), "target": ">= 0.95", "met": ratio >= 0.95},
    }, indent=2))


if __name__ == "__main__":
    main()
