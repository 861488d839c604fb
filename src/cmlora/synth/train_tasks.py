"""The training tasks of the synthetic suite: a table of task specs over a few scene recipes and query kinds.

A task is (scene recipe, query kind, answer convention, instruction templates, category). Tasks that name the
same `pool` share their images: the same picture is asked about with different targets and different answer
conventions (a count as "2" and as "two", existence as yes/no and as true/false, the same object's colour and
its position, a digit as "7", "seven" and "odd"), so that task interference is real and measurable.

A query returns None when a scene cannot answer it unambiguously; the scene is then drawn again.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..evaluation.tasks import SHORT_ANSWER
from .scenes import (
    COLOURS,
    CORE_STYLE_WEIGHTS,
    LETTERS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    STYLES,
    VOWELS,
    WORDS,
    Item,
    Sampler,
    Scene,
    positions,
)

CATEGORIES = ("complex_reasoning", "coarse_perception", "fine_grained_perception",
              "knowledge_intensive_classification", "ocr", "domain_specific_classification")
CORNERS = {"circle": 0, "triangle": 3, "square": 4, "cross": 12}
WARM = {"red": "warm", "yellow": "warm", "green": "cool", "blue": "cool", "purple": "cool"}  # white: neither
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
VISIBLE = ("colour", "shape", "position", "size")
INVISIBLE = ("weight", "material", "temperature", "smell", "age", "price")

Answer = tuple[dict[str, str], str]  # (template slots, answer)

# ----------------------------------------------------------------------------------------------------------------
# Scene recipes: name -> function of a Sampler


SCENES: dict[str, Callable[[Sampler], Scene]] = {
    "objects": lambda s: s.shapes(s.count(1), s.style(weights=CORE_STYLE_WEIGHTS)),
    "pair": lambda s: s.shapes(s.count(2), s.style(weights=CORE_STYLE_WEIGHTS)),
    "crowd": lambda s: s.shapes(s.count(2), s.style(weights=CORE_STYLE_WEIGHTS), unique=False,  # repeats likely
                                colours=tuple(s.rng.sample(COLOURS, 3)), shapes=tuple(s.rng.sample(SHAPES, 2))),
    "digit": lambda s: s.digits(1),
    "two_digits": lambda s: s.digits(2),
    "word": lambda s: s.word(s.style(("filled", "noisy"), (0.8, 0.2))),
    "letters": lambda s: s.letters("".join(s.rng.choices(LETTERS, k=s.count(1))), in_order=False),
    "letter": lambda s: s.letters(s.rng.choice(LETTERS), in_order=False),
    "any_style": lambda s: s.shapes(1, s.style()),
    "outline": lambda s: s.shapes(1, "outline"),
    "noisy": lambda s: s.shapes(s.count(1), "noisy"),
    "striped_or_not": lambda s: s.shapes(s.count(1), s.style(weights=(1, 1, 3, 1))),
}

# ----------------------------------------------------------------------------------------------------------------
# Answer conventions


def number(n: int, convention: str) -> str:
    return NUMBER_WORDS[n] if convention == "word" else str(n)


def plural(noun: str) -> str:
    """'circle' -> 'circles', 'cross' -> 'crosses'."""
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def boolean(value: bool, convention: str) -> str:
    if convention == "true_false":
        return "true" if value else "false"
    return "yes" if value else "no"


def unique_by(scene: Scene, key: Callable[[Item], object]) -> list[Item]:
    """The shapes of the scene whose key no other item shares."""
    counts = Counter(key(item) for item in scene.items)
    return [item for item in scene.shapes() if counts[key(item)] == 1]


def obj(item: Item) -> dict[str, str]:
    return {"colour": item.colour, "shape": item.label}


def other_than(rng: random.Random, values, value):
    """A random one of `values` that is not `value` (a false statement's value)."""
    return rng.choice([v for v in values if v != value])


def hard_negative(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """An absent (colour, shape) sharing the colour or the shape of a present shape."""
    present = [(i.colour, i.label) for i in scene.shapes()]
    candidates = sorted({(c, s) for c, s0 in present for s in SHAPES} | {(c, s) for c0, s in present for c in COLOURS})
    return rng.choice([pair for pair in candidates if pair not in present])


# ----------------------------------------------------------------------------------------------------------------
# Query kinds: ask(scene, rng, convention) -> (slots, answer) | None, and the answer set (grid, convention)


def _exists(scene: Scene, rng: random.Random, conv: str) -> Answer:
    if rng.random() < 0.5:
        item = rng.choice(scene.shapes())
        return obj(item), boolean(True, conv)
    colour, shape = hard_negative(scene, rng)
    return {"colour": colour, "shape": shape}, boolean(False, conv)


def _pick(items: list[Item], rng: random.Random) -> Item | None:
    return rng.choice(items) if items else None


def _with(item: Item | None, make: Callable[[Item], Answer]) -> Answer | None:
    return None if item is None else make(item)


def count_of(scene: Scene, rng: random.Random, attribute: str, values: tuple[str, ...]) -> tuple[str, int]:
    """A value to count (the most frequent one, a present one, or any, so that counts are spread) and its count."""
    counts = Counter(getattr(item, attribute) for item in scene.items)
    draw = rng.random()
    value = counts.most_common(1)[0][0] if draw < 0.4 else rng.choice(sorted(counts)) if draw < 0.8 else \
        rng.choice(values)
    return value, counts[value]


def _more(scene: Scene, rng: random.Random, conv: str) -> Answer | None:
    counts = Counter(item.colour for item in scene.items)
    first, second = rng.sample(sorted(counts) + [c for c in COLOURS if c not in counts][:1], 2)
    if counts[first] == counts[second]:
        return None
    return {"colour": first, "other": second}, boolean(counts[first] > counts[second], conv)


def _majority(scene: Scene, rng: random.Random, conv: str) -> Answer | None:
    (top, n), *rest = Counter(item.colour for item in scene.items).most_common() + [("", 0)]
    return None if rest[0][1] == n else ({}, top)


def _relation(scene: Scene, rng: random.Random, conv: str) -> Answer:
    a, b = rng.sample(scene.shapes(), 2)
    truth = relations_between(a, b)
    wanted = rng.random() < 0.5 and any(truth.values())
    relation = rng.choice([name for name, value in truth.items() if value == wanted])
    return {"a": f"{a.colour} {a.label}", "relation": relation, "b": f"{b.colour} {b.label}"}, boolean(wanted, conv)


def relations_between(a: Item, b: Item) -> dict[str, bool]:
    """Which of RELATIONS hold for "a <relation> b": "to the left of" = in a column further left (any row)."""
    return {name: (a.row - b.row) * d_row > 0 if d_row else (a.col - b.col) * d_col > 0
            for name, (d_row, d_col) in RELATIONS.items()}


def _visible(scene: Scene, rng: random.Random, conv: str) -> Answer:
    item = rng.choice(scene.shapes())
    visible = rng.random() < 0.5
    prop = rng.choice(VISIBLE if visible else INVISIBLE)
    return {**obj(item), "property": prop}, boolean(visible, conv)


def _warmth(scene: Scene, rng: random.Random, conv: str) -> Answer | None:
    items = [item for item in unique_by(scene, lambda i: i.label) if item.colour in WARM]
    wanted = rng.choice(("warm", "cool"))  # aim at either answer equally often
    item = _pick([i for i in items if WARM[i.colour] == wanted] or items, rng)
    return None if item is None else ({"shape": item.label}, WARM[item.colour])


def _two_digits(scene: Scene, rng: random.Random, conv: str, larger: bool) -> Answer | None:
    a, b = (int(item.label) for item in scene.items)
    if larger:
        return None if a == b else ({}, str(max(a, b)))
    return {}, str(a + b)


def _vowel(scene: Scene, rng: random.Random, conv: str) -> Answer | None:
    letter = scene.items[0].label
    if letter not in VOWELS and rng.random() > len(VOWELS) / (26 - len(VOWELS)):
        return None  # keep vowels and consonants about equally frequent
    return {}, "vowel" if letter in VOWELS else "consonant"


@dataclass(frozen=True)
class Query:
    ask: Callable[[Scene, random.Random, str], Answer | None]
    answers: Callable[[int, str], list[str]]


def _numbers(low: int, high: Callable[[int], int]) -> Callable[[int, str], list[str]]:
    return lambda grid, conv: [number(n, conv) for n in range(low, high(grid) + 1)]


def _fixed(values) -> Callable[[int, str], list[str]]:
    return lambda grid, conv: list(values)


def _words(grid: int) -> list[str]:
    return [w for w in WORDS if len(w) <= grid * grid]


MAX_ITEMS = 4
_YES_NO = lambda grid, conv: [boolean(True, conv), boolean(False, conv)]  # noqa: E731
QUERIES: dict[str, Query] = {
    "count": Query(lambda sc, r, c: ({}, number(len(sc.items), c)), _numbers(1, lambda g: min(MAX_ITEMS, g * g))),
    "exists": Query(_exists, _YES_NO),
    "describe": Query(lambda sc, r, c: ({}, sc.describe()), _fixed(())),  # size computed in describe_size
    "colour_of": Query(lambda sc, r, c: _with(_pick(unique_by(sc, lambda i: i.label), r),
                                               lambda i: ({"shape": i.label}, i.colour)), _fixed(COLOURS)),
    "shape_of": Query(lambda sc, r, c: _with(_pick(unique_by(sc, lambda i: i.colour), r),
                                              lambda i: ({"colour": i.colour}, i.label)), _fixed(SHAPES)),
    "position_of": Query(lambda sc, r, c: _with(_pick(unique_by(sc, lambda i: (i.colour, i.label)), r),
                                                 lambda i: (obj(i), sc.position(i))), lambda g, c: positions(g)),
    "colour_at": Query(lambda sc, r, c: _with(r.choice(sc.items), lambda i: ({"position": sc.position(i)},
                                                                               i.colour)), _fixed(COLOURS)),
    "object_at": Query(lambda sc, r, c: _with(r.choice(sc.items), lambda i: ({"position": sc.position(i)},
                                                                               f"{i.colour} {i.label}")),
                       _fixed([f"{c} {s}" for c in COLOURS for s in SHAPES])),
    "size_of": Query(lambda sc, r, c: _with(_pick(unique_by(sc, lambda i: (i.colour, i.label)), r),
                                             lambda i: (obj(i), i.size)), _fixed(SIZES)),
    "count_colour": Query(lambda sc, r, c: (lambda v, n: ({"colour": v}, number(n, c)))(
        *count_of(sc, r, "colour", COLOURS)), _numbers(0, lambda g: min(MAX_ITEMS, g * g))),
    "count_shape": Query(lambda sc, r, c: (lambda v, n: ({"shapes": plural(v)}, number(n, c)))(
        *count_of(sc, r, "label", SHAPES)), _numbers(0, lambda g: min(MAX_ITEMS, g * g))),
    "more": Query(_more, _YES_NO),
    "majority": Query(_majority, _fixed(COLOURS)),
    "relation": Query(_relation, _YES_NO),
    "visible": Query(_visible, _YES_NO),
    "corners": Query(lambda sc, r, c: _with(_pick(unique_by(sc, lambda i: i.colour), r),
                                             lambda i: ({"colour": i.colour}, str(CORNERS[i.label]))),
                     _fixed(sorted({str(v) for v in CORNERS.values()}, key=int))),
    "warmth": Query(_warmth, _fixed(("warm", "cool"))),
    "digit": Query(lambda sc, r, c: ({}, number(int(sc.items[0].label), c)), _numbers(0, lambda g: 9)),
    "parity": Query(lambda sc, r, c: ({}, "odd" if int(sc.items[0].label) % 2 else "even"), _fixed(("odd", "even"))),
    "digit_sum": Query(lambda sc, r, c: _two_digits(sc, r, c, False), _numbers(0, lambda g: 18)),
    "larger_digit": Query(lambda sc, r, c: _two_digits(sc, r, c, True), _numbers(1, lambda g: 9)),
    "read_word": Query(lambda sc, r, c: ({}, sc.word()), lambda g, c: _words(g)),
    "spell_word": Query(lambda sc, r, c: ({}, " ".join(sc.word())), lambda g, c: [" ".join(w) for w in _words(g)]),
    "word_length": Query(lambda sc, r, c: ({}, number(len(sc.word()), c)),
                         lambda g, c: [number(n, c) for n in sorted({len(w) for w in _words(g)})]),
    "letter_at": Query(lambda sc, r, c: _with(r.choice(sc.items), lambda i: ({"position": sc.position(i)}, i.label)),
                       _fixed(LETTERS)),
    "vowel": Query(_vowel, _fixed(("vowel", "consonant"))),
    "style": Query(lambda sc, r, c: ({}, sc.style), _fixed(STYLES)),
    "is_striped": Query(lambda sc, r, c: ({}, boolean(sc.style == "striped", c)), _YES_NO),
    "shape": Query(lambda sc, r, c: ({}, sc.items[0].label), _fixed(SHAPES)),
}


# ----------------------------------------------------------------------------------------------------------------
# The task table


@dataclass(frozen=True)
class TaskSpec:
    name: str
    category: str
    scene: str  # key of SCENES
    query: str  # key of QUERIES
    templates: tuple[str, ...]  # str.format templates over the query's slots
    convention: str = ""  # "digit" / "word" for numbers, "yes_no" / "true_false" for booleans
    pool: str | None = None  # tasks of one pool share their images (default: the task's own images)

    @property
    def image_pool(self) -> str:
        return self.pool or self.name


C, CP, FP, KI, OCR, DS = CATEGORIES
T = TaskSpec
TASKS: tuple[TaskSpec, ...] = (
    # coarse perception
    T("count_objects_digit", CP, "objects", "count", (
        "How many objects are in the image? Answer with a digit.",
        "Count the objects in the picture and reply with a digit.",
        "Give the number of shapes shown, written as a digit."), "digit", "objects"),
    T("count_objects_word", CP, "objects", "count", (
        "How many objects are in the image? Answer with a number word.",
        "Count the objects in the picture and reply with the number spelled out as a word.",
        "Give the number of shapes shown, written as a word."), "word", "objects"),
    T("exists_yes_no", CP, "objects", "exists", (
        "Does the image contain a {colour} {shape}? Answer yes or no.",
        "Can you see a {colour} {shape} here? Reply yes or no.",
        "Is a {colour} {shape} present in the picture? Answer yes or no."), "yes_no", "objects"),
    T("exists_true_false", CP, "objects", "exists", (
        "True or false: the image contains a {colour} {shape}.",
        "Decide whether this is true or false: there is a {colour} {shape} in the picture.",
        "Statement: a {colour} {shape} can be seen. Reply true or false."), "true_false", "objects"),
    T("describe_scene", CP, "objects", "describe", (
        "Describe the image.",
        "List every object with its size, colour, shape and position, then the style.",
        "Give a full description of the picture."), "", "objects"),
    T("count_colour", CP, "crowd", "count_colour", (
        "How many {colour} objects are there? Answer with a digit.",
        "Count the {colour} shapes. Reply with a digit.",
        "What is the number of {colour} objects in the picture?"), "digit", "crowd"),
    # fine-grained perception
    T("colour_of_shape", FP, "objects", "colour_of", (
        "What colour is the {shape}?", "Name the colour of the {shape}.",
        "Which colour does the {shape} in the image have?"), "", "objects"),
    T("shape_of_colour", FP, "objects", "shape_of", (
        "What shape is the {colour} object?", "Name the shape of the {colour} object.",
        "Which shape is drawn in {colour}?"), "", "objects"),
    T("position_of_object", FP, "objects", "position_of", (
        "Where is the {colour} {shape}?", "In which part of the image is the {colour} {shape}?",
        "Give the position of the {colour} {shape}."), "", "objects"),
    T("colour_at_position", FP, "objects", "colour_at", (
        "What colour is the object at the {position}?", "Name the colour of the object in the {position} cell.",
        "Which colour is the item located at the {position}?"), "", "objects"),
    T("object_at_position", FP, "objects", "object_at", (
        "What object is at the {position}? Answer with its colour and shape.",
        "Name the colour and shape of the item in the {position} cell.",
        "Which coloured shape is located at the {position}?"), "", "objects"),
    T("size_of_object", FP, "objects", "size_of", (
        "Is the {colour} {shape} small or large?", "What size is the {colour} {shape}: small or large?",
        "Tell whether the {colour} {shape} is large or small."), "", "objects"),
    # complex reasoning
    T("spatial_relation", C, "pair", "relation", (
        "Is the {a} {relation} the {b}? Answer yes or no.",
        "Looking at the picture, is the {a} located {relation} the {b}? Reply yes or no.",
        "Answer yes or no: the {a} is {relation} the {b}?"), "yes_no", "pair"),
    T("more_colour_than", C, "crowd", "more", (
        "Are there more {colour} objects than {other} objects? Answer yes or no.",
        "Is the number of {colour} shapes greater than the number of {other} shapes? Reply yes or no.",
        "Compare the counts: do {colour} objects outnumber {other} objects? Answer yes or no."), "yes_no", "crowd"),
    T("majority_colour", C, "crowd", "majority", (
        "Which colour appears most often in the image?", "What is the most frequent colour among the objects?",
        "Name the colour that most of the shapes have."), "", "crowd"),
    T("count_shape", C, "crowd", "count_shape", (
        "How many {shapes} are in the image? Answer with a digit.", "Count the {shapes} and reply with a digit.",
        "What is the number of {shapes} shown?"), "digit", "crowd"),
    T("digit_sum", C, "two_digits", "digit_sum", (
        "What is the sum of the two digits in the image?", "Add the two handwritten digits. What is the result?",
        "Compute the total of the two numbers shown."), "digit", "two_digits"),
    T("larger_digit", C, "two_digits", "larger_digit", (
        "Which is the larger of the two digits?", "Of the two handwritten digits, which one is bigger?",
        "Name the greater of the two numbers shown."), "digit", "two_digits"),
    T("visible_property", C, "objects", "visible", (
        "Can the {property} of the {colour} {shape} be seen in the image? Answer yes or no.",
        "Is it possible to tell the {property} of the {colour} {shape} from the picture? Reply yes or no.",
        "Does the image show the {property} of the {colour} {shape}? Answer yes or no."), "yes_no", "objects"),
    # knowledge-intensive classification
    T("shape_corners", KI, "objects", "corners", (
        "How many corners does the {colour} object have?", "Count the corners of the {colour} shape.",
        "What is the number of corners of the {colour} figure?"), "digit", "objects"),
    T("colour_warmth", KI, "objects", "warmth", (
        "Is the colour of the {shape} warm or cool?", "Classify the {shape}'s colour as warm or cool.",
        "Does the {shape} have a warm colour or a cool colour?"), "", "objects"),
    T("digit_parity", KI, "digit", "parity", (
        "Is the digit in the image odd or even?", "Classify the handwritten number as odd or even.",
        "Odd or even: what kind of number is shown?"), "", "digit"),
    T("digit_word", KI, "digit", "digit", (
        "Write the digit in the image as an English word.", "What is the name of the handwritten number?",
        "Spell out the number shown as a word."), "word", "digit"),
    T("letter_vowel", KI, "letter", "vowel", (
        "Is the letter in the image a vowel or a consonant?", "Classify the letter shown as vowel or consonant.",
        "Vowel or consonant: which is the letter in the picture?"), "", "letter"),
    # OCR
    T("read_word", OCR, "word", "read_word", (
        "What word is written in the image?", "Read the text in the picture.",
        "Which word do the letters spell?"), "", "word"),
    T("spell_word", OCR, "word", "spell_word", (
        "Spell the word in the image letter by letter, separated by spaces.",
        "List the letters of the written word in order, with spaces between them.",
        "Read the text one letter at a time."), "", "word"),
    T("word_length", OCR, "word", "word_length", (
        "How many letters does the word in the image have?", "Count the letters of the written word.",
        "What is the length of the word shown, in letters?"), "digit", "word"),
    T("letter_at_position", OCR, "letters", "letter_at", (
        "What letter is at the {position}?", "Read the letter in the {position} cell.",
        "Which letter is written at the {position}?"), "", "letters"),
    T("read_digit", OCR, "digit", "digit", (
        "What digit is written in the image? Answer with a digit.", "Read the handwritten number.",
        "Which digit is shown? Reply with the digit."), "digit", "digit"),
    # domain-specific classification
    T("style_classify", DS, "any_style", "style", (
        "In which style is the image drawn: filled, outline, striped or noisy?",
        "Classify the drawing style of the picture (filled, outline, striped, noisy).",
        "What rendering style does this image use?"), "", "any_style"),
    T("sketch_shape", DS, "outline", "shape", (
        "This is a line drawing. Which shape does it show?", "Classify the outlined figure by its shape.",
        "What shape is traced in this sketch?"), "", "outline"),
    T("noisy_colour", DS, "noisy", "colour_of", (
        "This photo is noisy. What colour is the {shape}?", "In this grainy image, name the colour of the {shape}.",
        "Despite the noise, which colour does the {shape} have?"), "", "noisy"),
    T("noisy_count", DS, "noisy", "count", (
        "This photo is noisy. How many objects does it show? Answer with a digit.",
        "Count the objects in this grainy image. Reply with a digit.",
        "Despite the noise, how many shapes are there? Give a digit."), "digit", "noisy"),
    T("striped_yes_no", DS, "striped_or_not", "is_striped", (
        "Are the objects in this image striped? Answer yes or no.",
        "Is the texture of the shapes striped? Reply yes or no.",
        "Do the figures have a striped pattern? Answer yes or no."), "yes_no", "striped_or_not"),
)
TASKS_BY_NAME = {task.name: task for task in TASKS}


def answer_set(task: TaskSpec, grid: int) -> list[str]:
    return QUERIES[task.query].answers(grid, task.convention)


def describe_size(grid: int, max_items: int = MAX_ITEMS) -> int:
    """How many different descriptions an "objects" scene can have (distinct colours and shapes per scene)."""
    from math import comb, perm

    cells = grid * grid
    per_style = sum(comb(cells, n) * perm(len(COLOURS), n) * perm(len(SHAPES), n) * len(SIZES) ** n
                    for n in range(1, min(max_items, cells) + 1))
    return per_style * len(STYLES)


def chance(task: TaskSpec, grid: int) -> float:
    """Accuracy of a uniform guess over the task's answer set."""
    size = describe_size(grid) if task.query == "describe" else len(answer_set(task, grid))
    return 1.0 / size


def ask(task: TaskSpec, scene: Scene, rng: random.Random,
        short_answer_share: float = 0.0) -> tuple[str, str] | None:
    """(question, answer) of `task` about `scene` (a random template, followed by `SHORT_ANSWER` with probability
    `short_answer_share` unless the answer is a description), or None when the scene cannot answer it."""
    result = QUERIES[task.query].ask(scene, rng, task.convention)
    if result is None:
        return None
    slots, answer = result
    question = rng.choice(task.templates).format(**slots)
    # LLaVA-1.5's data ends its short-answer questions with SHORT_ANSWER, and LLaVA's MME protocol appends it to
    # every question. On a quarter of the training instructions it kept the suffix from steering the tuned model
    # away from the skill asked (one seed: MME existence 0.37 -> 0.70; BENCHMARKS.md, ninth session).
    if short_answer_share and task.query != "describe" and rng.random() < short_answer_share:
        question = f"{question} {SHORT_ANSWER}"
    return question, answer
