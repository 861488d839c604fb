"""The base's pretraining questions: what stage 1 asks about a scene, in which words, and which lookup each is.

Three wordings (`cmlora synth --questions`):
- "plain" (the default up to the twelfth session): "where is the red circle ?", lower case, the question mark
  apart;
- "natural" (opt-in, measured on one seed so far; BENCHMARKS.md, ninth session): written as instructions and
  benchmarks write them ("Where is the red circle?"). The tiny tokenizer gives every capital its own token and
  reads "circle?" as "circle" "?", so the plain wording binds the base's skills to tokens that no instruction uses
  (BENCHMARKS.md, "Zero-shot: why MME stays at chance"). It adds two things an LLM brings from its text
  pretraining, which a from-scratch language model must be shown:
  - `verify`: yes/no questions about what the other skills name ("Is the circle red?", "Is the red square at the
    top-left?"), half of them true. Without them nothing taught the model that "Is the X Y?" asks for yes or no
    about Y, and the tuned model answered MME's questions with a colour or "true";
  - answer-format tails on a share of the questions: "Answer yes or no." on yes/no questions, and the
    short-answer instruction of LLaVA-1.5's data (`SHORT_ANSWER`, which LLaVA's MME protocol appends to every
    question).
  None of these wordings is an MME question's: MME asks "Is the circle in this image red?", the base "Is the
  circle red?";
- "tailed" (the default, `DEFAULT_STYLE`, and the shipped base's; BENCHMARKS.md, "A tokenizer that reads prose as
  the base's questions"): the plain questions with natural's answer-format tails and no verify skill ("is there a
  red circle ? Answer yes or no."). It goes with the base's case-folding tokenizer (`vlm.TinySpec.fold_case`, on
  in `base.BASE_SPEC`), which reads the natural questions as the plain ones: only the tails are then new, and
  words after a question were what broke the base's lookups.

In any wording, `count_questions` counts the objects of one colour or of one shape ("how many red objects are
there ?", "how many crosses are there ?"). `cmlora synth --count-share S` (opt-in) asks one of them on that share
of the images that hold only shapes, besides the sampled questions: the idea was to give LoRA a base that already
does the computation of the tasks that count or compare counts. Measured in BENCHMARKS.md, "Counting by colour and
by shape": it does not beat the shipped base yet.
"""

from __future__ import annotations

import random
import re

from ..data.records import IMAGE_MARKER
from ..evaluation.tasks import SHORT_ANSWER
from . import train_tasks as tt
from .scenes import COLOURS, LETTERS, NUMBER_WORDS, SHAPES, SIZES, STYLES, WORDS, Item, Scene, fitting_words, positions

DESCRIBE = "describe the image ."
YES_NO = "Answer yes or no."
TAIL_PROBABILITY = 0.4  # of a question getting a tail; a yes/no tail is followed by SHORT_ANSWER half the time

