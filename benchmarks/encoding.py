"""Encoding one training record (`InstructionDataset.encode`) against the processor call inside it, per record.

    python benchmarks/encoding.py --data suite/train.json --image-folder suite/images --model runs/suite-base

`encode` = the processor call (image preprocessing, marker expansion, tokenization) + the tokenizer's own encoding
of the text that places the labels + the label alignment. The baseline, timed in the same run on the same records,
is the processor call alone, so the ratio is what labelling adds. Best of `--repeats` passes over `--records`
records. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from cmlora import vlm
from cmlora.data import InstructionDataset, load_records
from cmlora.data.templates import TEMPLATES


def best_seconds(function, items, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--image-folder")
    parser.add_argument("--model", required=True)
    parser.add_argument("--template", default="plain")
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    records, _ = load_records(args.data, args.image_folder)
    records = records[: args.records]
    _, processor = vlm.load(args.model)
    dataset = InstructionDataset(records, processor, template=args.template)

    def processor_call(record):
        inputs = {"text": TEMPLATES[args.template](record.conversations, processor).text, "return_tensors": "pt"}
        if record.image is not None:
            inputs["images"] = [dataset._load_image(record)]
        return processor(**inputs)

    for record in records[:50]:  # warm-up
        dataset.encode(record)
    baseline = best_seconds(processor_call, records, args.repeats)
    encode = best_seconds(dataset.encode, records, args.repeats)
    print(json.dumps({"records": len(records), "machine": platform.processor() or platform.machine(),
                      "processor_call_ms_per_record": round(1e3 * baseline / len(records), 3),
                      "encode_ms_per_record": round(1e3 * encode / len(records), 3),
                      "encode_over_processor_call": round(encode / baseline, 3)}, indent=2))


if __name__ == "__main__":
    main()
