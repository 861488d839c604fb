"""The records' check before training (`InstructionDataset.validate`): one process against worker processes.

    python benchmarks/validate.py --records 400 --workers 0 2          # LLaVA-1.5's image preprocessing
    python benchmarks/validate.py --model runs/suite-base --data suite/train.json --image-folder suite/images \
        --template plain --max-length 128 --records 4000 --workers 0 2 --keep-encoded      # the suite's config

Without `--model`, a tiny LLaVA whose processor preprocesses images as LLaVA-1.5's does (shortest edge resized to
336, centre crop 336 x 336, patch 14: 576 image tokens) checks `--records` records, each a 640 x 480 JPEG with a
question and an answer in the vicuna_v1 template: the per-record work of checking LLaVA-format data, the language
model's size aside (validate runs no model). `validate(workers=0)` is the baseline, timed in the same run on the
same records; rounds alternate between the settings and each setting's best round counts. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cmlora import vlm
from cmlora.data import InstructionDataset, load_records


def llava_1_5_shaped(out: Path) -> Path:
    """A tiny LLaVA saved with LLaVA-1.5's image preprocessing (the model itself stays tiny)."""
    model_dir = vlm.tiny(out)
    config_path = model_dir / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"].update(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    config["patch_size"] = 14
    config_path.write_text(json.dumps(config, indent=2))
    return model_dir


def photo_records(folder: Path, count: int) -> Path:
    """`count` records, each a 640 x 480 JPEG (a gradient with noise, so that it compresses like a photo)."""
    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 640)[None, :, None]
    rows = []
    for index in range(count):
        pixels = (rng.random((480, 640, 3)) * 50 + ramp).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{index}.jpg", quality=90)
        rows.append({"id": str(index), "image": f"{index}.jpg", "task_name": "describe", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown in this picture? Describe it briefly."},
            {"from": "gpt", "value": "A gradient with some noise on it."}]})
    data = folder / "train.json"
    data.write_text(json.dumps(rows))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved VLM; default: a tiny LLaVA with LLaVA-1.5's image preprocessing")
    parser.add_argument("--data", help="records to check (default: --records synthetic 640 x 480 JPEG records)")
    parser.add_argument("--image-folder")
    parser.add_argument("--template", default="vicuna_v1")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep-encoded", action="store_true", help="keep the items (workers send them back)")
    args = parser.parse_args()
    if args.workers[0] != 0:
        raise SystemExit("--workers: the first setting is the baseline and must be 0")

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or llava_1_5_shaped(Path(scratch) / "model")
        data = args.data or photo_records(Path(scratch) / "data", args.records)
        records, _ = load_records(data, args.image_folder or (None if args.data else Path(data).parent / "images"))
        records = records[: args.records]
        _, processor = vlm.load(model_dir)
        best = {workers: float("inf") for workers in args.workers}
        lengths = {}
        for _ in range(args.rounds):
            for workers in args.workers:
                dataset = InstructionDataset(records, processor, template=args.template, max_length=args.max_length,
                                             keep_encoded=args.keep_encoded)
                start = time.perf_counter()
                dataset.validate(workers=workers)
                best[workers] = min(best[workers], time.perf_counter() - start)
                lengths[workers] = dataset.lengths
        if any(found != lengths[0] for found in lengths.values()):
            raise SystemExit("the settings measured different record lengths")
    baseline = best[0]
    print(json.dumps({
        "records": len(records), "keep_encoded": args.keep_encoded,
        "tokens_per_record": round(sum(lengths[0]) / len(lengths[0]), 1),
        "model": args.model or "tiny LLaVA, LLaVA-1.5 image preprocessing (336 px, 576 image tokens)",
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "settings": [{"workers": workers, "seconds": round(best[workers], 3),
                      "ms_per_record": round(1e3 * best[workers] / len(records), 2),
                      "speedup_over_one_process": round(baseline / best[workers], 3)} for workers in args.workers],
    }, indent=2))


if __name__ == "__main__":
    main()