# skill -> template. A slot is filled with one of its values (`_VALUES`); "Where is" and "small or large" name
# their object by shape, by colour or by both (`references`), and their kind says which (`question_kind`).
ASK = {
    "colour": "What colour is the {shape}?",
    "shape": "What shape is the {colour} object?",
    "count": "How many objects are there?",
    "position": "Where is the {name}?",
    "existence": "Is there a {colour} {shape}?",
    "size": "Is the {name} small or large?",
    "style": "What style is the image?",
    "digit": "What digit is at the {position}?",
    "letter": "What letter is at the {position}?",
    "word": "What word is written?",
    "count_colour": "How many {colour} objects are there?",
    "count_shape": "How many {shapes} are there?",
}
# The default suite's wording (recipe 8, the shipped base's): lower case, the question mark apart, no verify skill
# and no tails. `natural` (ASK, VERIFY, tails) is opt-in until it is measured on three seeds (BENCHMARKS.md).
PLAIN = {
    "colour": "what colour is the {shape} ?",
    "shape": "what shape is the {colour} object ?",
    "count": "how many objects are there ?",
    "position": "where is the {name} ?",
    "existence": "is there a {colour} {shape} ?",
    "size": "is the {name} small or large ?",
    "style": "what style is the image ?",
    "digit": "what digit is at the {position} ?",
    "letter": "what letter is at the {position} ?",
    "word": "what word is written ?",
    "count_colour": "how many {colour} objects are there ?",
    "count_shape": "how many {shapes} are there ?",
}
# Counting the objects of one colour or one shape (`count_questions`): not among the skills a conversation samples
# its questions from, but one extra question on a share of the images that hold only shapes (`cmlora synth
# --count-share`), so that the skills the conversations already teach keep their share of the turns.
COUNT_BY = ("count_colour", "count_shape")
QUESTION_STYLES = ("plain", "natural", "tailed")
DEFAULT_STYLE = "tailed"  # with the base's case-folding tokenizer (`base.BASE_SPEC`)
TAILED_STYLES = ("natural", "tailed")  # the styles whose questions get answer-format tails
# What a verify question is about -> its template (skill "verify", answered yes or no).
VERIFY = {
    "colour": "Is the {shape} {colour}?",
    "shape": "Is the {colour} object a {shape}?",
    "size": "Is the {name} {size}?",
    "position": "Is the {name} at the {position}?",
    "one": "Is there exactly one object?",
    "count": "Are there exactly {number} objects?",
    "style": "Is the image {style}?",
    "digit": "Is the digit at the {position} a {digit}?",
    "letter": "Is the letter at the {position} {letter}?",
    "word": "Is the word {word}?",
}
YES_NO_SKILLS = ("existence", "verify")
_VALUES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "style": STYLES, "digit": tuple("0123456789"),
           "letter": tuple(LETTERS), "word": WORDS, "number": NUMBER_WORDS[2:10],
           "shapes": tuple(tt.plural(shape) for shape in SHAPES),
           "position": tuple(dict.fromkeys(positions(2) + positions(3)))}


def _slot_pattern(slot: str) -> str:
    if slot == "name":  # 'triangle', 'red object', 'red triangle'
        shape, colour = _slot_pattern("shape"), _slot_pattern("colour")
        return f"(?:{shape}|{colour} object|{colour} {shape})"
    return "(?:" + "|".join(map(re.escape, _VALUES[slot])) + ")"


def template_pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # text, slot, text, slot, ..., text
    return re.compile("".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_slot_pattern(part)})"
                              for i, part in enumerate(parts)))


_PATTERNS = tuple((skill, template_pattern(template)) for skill, template in
                  [*PLAIN.items(), *ASK.items(), *(("verify", template) for template in VERIFY.values())])


def pretrain_skills(style: str = DEFAULT_STYLE, count_by: bool = False) -> tuple[str, ...]:
    """The skills the pretraining questions of a style ask about (`count_by`: with counting by colour and by shape,
    `count_questions`)."""
    if style not in QUESTION_STYLES:
        raise ValueError(f"question style must be one of {QUESTION_STYLES}, got {style!r}")
    skills = tuple(skill for skill in PLAIN if count_by or skill not in COUNT_BY)
    return (*skills, "verify") if style == "natural" else skills


def references(scene: Scene, item: Item) -> list[str]:
    """The ways to name a shape of the scene that no other item fits: 'triangle', 'red object', 'red triangle'."""
    ways = {item.label: lambda i: i.label, f"{item.colour} object": lambda i: i.colour,
            f"{item.colour} {item.label}": lambda i: (i.colour, i.label)}
    return [name for name, key in ways.items() if item in tt.unique_by(scene, key)]


