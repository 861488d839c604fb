"""Training-step time with padded batches vs packed rows (`pack_sequences`), on a training set's own records.

    python benchmarks/packing.py --data suite/train.json --image-folder suite/images --model runs/suite-base
    python benchmarks/packing.py ... --replay-data suite/pretrain.json   # as configs/suite_lora.yaml mixes it
    python benchmarks/packing.py ... --adapter mixlora --num-factors 16   # MixLoRA: each packed record routed alone
    python benchmarks/packing.py ... --model QWEN2_VL_FOLDER --template chat   # Qwen2-VL, Qwen2.5-VL: M-RoPE per record

The records (with `--replay-data`, 5 % of them replayed one question per record, as the suite's config does) are
encoded in the given template and cut into random batches; each batch is collated twice, right-padded and packed
into rows of at most `--max-length` tokens. One step = forward with labels + backward + AdamW step of PEFT LoRA
(r, the output layer and the projector trained, as the suite's config), or of MixLoRA (E factors, r selected per
record; packed rows carry the records' segment ids). Each round times one padded and one packed
step on the same batch, in alternating order (AdamW at lr 0, so both see the same weights). Prints JSON: median
step times, their ratio, the tokens per step each form computes, and the largest loss difference between them; and
the collator's median time per batch in each form (Qwen2-VL's and Qwen2.5-VL's packed rows compute each record's
M-RoPE positions there), with the ratio of step + collation.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import random
import statistics
import sys
import time

import peft
import torch

from cmlora import vlm
from cmlora.context import SEGMENT_IDS_KWARG
from cmlora.data import InstructionCollator, InstructionDataset, load_records
from cmlora.train import TrainConfig, build_adapter_model, replay_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--image-folder", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--replay-data", default=None)
    parser.add_argument("--template", default="plain")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--adapter", choices=("lora", "mixlora"), default="lora")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--num-factors", type=int, default=16, help="MixLoRA: factors per pool (E)")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = TrainConfig(model=args.model, data=args.data, image_folder=args.image_folder, adapter=args.adapter,
                         r=args.r, num_factors=args.num_factors,
                         lora_dropout=0.0, train_output_head=True, replay_data=args.replay_data,
                         replay_fraction=0.05, replay_single_turns=True, seed=args.seed)
    model, processor = vlm.load(args.model)
    records, _ = load_records(args.data, args.image_folder)
    if args.replay_data:
        with contextlib.redirect_stdout(sys.stderr):  # its "[cmlora] mixed in ..." line; stdout is the JSON alone
            records += replay_records(config, records)
    random.Random(args.seed).shuffle(records)
    wanted = (args.warmup + args.batches) * args.batch_size
    dataset = InstructionDataset(records[:wanted], processor, template=args.template, max_length=args.max_length)
    model = build_adapter_model(model, config).train()
    # lr 0: AdamW does all its work but leaves the weights, so the two forms of each batch see the same model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    pad = processor.tokenizer.pad_token_id
    segments = SEGMENT_IDS_KWARG if args.adapter == "mixlora" else None
    collate = {"padded": InstructionCollator(pad, task_ids_key=None),
               "packed": InstructionCollator(pad, task_ids_key=None, pack_width=args.max_length,
                                             segment_ids_key=segments, rope_index=vlm.packed_rope_index(model))}

    def step(batch: dict) -> tuple[float, float]:
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item()

    times: dict[str, list[float]] = {name: [] for name in collate}
    tokens: dict[str, list[int]] = {name: [] for name in collate}
    collation: dict[str, list[float]] = {name: [] for name in collate}
    worst_loss_gap = 0.0
    for index in range(args.warmup + args.batches):
        items = [dataset[i] for i in range(index * args.batch_size, (index + 1) * args.batch_size)]
        batches = {}
        for name, fn in collate.items():
            start = time.perf_counter()
            batches[name] = fn(items)
            if index >= args.warmup:
                collation[name].append(time.perf_counter() - start)
        losses = {}
        for name in collate if index % 2 == 0 else list(collate)[::-1]:
            elapsed, losses[name] = step(batches[name])
            if index >= args.warmup:
                times[name].append(elapsed)
                tokens[name].append(batches[name]["input_ids"].numel())
        worst_loss_gap = max(worst_loss_gap, abs(losses["padded"] - losses["packed"]))
    median = {name: statistics.median(values) for name, values in times.items()}
    median_collation = {name: statistics.median(values) for name, values in collation.items()}
    print(json.dumps({
        "benchmark": f"{args.adapter} training step (forward + backward + AdamW), padded batches vs packed rows",
        "environment": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "torch": torch.__version__, "peft": peft.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()},
        "config": vars(args),
        "median_step_s": {name: round(value, 5) for name, value in median.items()},
        "tokens_per_step": {name: round(statistics.mean(values), 1) for name, values in tokens.items()},
        "padded_over_packed_step_time": round(median["padded"] / median["packed"], 3),
        "median_collate_s": {name: round(value, 5) for name, value in median_collation.items()},
        "padded_over_packed_step_and_collate_time": round(
            (median["padded"] + median_collation["padded"]) / (median["packed"] + median_collation["packed"]), 3),
        "largest_loss_difference": worst_loss_gap,
    }, indent=2))


if __name__ == "__main__":
    main()
