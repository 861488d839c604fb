"""A few Vision-Flan-format records with drawn images, for training tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def write_records(folder: Path, count: int = 16) -> Path:
    """`count` records of two tasks (colour naming, yes/no) over solid-colour images; returns the JSON path."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for index in range(count):
        colour = names[index % len(names)]
        image = f"img{index}.png"
        Image.new("RGB", (32, 32), COLOURS[colour]).save(images / image)
        if index % 2 == 0:
            task, question, answer = "colour", "What colour is the image?", colour
        else:
            asked = names[(index // 2) % len(names)]
            task, question, answer = "yes_no", f"Is the image {asked}?", "yes" if asked == colour else "no"
        records.append({"id": f"r{index}", "image": image, "task_name": task,
                        "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                          {"from": "gpt", "value": answer}]})
    path = folder / "train.json"
    path.write_text(json.dumps(records, indent=1))
    return path