def _verify(scene: Scene, rng: random.Random, named: list[tuple[Item, str]]) -> list[tuple[str, str]]:
    """One yes/no question per attribute the scene can be asked about, each true or false with probability 1/2."""
    questions: list[tuple[str, str]] = []

    def ask(about: str, slot: str, value: str, others, **slots: str) -> None:
        true = rng.random() < 0.5
        shown = value if true else tt.other_than(rng, others, value)
        questions.append((VERIFY[about].format(**slots, **{slot: shown}), "yes" if true else "no"))

    by_shape = tt.unique_by(scene, lambda i: i.label)
    by_colour = tt.unique_by(scene, lambda i: i.colour)
    if by_shape:
        item = rng.choice(by_shape)
        ask("colour", "colour", item.colour, COLOURS, shape=item.label)
    if by_colour:
        item = rng.choice(by_colour)
        ask("shape", "shape", item.label, SHAPES, colour=item.colour)
    if named:
        item, name = rng.choice(named)
        ask("size", "size", item.size, SIZES, name=name)
        item, name = rng.choice(named)
        ask("position", "position", scene.position(item), positions(scene.grid), name=name)
    counts = range(1, min(tt.MAX_ITEMS, scene.grid * scene.grid) + 1)
    true = rng.random() < 0.5
    n = len(scene.items) if true else tt.other_than(rng, counts, len(scene.items))
    question = VERIFY["one"] if n == 1 else VERIFY["count"].format(number=NUMBER_WORDS[n])
    questions.append((question, "yes" if true else "no"))
    ask("style", "style", scene.style, STYLES)
    for kind, values in (("digit", "0123456789"), ("letter", LETTERS)):
        items = [i for i in scene.items if i.kind == kind]
        if items:
            item = rng.choice(items)
            ask(kind, kind, item.label, values, position=scene.position(item))
    word = scene.word()
    if word in WORDS:
        ask("word", "word", word, [w for w in fitting_words(scene.grid) if len(w) == len(word)])
    return questions


Pairs = dict[str, list[tuple[str, str]]]  # skill -> (question, answer) pairs


def _with_tail(question: str, skill: str, rng: random.Random) -> str:
    if rng.random() >= TAIL_PROBABILITY:
        return question
    if skill in YES_NO_SKILLS:
        return f"{question} {YES_NO} {SHORT_ANSWER}" if rng.random() < 0.5 else f"{question} {YES_NO}"
    return f"{question} {SHORT_ANSWER}"


def _templates(style: str) -> dict[str, str]:
    return ASK if style == "natural" else PLAIN


def _tails_on(found: Pairs, style: str, rng: random.Random) -> Pairs:
    """`found` without its empty skills, each question with its answer-format tail in the styles that have them."""
    if style not in TAILED_STYLES:
        return {skill: pairs for skill, pairs in found.items() if pairs}
    return {skill: [(_with_tail(q, skill, rng), a) for q, a in pairs] for skill, pairs in found.items() if pairs}


def pretrain_questions(scene: Scene, rng: random.Random, style: str = DEFAULT_STYLE) -> Pairs:
    """skill -> the (question, answer) pairs this scene answers unambiguously, in the wording of `style` ("natural":
    with the verify skill; "natural" and "tailed": some with an answer-format tail).

    "Where is ...?" and "Is ... small or large?" name their object by shape, by colour or by both, whichever
    names it alone. Named by colour and shape always, they could all be answered by finding the object by its
    colour, and "What colour is the triangle?" was the only question that needed finding it by its shape: that
    lookup did not form (BENCHMARKS.md)."""
    pretrain_skills(style)  # validates the style
    natural = style == "natural"
    templates = _templates(style)

    def _ask(skill: str, **slots: str) -> str:
        return templates[skill].format(**slots)

    named = [(item, rng.choice(references(scene, item))) for item in tt.unique_by(scene, lambda i: (i.colour, i.label))]
    word = scene.word()
    found = {
        "colour": [(_ask("colour", shape=i.label), i.colour) for i in tt.unique_by(scene, lambda i: i.label)],
        "shape": [(_ask("shape", colour=i.colour), i.label) for i in tt.unique_by(scene, lambda i: i.colour)],
        "count": [(_ask("count"), str(len(scene.items)))],
        "position": [(_ask("position", name=name), scene.position(i)) for i, name in named],
        "existence": [],
        "size": [(_ask("size", name=name), i.size) for i, name in named],
        "style": [(_ask("style"), scene.style)],
        "digit": [(_ask("digit", position=scene.position(i)), i.label) for i in scene.items if i.kind == "digit"],
        "letter": [(_ask("letter", position=scene.position(i)), i.label) for i in scene.items if i.kind == "letter"],
        "word": [(_ask("word"), word)] if word in WORDS else [],
        "verify": _verify(scene, rng, named) if natural else [],
    }
    if shapes := scene.shapes():
        item = rng.choice(shapes)
        colour, shape = tt.hard_negative(scene, rng)
        found["existence"] = [(_ask("existence", colour=item.colour, shape=item.label), "yes"),
                              (_ask("existence", colour=colour, shape=shape), "no")]
    return _tails_on(found, style, rng)


