"""The unseen evaluation tasks of the synthetic suite: seven dataset analogues and an MME-style benchmark.

None of them is a training task: their instructions, answer formats or combinations of skills differ from
train.json's (VSR: a spatial relation judged true/false; SNLI-VE: yes / no / maybe about a statement, neutral
statements being about what no image can show; CIFAR-10/100: classes that combine size, colour, style and shape;
MNIST: held-out handwritten digits; POPE: existence with POPE's three negative-sampling strategies). They only use
what the training tasks and the base teach: objects, colours, sizes, counts, positions, digits, letters, styles.

Each maker draws from a `Sampler` and returns plain data, (scene, prompt, target) or (scene, yes question, no
question) for MME; `suite.py` renders and writes the files.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .scenes import (
    COLOURS,
    CORE_STYLE_WEIGHTS,
    SHAPES,
    SIZES,
    STYLES,
    VOWELS,
    WORDS,
    Sampler,
    Scene,
    positions,
)
from .train_tasks import CORNERS, NUMBER_WORDS, RELATIONS, WARM, hard_negative, other_than, relations_between

POPE_SPLITS = ("random", "popular", "adversarial")
# Properties no picture shows; each is about one of the training task visible_property's invisible nouns
# (weight, material, temperature, age, price).
NEUTRAL_PROPERTIES = ("heavy", "light", "made of wood", "made of metal", "hot", "cold", "old", "new", "expensive",
                      "cheap")
CIFAR10 = tuple(f"{size} {shape}" for shape in SHAPES for size in SIZES) + ("digit", "letter")
CIFAR100 = tuple(f"{colour} {style} {shape}" for colour in COLOURS for style in STYLES for shape in SHAPES)
YES_NO = " Please answer yes or no."
Example = tuple[Scene, str, "str | list[str]"]


def _core(s: Sampler, low: int = 1) -> Scene:
    return s.shapes(s.count(low), s.style(weights=CORE_STYLE_WEIGHTS))


def _text_vqa(s: Sampler) -> Example:
    scene = s.word(s.style(("filled", "noisy"), (0.8, 0.2)))
    prompt = s.rng.choice(("What does the text in this image say? Reply with the text only.",
                           "Please read out the writing shown in the picture. Give just the text."))
    return scene, prompt, [scene.word(), " ".join(scene.word())]


def _vsr(s: Sampler) -> Example:
    scene = _core(s, 2)
    a, b = s.rng.sample(scene.shapes(), 2)
    truth = relations_between(a, b)
    wanted = s.rng.random() < 0.5 and any(truth.values())
    relation = s.rng.choice([name for name, value in truth.items() if value == wanted])
    statement = f"The {a.colour} {a.label} is {relation} the {b.colour} {b.label}."
    prompt = s.rng.choice(("{} Is this statement about the image true or false? Answer true or false.",
                           "Here is a claim about the picture: {} Reply true if it is correct and false otherwise."))
    return scene, prompt.format(statement), "true" if wanted else "false"


def _snli_ve(s: Sampler) -> Example:
    scene, rng = _core(s), s.rng
    label = rng.choice(("entailment", "neutral", "contradiction"))
    item = rng.choice(scene.shapes())
    thing = f"{item.colour} {item.label}"
    if label == "neutral":  # a property no picture shows, of an object that is there
        hypothesis = f"The {thing} is {rng.choice(NEUTRAL_PROPERTIES)}."
    else:
        true = label == "entailment"
        kind = rng.choice(("exists", "count", "position"))
        if kind == "exists":
            colour, shape = (item.colour, item.label) if true else hard_negative(scene, rng)
            hypothesis = f"There is a {colour} {shape}."
        elif kind == "count":
            n = len(scene.items) if true else rng.choice([m for m in range(1, 5) if m != len(scene.items)])
            hypothesis = "There is exactly one object." if n == 1 else f"There are exactly {NUMBER_WORDS[n]} objects."
        else:
            where = scene.position(item) if true else rng.choice(
                [p for p in positions(scene.grid) if p != scene.position(item)])
            hypothesis = f"The {thing} is at the {where}."
    prompt = (f"Statement: {hypothesis} Does the image show that the statement is true? Answer yes if it does, no "
              "if the image shows that it is false, or maybe if the image cannot tell.")
    return scene, prompt, label


def _cifar10(s: Sampler) -> Example:
    label = s.rng.choice(CIFAR10)
    if label == "digit":
        scene = s.digits(1)
    elif label == "letter":
        scene = s.letters(s.rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), in_order=False)
    else:
        size, shape = label.split()
        scene = s.one(s.style(("filled", "noisy"), (0.8, 0.2)), shape=shape, size=size)
    prompt = ("Which of these classes does the image show: " + ", ".join(CIFAR10) + "? Answer with the class name.")
    return scene, prompt, label


def _cifar100(s: Sampler) -> Example:
    colour, style, shape = s.rng.choice(CIFAR100).split()
    prompt = ("Classify the object by its colour, its drawing style (filled, outline, striped or noisy) and its "
              "shape. Answer with the three words in that order.")
    return s.one(style, shape=shape, colour=colour), prompt, f"{colour} {style} {shape}"


def _mnist(s: Sampler) -> Example:
    scene = s.digits(1, part="heldout", colours=("white",))
    prompt = s.rng.choice(("What handwritten digit is shown in the image? Answer with a single digit from 0 to 9.",
                           "Classify the handwritten digit (0-9). Answer with the digit only."))
    return scene, prompt, scene.items[0].label


@dataclass(frozen=True)
class EvalSpec:
    make: Callable[[Sampler], Example]
    answers: Callable[[int], int]  # answer-set size for a grid
    kind: str  # what the task measures, for the README


EVAL_TASKS: dict[str, EvalSpec] = {
    "text_vqa": EvalSpec(_text_vqa, lambda g: sum(len(w) <= g * g for w in WORDS), "read a word (OCR QA)"),
    "vsr": EvalSpec(_vsr, lambda g: 2, "spatial relation statement, true/false"),
    "snli_ve": EvalSpec(_snli_ve, lambda g: 3, "statement entailed / contradicted / undecidable (yes/no/maybe)"),
    "cifar10": EvalSpec(_cifar10, lambda g: len(CIFAR10), "10-way: size x shape, digit, letter"),
    "cifar100": EvalSpec(_cifar100, lambda g: len(CIFAR100), "96-way: colour x style x shape"),
    "mnist": EvalSpec(_mnist, lambda g: 10, "held-out handwritten digits"),
}


# ----------------------------------------------------------------------------------------------------------------
# POPE


@dataclass
class ObjectStats:
    """How often each (colour, shape) occurs in the training images, and with which others."""

    frequency: Counter
    cooccurrence: Counter

    @classmethod
    def of(cls, scenes: list[Scene]) -> ObjectStats:
        frequency, cooccurrence = Counter(), Counter()
        for scene in scenes:
            objects = sorted({(i.colour, i.label) for i in scene.shapes()})
            frequency.update(objects)
            cooccurrence.update((a, b) for a in objects for b in objects if a != b)
        return cls(frequency, cooccurrence)


def pope_negative(scene: Scene, split: str, stats: ObjectStats, rng: random.Random) -> tuple[str, str]:
    """An absent (colour, shape): random; popular (the most frequent in training); adversarial (shares a colour
    or a shape with a present object, and co-occurs most with the present objects)."""
    present = {(i.colour, i.label) for i in scene.shapes()}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    if split == "random":
        return rng.choice(absent)
    if split == "popular":
        return max(absent, key=lambda o: (stats.frequency[o], -absent.index(o)))
    related = [o for o in absent if any(o[0] == p[0] or o[1] == p[1] for p in present)]
    return max(related, key=lambda o: (sum(stats.cooccurrence[(o, p)] for p in present), stats.frequency[o],
                                       -related.index(o)))


def pope(s: Sampler, images: int, stats: ObjectStats) -> tuple[list[Scene], dict[str, list[tuple[int, str, str]]]]:
    """POPE's design: the same images for all three splits, one present and one absent object asked per image.
    Returns the scenes and per split [(scene index, prompt, "yes" | "no")]."""
    scenes, splits = [], {split: [] for split in POPE_SPLITS}
    for index in range(images):
        scene = s.shapes(s.count(2), s.style(weights=CORE_STYLE_WEIGHTS))
        scenes.append(scene)
        positive = s.rng.choice(scene.shapes())
        for split in POPE_SPLITS:
            negative = pope_negative(scene, split, stats, s.rng)
            for (colour, shape), answer in (((positive.colour, positive.label), "yes"), (negative, "no")):
                splits[split].append((index, f"Is there a {colour} {shape} in the image?{YES_NO}", answer))
    return scenes, splits


# ----------------------------------------------------------------------------------------------------------------
# MME: (scene, question answered Yes, question answered No) per image


def _mme_existence(s: Sampler):
    scene = _core(s)
    item = s.rng.choice(scene.shapes())
    colour, shape = hard_negative(scene, s.rng)
    return scene, f"Is there a {item.colour} {item.label} in this image?", f"Is there a {colour} {shape} in this image?"


def _mme_count(s: Sampler):
    scene = _core(s)
    n = len(scene.items)
    wrong = other_than(s.rng, range(1, 5), n)
    question = "Is the number of objects in this image {}?"
    return scene, question.format(NUMBER_WORDS[n]), question.format(NUMBER_WORDS[wrong])


def _mme_position(s: Sampler):
    scene = _core(s)
    item = s.rng.choice(scene.shapes())
    question = f"Is the {item.colour} {item.label} at the {{}} of this image?"
    where = scene.position(item)
    return scene, question.format(where), question.format(other_than(s.rng, positions(scene.grid), where))


def _mme_color(s: Sampler):
    scene = _core(s)
    item = s.rng.choice(scene.shapes())
    question = f"Is the {item.label} in this image {{}}?"
    return scene, question.format(item.colour), question.format(other_than(s.rng, COLOURS, item.colour))


def _mme_ocr(s: Sampler):
    scene = s.word(s.style(("filled", "noisy"), (0.8, 0.2)))
    word = scene.word()
    same_length = [w for w in WORDS if len(w) == len(word) and w != word]
    question = 'Is the word in this image "{}"?'
    return scene, question.format(word), question.format(s.rng.choice(same_length))


def _mme_shape(s: Sampler):
    scene = _core(s)
    item = s.rng.choice(scene.shapes())
    question = f"Is the {item.colour} object in this image a {{}}?"
    return scene, question.format(item.label), question.format(other_than(s.rng, SHAPES, item.label))


def _mme_size(s: Sampler):
    scene = _core(s)
    item = s.rng.choice(scene.shapes())
    question = f"Is the {item.colour} {item.label} in this image {{}}?"
    return scene, question.format(item.size), question.format(other_than(s.rng, SIZES, item.size))


def _mme_style(s: Sampler):
    scene = s.shapes(s.count(1), s.style())
    question = "Is this image drawn in the {} style?"
    return scene, question.format(scene.style), question.format(other_than(s.rng, STYLES, scene.style))


def _mme_numerical(s: Sampler):
    scene = s.digits(2)
    total = sum(int(item.label) for item in scene.items)
    wrong = other_than(s.rng, [v for v in range(total - 3, total + 4) if v >= 0], total)
    question = "Is the sum of the two digits in this image equal to {}?"
    return scene, question.format(total), question.format(wrong)


def _mme_commonsense(s: Sampler):
    fact = s.rng.choice(("corners", "warmth", "parity", "vowel"))
    if fact == "corners":
        scene = s.one(s.style(weights=CORE_STYLE_WEIGHTS))
        item = scene.items[0]
        question = f"Does the {item.colour} shape in this image have exactly {{}} corners?"
        return scene, question.format(CORNERS[item.label]), question.format(
            other_than(s.rng, sorted(set(CORNERS.values())), CORNERS[item.label]))
    if fact == "warmth":
        scene = s.one(s.style(weights=CORE_STYLE_WEIGHTS), colour=s.rng.choice(sorted(WARM)))
        item = scene.items[0]
        question = f"Is the colour of the {item.label} in this image a {{}} colour?"
        warm = WARM[item.colour]
        return scene, question.format(warm), question.format("cool" if warm == "warm" else "warm")
    if fact == "parity":
        scene = s.digits(1)
        odd = int(scene.items[0].label) % 2 == 1
        question = "Is the number in this image {}?"
        return scene, question.format("odd" if odd else "even"), question.format("even" if odd else "odd")
    scene = s.letters(s.rng.choice(VOWELS if s.rng.random() < 0.5 else "BCDFGHJKLMNPQRSTVWXYZ"), in_order=False)
    vowel = scene.items[0].label in VOWELS
    question = "Is the letter in this image a {}?"
    return scene, question.format("vowel" if vowel else "consonant"), question.format(
        "consonant" if vowel else "vowel")


MME_SUBTASKS: dict[str, tuple[str, Callable]] = {  # name -> (group, maker); "other": extra perception
    "existence": ("perception", _mme_existence),
    "count": ("perception", _mme_count),
    "position": ("perception", _mme_position),
    "color": ("perception", _mme_color),
    "OCR": ("perception", _mme_ocr),
    "shape": ("other", _mme_shape),
    "size": ("other", _mme_size),
    "style": ("other", _mme_style),
    "numerical_calculation": ("cognition", _mme_numerical),
    "commonsense_reasoning": ("cognition", _mme_commonsense),
}


def mme_item(subtask: str, s: Sampler) -> tuple[Scene, list[tuple[str, str]]]:
    """One MME image: its scene and its two (question, "Yes" | "No") lines in random order."""
    scene, yes, no = MME_SUBTASKS[subtask][1](s)
    lines = [(yes + YES_NO, "Yes"), (no + YES_NO, "No")]
    s.rng.shuffle(lines)
    return scene, lines


__all__ = ["CIFAR10", "CIFAR100", "EVAL_TASKS", "MME_SUBTASKS", "POPE_SPLITS", "RELATIONS", "ObjectStats",
           "mme_item", "pope", "pope_negative"]
