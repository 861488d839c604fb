"""Writing small Vision-Flan-style data files and images for the data tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image


def vf_record(record_id: Any, image: str | None = None, task: str | None = "color",
              turns: tuple[str, ...] = ("<image>\nWhat colour is it?", "red")) -> dict[str, Any]:
    """A Vision-Flan record; turns alternate human, gpt."""
    record: dict[str, Any] = {"id": record_id, "task_name": task, "conversations": [
        {"from": "human" if index % 2 == 0 else "gpt", "value": text} for index, text in enumerate(turns)]}
    if image is not None:
        record["image"] = image
    return record


def text_record(record_id: Any, task: str | None = "chat", question: str = "Say yes.",
                answer: str = "yes") -> dict[str, Any]:
    return vf_record(record_id, None, task, (question, answer))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One row per line; a str row is written verbatim (to plant invalid JSON)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_json(path: Path, rows: list[Any]) -> Path:
    path.write_text(json.dumps(rows, indent=2))
    return path


def save_image(path: Path, colour: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


TWO_TURNS = ("<image>\nWhat colour is it?", "red", "And the shape?", "a blue square")


def mixed_records(folder: Path) -> list:
    """r0: image + two answered turns; r1: text only, task None; r2: another image (another size) and task."""
    from cmlora.data import load_records

    save_image(folder / "a.png", (255, 0, 0), (40, 30))
    save_image(folder / "b.png", (0, 0, 255), (24, 48))
    rows = [vf_record("r0", "a.png", "color", TWO_TURNS), text_record("r1", task=None),
            vf_record("r2", "b.png", "shape", ("<image>\nShape?", "square"))]
    loaded, _ = load_records(write_jsonl(folder / "train.jsonl", rows))
    return loaded


def losses_and_gradients(model, batches: dict[str, dict]) -> dict[str, tuple]:
    """Each batch's training loss and the gradients it gives the model's parameters (in parameter order), the model
    in train mode for the passes and back in eval mode, its gradients cleared, after."""
    results = {}
    model.train()
    try:
        for name, batch in batches.items():
            model.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            results[name] = loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    finally:
        model.zero_grad()
        model.eval()
    return results


def assert_same_loss_and_gradients(result, expected) -> None:
    (loss, gradients), (expected_loss, expected_gradients) = result, expected
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert len(gradients) == len(expected_gradients) > 0
    for gradient, expected_gradient in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(gradient, expected_gradient, atol=1e-5, rtol=1e-4)