def count_questions(scene: Scene, rng: random.Random, style: str = DEFAULT_STYLE) -> Pairs:
    """skill -> (question, answer) for counting the objects of one colour and of one shape ("how many red objects
    are there ?", "how many crosses are there ?"), on a scene that holds only shapes (else {}). The colour or shape
    is drawn as the training tasks count_colour and count_shape draw theirs (`train_tasks.count_of`: the commonest,
    a present one or any), so the answers run from 0 to the number of objects."""
    pretrain_skills(style)  # validates the style
    if not scene.items or len(scene.shapes()) != len(scene.items):
        return {}
    templates = _templates(style)
    colour, by_colour = tt.count_of(scene, rng, "colour", COLOURS)
    shape, by_shape = tt.count_of(scene, rng, "label", SHAPES)
    found = {"count_colour": [(templates["count_colour"].format(colour=colour), str(by_colour))],
             "count_shape": [(templates["count_shape"].format(shapes=tt.plural(shape)), str(by_shape))]}
    return _tails_on(found, style, rng)


# Checks (`check_questions`): yes/no questions that state a value and ask whether the image shows it, the skill an
# LLM brings to MME's "Is the circle in this image red?" from its text. Each is asked in two forms, as existence
# ("is there a small red circle ?", the form the base answers best: every object is matched against every value
# named) and as a statement about a named object ("is the red circle small ?"), with a place phrase ("in the
# image", "of the picture") on half of them. MME's own words ("in this image", "drawn in the ... style", "Please
# answer yes or no.") are never used. Trained in the base's last phase (`base.PretrainConfig.check_steps`);
# BENCHMARKS.md, "Checks in the base".
CHECK_FORMS = ("there", "the")
PLACE_SHARE = 0.5
_IN = (" in the image", " in the picture")
_OF = (" of the image", " of the picture")
CHECK = "check"  # the skill's name in pretrain_eval.json; each training record's task_name is "check <what>"


