"""Stage 0 of the tiny base: the vision tower, pretrained as a per-cell classifier (the role CLIP plays for LLaVA).

A tiny vision tower trained from scratch only through the language model's loss learns what is in a cell very
slowly: measured on this suite (2 CPU cores, 1,500 steps of joint training), shape, colour-of-shape and position
stayed at chance while the same tower, given the labels directly, reaches 0.98 on shapes in 250 steps. So the
base is built the way LLaVA's is: first a vision encoder that already separates what it sees, then a stage that
teaches the projector and the language model to talk about it.

Every image of the suite comes with its scene (`scenes.jsonl`), and with the suite's patch-aligned grid each
patch token of the tower sees exactly one cell. Linear heads on those patch tokens (the features LLaVA's projector
receives: `vision_feature_layer`, without the CLS token) predict, per cell, its content (empty, one of the shapes,
a digit, a letter), colour, size and which cell it is (so that the features say where they are: the language
model's rotary positions only tell how far back an image token lies, not which cell it holds), and from the mean
of the cells the image's style. The heads are thrown away; the tower is kept.

Stage 0b points the image tokens at the words for what a cell holds, but not at position words. Measured on
the multi-object images of the held-out set (BENCHMARKS.md): with position words in 0b and the projector trained
on in stage 1, no attention head looked an object up by its attributes, and "what shape is the red object ?" was
answered right about once per number of objects (0.42-0.45 after 4,000 steps, three seeds); without position
words and without the cell head, 0.99 after 1,500 steps (one seed; one head of the last layer then puts 0.93 of
its image attention on the object asked about); with the cell head back and the projector frozen in stage 1,
0.94 after 4,000 steps. The cell head is what "where is ... ?" needs (0.56 against 0.23-0.43 without it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .scenes import COLOURS, LETTERS, SHAPES, SIZES, STYLES

CONTENTS = ("empty", *SHAPES, *(f"digit {d}" for d in range(10)), *(f"letter {c}" for c in LETTERS))
IGNORE = -100


@dataclass
class VisionPretrainConfig:
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    align_steps: int = 500  # stage 0b: the projector, aligned with the language model's word embeddings (0: off)
    align_scale: float = 4.0  # the logit of an output equal to a word's embedding (see align_projector)


def content_index(item: dict[str, Any]) -> int:
    if item["kind"] == "shape":
        return CONTENTS.index(item["label"])
    return CONTENTS.index(f"{item['kind']} {item['label']}")


def cell_labels(scenes: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per-cell targets [images, cells] (content, colour, size: IGNORE where undefined; the cell's index) and
    style [images]."""
    cells = scenes[0]["grid"] ** 2
    content = torch.zeros(len(scenes), cells, dtype=torch.long)
    colour = torch.full((len(scenes), cells), IGNORE)
    size = torch.full((len(scenes), cells), IGNORE)
    for row, scene in enumerate(scenes):
        if scene["grid"] ** 2 != cells:
            raise ValueError(f"scene {row} has a {scene['grid']}x{scene['grid']} grid, the others {cells} cells")
        for item in scene["items"]:
            cell = item["row"] * scene["grid"] + item["col"]
            content[row, cell] = content_index(item)
            colour[row, cell] = COLOURS.index(item["colour"])
            if item["kind"] == "shape":
                size[row, cell] = SIZES.index(item["size"])
    style = torch.tensor([STYLES.index(scene["style"]) for scene in scenes])
    cell = torch.arange(cells).expand(len(scenes), cells)
    return {"content": content, "colour": colour, "size": size, "cell": cell, "style": style}


# The suite's image folders a base reads (stage 0 here, stage 1 through pretrain*.json); `base.content_hash` hashes
# their scene lines.
BASE_IMAGE_FOLDERS = ("pretrain", "pretrain_eval")


