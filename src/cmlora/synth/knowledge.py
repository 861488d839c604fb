"""What an LLM knows before it sees an image, written out for a language model that starts from nothing.

The knowledge-intensive training tasks (and some of the reasoning ones) combine what the image shows with a fact
of the world: how many corners a triangle has, whether red is warm, whether 7 is odd, how 7 is spelled, whether
E is a vowel, what 3 plus 4 is, which of two digits is larger, which properties of an object a picture shows, and
which cells lie left of or above which. LLaVA's language model learned these from text long before instruction
tuning, so that LoRA only has to connect them to what the vision tower sees. The tiny base's language model had
never read them, and LoRA had to learn each fact and its use at once, in 3 minutes: those tasks stayed at
0.10-0.70 (BENCHMARKS.md). `facts()` states each of them in plain sentences, never in a task's instruction
wording. Opt-in: `cmlora pretrain-base --knowledge-repeats 2` mixes them, each twice, into the text of every phase of
stage 1 (`PretrainConfig.knowledge_repeats`). On three seeds they lifted digit_word, digit_parity and letter_vowel
but not the number of tasks LoRA learns in its budget (BENCHMARKS.md, "Facts of the world in the base's text").
"""

from __future__ import annotations

from .scenes import COLOURS, LETTERS, NUMBER_WORDS, VOWELS, Item, positions
from .train_tasks import CORNERS, INVISIBLE, VISIBLE, WARM, plural, relations_between


def _corners() -> list[str]:
    return [sentence for shape, n in CORNERS.items() for sentence in (
        f"A {shape} has {n} corners.", f"The number of corners of a {shape} is {n}.",
        f"{plural(shape).capitalize()} have {n} corners.")]


def _warmth() -> list[str]:
    facts = []
    for colour in COLOURS:
        kind = WARM.get(colour)
        facts += ([f"{colour.capitalize()} is a {kind} colour.", f"The colour {colour} is {kind}."] if kind else
                  [f"{colour.capitalize()} is neither warm nor cool."])
    return facts


def _numbers() -> list[str]:
    facts = []
    for n in range(10):
        parity = "even" if n % 2 == 0 else "odd"
        facts += [f"{n} is an {parity} number.", f"The number {n} is {parity}."]
    for n, word in enumerate(NUMBER_WORDS):
        facts += [f"{n} is written {word} in words.", f"The word {word} means the number {n}."]
    for a in range(10):
        for b in range(10):
            facts += [f"{a} plus {b} is {a + b}.", f"The sum of {a} and {b} is {a + b}."]
            if a != b:
                facts.append(f"The larger of {a} and {b} is {max(a, b)}.")
            if a > b:
                facts.append(f"{a} is larger than {b}.")
    return facts


def _letters() -> list[str]:
    return [sentence for letter in LETTERS for kind in ("vowel" if letter in VOWELS else "consonant",)
            for sentence in (f"{letter} is a {kind}.", f"The letter {letter} is a {kind}.")]


def _properties() -> list[str]:
    return ([f"The {p} of an object can be seen in a picture." for p in VISIBLE]
            + [f"The {p} of an object cannot be seen in a picture." for p in INVISIBLE])


def _cells() -> list[str]:
    """'Something at the top-left is above something at the bottom-left.', for every pair of cells of a 3x3 grid
    and every relation that holds, as the tasks decide it (`relations_between`); a 2x2 grid's cells are named, and
    related, as the 3x3 grid's corners."""
    cells = list(zip(positions(3), [Item("shape", "circle", "red", row, col) for row in range(3) for col in range(3)],
                     strict=True))
    return [f"Something at the {a} is {relation} something at the {b}." for a, first in cells for b, second in cells
            for relation, holds in relations_between(first, second).items() if holds]


def facts() -> list[str]:
    """Every fact, each in one or more sentences, in a fixed order."""
    return _corners() + _warmth() + _numbers() + _letters() + _properties() + _cells()