def check_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(what is checked, question, "yes" | "no") for each value of the scene the checks can name: existence, size,
    position, colour, shape, count, style, word; each true with probability 1/2, in a form of `CHECK_FORMS` drawn
    at random. A false existence check changes one value of a present object half the time (the hard case), else
    names an absent object."""
    checks: list[tuple[str, str, str]] = []

    def place(phrases: tuple[str, ...]) -> str:
        return rng.choice(phrases) if rng.random() < PLACE_SHARE else ""

    def add(what: str, question: str, true: bool) -> None:
        checks.append((what, question, "yes" if true else "no"))

    if shapes := scene.shapes():  # plain existence with a place phrase: without it POPE fell from 98 to 75-90
        item = rng.choice(shapes)
        colour, shape = (item.colour, item.label) if rng.random() < 0.5 else tt.hard_negative(scene, rng)
        add("existence", f"is there a {colour} {shape}{place(_IN)} ?", scene.has(colour, shape))
    named = tt.unique_by(scene, lambda i: (i.colour, i.label))
    if named:
        item = rng.choice(named)
        size = item.size if rng.random() < 0.5 else tt.other_than(rng, SIZES, item.size)
        if rng.choice(CHECK_FORMS) == "the":
            add("size", f"is the {item.colour} {item.label}{place(_IN)} {size} ?", size == item.size)
        elif size == item.size or rng.random() < 0.5:
            add("size", f"is there a {size} {item.colour} {item.label}{place(_IN)} ?", size == item.size)
        else:
            colour, shape = tt.hard_negative(scene, rng)
            add("size", f"is there a {rng.choice(SIZES)} {colour} {shape}{place(_IN)} ?", False)
        item = rng.choice(named)
        where = scene.position(item)
        at = where if rng.random() < 0.5 else tt.other_than(rng, positions(scene.grid), where)
        if rng.choice(CHECK_FORMS) == "the":
            add("position", f"is the {item.colour} {item.label} at the {at}{place(_OF)} ?", at == where)
        elif at == where or rng.random() < 0.6:
            add("position", f"is there a {item.colour} {item.label} at the {at}{place(_OF)} ?", at == where)
        else:
            colour, shape = tt.hard_negative(scene, rng)
            add("position", f"is there a {colour} {shape} at the {rng.choice(positions(scene.grid))}{place(_OF)} ?",
                False)
    if by_shape := tt.unique_by(scene, lambda i: i.label):
        item = rng.choice(by_shape)
        colour = item.colour if rng.random() < 0.5 else tt.other_than(rng, COLOURS, item.colour)
        add("colour", f"is the {item.label}{place(_IN)} {colour} ?", colour == item.colour)
    if by_colour := tt.unique_by(scene, lambda i: i.colour):
        item = rng.choice(by_colour)
        shape = item.label if rng.random() < 0.5 else tt.other_than(rng, SHAPES, item.label)
        add("shape", f"is the {item.colour} object{place(_IN)} a {shape} ?", shape == item.label)
    if scene.items and len(scene.shapes()) == len(scene.items):
        n = len(scene.items)
        shown = n if rng.random() < 0.5 else tt.other_than(rng, range(1, min(tt.MAX_ITEMS, scene.grid ** 2) + 1), n)
        if rng.choice(CHECK_FORMS) == "the":
            add("count", f"is the number of objects{place(_IN)} {NUMBER_WORDS[shown]} ?", shown == n)
        else:
            there = "is there one object" if shown == 1 else f"are there {NUMBER_WORDS[shown]} objects"
            add("count", f"{there}{place(_IN)} ?", shown == n)
    style = scene.style if rng.random() < 0.5 else tt.other_than(rng, STYLES, scene.style)
    if rng.choice(CHECK_FORMS) == "the":
        add("style", f"is the style{place(_OF)} {style} ?", style == scene.style)
    else:
        add("style", f"is the image {style} ?", style == scene.style)
    word = scene.word()
    same_length = [w for w in fitting_words(scene.grid) if len(w) == len(word) and w != word]
    if word in WORDS and same_length:
        shown = word if rng.random() < 0.5 else rng.choice(same_length)
        add("word", f"is the word{place(_IN)} {shown} ?", shown == word)
    return checks


def tailed_check(question: str, rng: random.Random) -> str:
    """A check with the tailed wording's answer-format tail on `TAIL_PROBABILITY` of them."""
    return _with_tail(question, "existence", rng)


def untailed(question: str) -> str:
    """The question without its answer-format tail."""
    return question.removesuffix(SHORT_ANSWER).strip().removesuffix(YES_NO).strip()


def question_kind(question: str) -> str:
    """The kind of a pretraining question: its skill, and for "Where is ...?" and "Is ... small or large?" how the
    object is named ('position by shape', 'size by colour', 'size by colour and shape'), since each way of naming
    is a lookup of its own for the model to learn. Tails are ignored. Raises ValueError for text no template
    writes."""
    text = question.replace(IMAGE_MARKER, "").strip()
    if text == DESCRIBE:
        return "description"
    text = untailed(text)
    for skill, pattern in _PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        if skill not in ("position", "size"):
            return skill
        name = match["name"]
        way = "shape" if name in SHAPES else "colour" if name.endswith(" object") else "colour and shape"
        return f"{skill} by {way}"
    raise ValueError(f"not a pretraining question of the suite: {question!r}")