def scene_lines(suite: Path, folders: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each line of scenes.jsonl (as written) with its parsed row, for the images under `images/<folder>/` of any
    of `folders`; a line that is not a scene raises ValueError naming the file and line."""
    prefixes = tuple(f"images/{folder}/" for folder in folders)
    with open(suite / "scenes.jsonl", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            try:
                row = json.loads(line)
                wanted = row["image"].startswith(prefixes)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{suite / 'scenes.jsonl'}:{line_number}: not a scene line ({error!r})") from None
            if wanted:
                yield line, row


def load_part(suite: Path, folder: str, image_processor: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel values (through the model's own image processor) and cell labels of the suite's images whose path
    starts with `images/<folder>/`."""
    from PIL import Image

    rows = [row for _line, row in scene_lines(suite, (folder,))]
    if not rows:
        raise ValueError(f"{suite / 'scenes.jsonl'}: no scene of an image under images/{folder}/")
    images = []
    for row in rows:
        with Image.open(suite / row["image"]) as image:
            images.append(image.convert("RGB"))
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixels, cell_labels([row["scene"] for row in rows])


def cell_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch tokens LLaVA's projector receives ([images, cells, vision hidden]), CLS token dropped."""
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"stage 0 needs one vision_feature_layer, got {layer!r}")
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:]


class CellHeads(nn.Module):
    def __init__(self, width: int, cells: int) -> None:
        super().__init__()
        self.cell = nn.Linear(width, cells)
        self.content = nn.Linear(width, len(CONTENTS))
        self.colour = nn.Linear(width, len(COLOURS))
        self.size = nn.Linear(width, len(SIZES))
        self.style = nn.Linear(width, len(STYLES))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"content": self.content(features), "colour": self.colour(features), "size": self.size(features),
                "cell": self.cell(features), "style": self.style(features.mean(1))}


def _loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(F.cross_entropy(logits[name].flatten(0, -2), labels[name].flatten(), ignore_index=IGNORE)
               for name in logits)


@torch.no_grad()
def accuracy(model: Any, heads: CellHeads, pixels: torch.Tensor,
             labels: dict[str, torch.Tensor], batch_size: int = 512) -> dict[str, float]:
    """Held-out accuracy: content per kind of cell (empty, shape, digit, letter), colour, size, cell, style."""
    logits: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(pixels), batch_size):
        for name, value in heads(cell_features(model, pixels[start:start + batch_size])).items():
            logits.setdefault(name, []).append(value.argmax(-1))
    predicted = {name: torch.cat(values) for name, values in logits.items()}
    content = labels["content"]
    kinds = {"empty": content == 0, "shape": (content >= 1) & (content <= len(SHAPES)),
             "digit": (content > len(SHAPES)) & (content <= len(SHAPES) + 10), "letter": content > len(SHAPES) + 10}
    result = {}
    for kind, mask in kinds.items():
        if mask.any():
            result[kind] = (predicted["content"] == content)[mask].float().mean().item()
    for name in ("colour", "size", "cell", "style"):
        mask = labels[name] != IGNORE
        if mask.any():
            result[name] = (predicted[name] == labels[name])[mask].float().mean().item()
    return {name: round(value, 4) for name, value in result.items()}


def word_vectors(model: Any, tokenizer: Any, words: list[str]) -> torch.Tensor:
    """Each word's input embedding as it occurs after a space: the mean of its tokens' embeddings, leaving out a
    lone space token (a vocabulary without " no" writes it as " " + "no")."""
    table = model.get_input_embeddings().weight.detach()
    vectors = []
    for word in words:
        ids = tokenizer(f" {word}", add_special_tokens=False).input_ids
        kept = [i for i in ids if tokenizer.decode([i]).strip()] or ids
        vectors.append(table[kept].mean(0))
    return torch.stack(vectors)


