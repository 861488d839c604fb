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


def assert_packed_training_gives_the_padded_weights(model_dir, tmp_path: Path, adapter: str) -> Path:
    """Three steps of `adapter` (lora, mixlora) on the same records with pack_sequences off and on, in the model's
    chat template: the saved adapters hold the same weights. Returns the packed run."""
    from safetensors.torch import load_file

    from cmlora.train import TrainConfig, train

    from .synthetic_data import write_records

    data = write_records(tmp_path / "data", count=8)
    runs = {pack: train(TrainConfig(
        model=str(model_dir), data=str(data), image_folder=str(data.parent / "images"),
        output_dir=str(tmp_path / f"run-{pack}"), adapter=adapter, template="chat", max_length=256, num_factors=8,
        r=2, lora_dropout=0.0, learning_rate=1e-3, batch_size=4, max_steps=3, logging_steps=1, save_steps=100,
        use_cpu=True, seed=3, pack_sequences=pack)) for pack in (False, True)}
    padded, packed = (load_file(runs[pack] / "adapter" / "adapter_model.safetensors") for pack in (False, True))
    assert padded.keys() == packed.keys() and len(padded) > 0
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], atol=1e-4, rtol=1e-3, msg=name)
    return runs[True]


def assert_packed_batch_is_the_padded_batch(model, pad_token_id: int, items: list) -> dict:
    """Packed into rows three items wide, `items` (records of a model with one position per token) give the padded
    batch's loss and gradients in fewer rows; with positions that run on through a row, the items would attend to
    each other and the loss moves (the check can fail). Returns the packed batch."""
    from cmlora.data import InstructionCollator

    padded = InstructionCollator(pad_token_id, task_ids_key=None)(items)
    packed = InstructionCollator(pad_token_id, task_ids_key=None,
                                 pack_width=max(len(item["input_ids"]) for item in items) * 3)(items)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    positions = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    results = losses_and_gradients(model, {"padded": padded, "packed": packed,
                                           "leaking": {**packed, "position_ids": positions}})
    assert_same_loss_and_gradients(results["packed"], results["padded"])
    assert abs(results["leaking"][0] - results["padded"][0]) > 1e-4
    return packed


def assert_each_row_is_its_item_alone(model, collate, items, batch_logits) -> None:
    """Right padding + causal attention: each row's logits over its item equal the item's collated alone."""
    for row, item in enumerate(items):
        alone = collate([item])
        alone.pop("mixlora_task_ids", None)
        length = len(item["input_ids"])
        torch.testing.assert_close(batch_logits[row, :length], model(**alone).logits[0], atol=1e-4, rtol=1e-4)


def assert_same_loss_and_gradients(result, expected) -> None:
    (loss, gradients), (expected_loss, expected_gradients) = result, expected
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert len(gradients) == len(expected_gradients) > 0
    for gradient, expected_gradient in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(gradient, expected_gradient, atol=1e-5, rtol=1e-4)