def align_projector(model: Any, tokenizer: Any, pixels: torch.Tensor, labels: dict[str, torch.Tensor],
                    config: VisionPretrainConfig) -> dict[str, Any]:
    """Stage 0b: train the projector so that each image token points at the words for its cell's content, colour
    and size in the language model's (frozen, freshly initialised) input embeddings; not at position words (see
    the module's docstring).

    Per attribute, logits = scale * <token, word vector> over that attribute's words, with scale chosen so that
    a token equal to a word's embedding scores `align_scale`; cross-entropy on the cell's labels. This is the job
    of LLaVA's stage 1 (visual tokens mapped into the word-embedding space), done with the labels the suite has.
    Measured on the suite (one seed): "what shape is the red object ?" went from 0.41 to 0.96 after 1,000 steps
    of stage 1.

    The projector keeps only part of what the tower knows about place: a linear probe reads the cell off 0.72
    of the occupied image tokens of a trained base (off the tower's features: 1.00). Keeping it all (a cell head
    on the tokens, trained beside the projector) made "where is ... ?" worse, not better: 0.74 -> 0.45 on seed
    0, colour-of-shape 0.92 -> 0.73 (BENCHMARKS.md), the same way position words did.
    """
    words = {"content": [*SHAPES, *(str(d) for d in range(10)), *LETTERS], "colour": list(COLOURS),
             "size": list(SIZES)}
    vectors = {name: word_vectors(model, tokenizer, values) for name, values in words.items()}
    table = model.get_input_embeddings().weight.detach()
    scale = config.align_scale / (table.var().item() * table.shape[1])
    targets = {"content": torch.where(labels["content"] == 0, IGNORE, labels["content"] - 1),
               "colour": labels["colour"], "size": labels["size"]}
    with torch.no_grad():
        features = torch.cat([cell_features(model, pixels[i:i + 1024]) for i in range(0, len(pixels), 1024)])
    projector = model.model.multi_modal_projector
    optimizer = torch.optim.AdamW(projector.parameters(), lr=config.learning_rate, betas=(0.9, 0.98),
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 1)
    start, losses = time.time(), []
    for _ in tqdm(range(config.align_steps), desc="projector alignment", unit="step"):
        index = torch.randint(0, len(features), (config.batch_size,), generator=generator)
        tokens = projector(features[index])
        loss = sum(F.cross_entropy((scale * tokens @ vectors[name].T).flatten(0, 1), targets[name][index].flatten(),
                                   ignore_index=IGNORE) for name in words)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"steps": config.align_steps, "seconds": round(time.time() - start, 1),
            "mean_loss_last_100": sum(losses[-100:]) / max(1, len(losses[-100:]))}


def pretrain_vision(model: Any, processor: Any, suite: Path, config: VisionPretrainConfig,
                    lr_factor: Any) -> dict[str, Any]:
    """Train `model`'s vision tower on the cells of the suite's pretraining images, then (align_steps > 0) align
    the projector; returns statistics and the tower's held-out accuracy on the pretraining evaluation images."""
    image_processor = processor.image_processor
    pixels, labels = load_part(suite, "pretrain", image_processor)
    cells = labels["content"].shape[1]
    with torch.no_grad():
        tokens = cell_features(model, pixels[:1]).shape[1]
    if tokens != cells:
        raise ValueError(f"the vision tower gives {tokens} patch tokens but the suite's grid has {cells} cells: "
                         "stage 0 needs cells aligned with patches (image size = grid x 16, patch size 16)")
    tower = model.model.vision_tower
    heads = CellHeads(tower.config.hidden_size, cells)
    parameters = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, betas=(0.9, 0.98),
                                  weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    tower.train()
    start, losses = time.time(), []
    for step in tqdm(range(config.steps), desc="vision tower", unit="step"):
        index = torch.randint(0, len(pixels), (config.batch_size,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * lr_factor(step, config.steps)
        loss = _loss(heads(cell_features(model, pixels[index])), {k: v[index] for k, v in labels.items()})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = round(time.time() - start, 1)
    tower.eval()
    tower.requires_grad_(False)
    held_out = accuracy(model, heads, *load_part(suite, "pretrain_eval", image_processor))
    stats = {"steps": config.steps, "seconds": seconds, "mean_loss_last_100": sum(losses[-100:]) / len(losses[-100:]),
             "held_out_accuracy": held_out}
    if config.align_steps:
        stats["alignment"] = align_projector(model, processor.tokenizer, pixels, labels, config)
    tower.requires_grad_(True)
    return stats
