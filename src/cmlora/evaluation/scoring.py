"""Scoring the unseen datasets other than MME (method.md 6): Text-VQA, VSR, SNLI-VE, CIFAR-10/100, MNIST, POPE.

Pure functions from generated text and targets to numbers. Every rule is stated in its function's docstring;
`score_task` dispatches on the kind of task:

    kind          datasets             a prediction is right when
    "vqa"         Text-VQA             VQA accuracy (leave-one-out over the reference answers)
    "true_false"  VSR                  true_false(prediction) == true_false(target)
    "entailment"  SNLI-VE              entailment_label(prediction) == entailment_label(target)
    "label"       CIFAR-10/100, MNIST  label_match(prediction, target, labels)
    "yes_no"      POPE                 pope_answer(prediction) == target; adds precision, recall, F1, yes-ratio
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# --- VQA answer normalisation -------------------------------------------------------------------------------------

# The punctuation marks the official VQA evaluation handles. Periods have their own rule; apostrophes and colons
# are left alone (so "don't" keeps its apostrophe).
_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions written without their apostrophe. Words that are also ordinary words ("ill", "well", "its",
# "lets", "shell", "were", "id", "hell") are left out on purpose.
_CONTRACTIONS = {
    word.replace("'", ""): word
    for word in (
        "ain't", "aren't", "can't", "could've", "couldn't", "didn't", "doesn't", "don't", "hadn't", "hasn't",
        "haven't", "he's", "i'm", "i've", "isn't", "it'd", "it'll", "mightn't", "might've", "mustn't", "must've",
        "needn't", "o'clock", "shan't", "she's", "should've", "shouldn't", "that's", "there's", "they'd",
        "they'll", "they're", "they've", "wasn't", "weren't", "we've", "what's", "what're", "where's", "who's",
        "who'd", "who'll", "who've", "why's", "won't", "would've", "wouldn't", "y'all", "you'd", "you'll",
        "you're", "you've",
    )
}


def normalize_answer(text: str) -> str:
    """Normalise an answer the way the official VQA evaluation does, so that trivially different strings compare
    equal ("Two dogs!" and "2 dogs"). The steps, in order:

      1. Punctuation. Each of  ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !  is deleted if the text has that mark
         next to a space (e.g. "yes, it is") or has a comma between two digits anywhere (so "1,000" becomes
         "1000", a number), and is replaced by a space otherwise ("t-shirt" -> "t shirt", "dogs!" -> "dogs ").
      2. Periods. A period is deleted unless a digit follows it: "1.5" stays, "dog." -> "dog", "a.m." -> "am".
         (The official code was written to keep periods after a digit as well, but its look-behind is misspelt
         and only the following character is checked; the published numbers were computed that way.)
      3. Lowercase and split on whitespace (which also collapses runs of spaces, tabs and newlines).
      4. Number words zero to ten become digits ("two" -> "2"); "none" becomes "0", as in VQA's counting answers.
      5. The articles "a", "an", "the" are dropped.
      6. Common contractions written without an apostrophe get it back ("dont" -> "don't", "isnt" -> "isn't").
      7. The words are joined with single spaces.

    Unlike the official script, references get the same full normalisation as predictions (VQA's own reference
    answers are already normalised, so this changes nothing for them and makes other data comparable).
    """
    delete_marks = _DIGIT_COMMA_DIGIT.search(text) is not None
    cleaned = text
    for mark in _PUNCTUATION:
        if delete_marks or f"{mark} " in text or f" {mark}" in text:
            cleaned = cleaned.replace(mark, "")
        else:
            cleaned = cleaned.replace(mark, " ")
    cleaned = _PERIOD_NOT_BEFORE_DIGIT.sub("", cleaned)
    words = []
    for word in cleaned.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against its reference answers (all compared after `normalize_answer`).

    With N >= 4 references (VQA and Text-VQA have 10): for each reference, leave it out and score
    min(1, number of the other N-1 references equal to the prediction / 3); the accuracy is the mean of the N
    scores. A prediction that 3 or more annotators gave scores 1; e.g. 2 matches among 10 give
    (2 * 1/3 + 8 * 2/3) / 10 = 0.6.

    With N < 4 references (our synthetic data has one) the formula degenerates (with one reference nothing is
    left to match; with three, even a unanimous answer would score only 2/3), so the accuracy is instead 1.0 if
    the prediction equals any reference and 0.0 otherwise.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError(f"vqa_accuracy needs a non-empty list of reference answers, got {answers!r}")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    if len(matches) < 4:
        return float(any(matches))
    total_matches = sum(matches)
    leave_one_out = [min(1.0, (total_matches - match) / 3) for match in matches]
    return sum(leave_one_out) / len(leave_one_out)


def exact_match(prediction: str, target: str) -> bool:
    """True when prediction and target are equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(target)


# --- classification labels ----------------------------------------------------------------------------------------

_FIRST_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|\n")
# Lead-ins stripped (repeatedly) from the start of a normalised prediction before the start-of-answer rule.
_LEAD_INS = (
    ("it", "is"), ("it's",), ("this", "is"), ("that", "is"), ("there", "is"), ("answer", "is"), ("answer:",),
    ("image", "shows"), ("picture", "shows"), ("photo", "shows"), ("image", "of"), ("picture", "of"), ("photo", "of"),
)


def _first_sentence(text: str) -> str:
    """The text up to the first line break or sentence end ('.', '!' or '?' followed by whitespace or the end)."""
    return _FIRST_SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def _spans(words: list[str], phrase: list[str]) -> list[tuple[int, int]]:
    """Where `phrase` occurs in `words` as a run of whole words: [(start, end)]."""
    size = len(phrase)
    return [(i, i + size) for i in range(len(words) - size + 1) if words[i : i + size] == phrase]


def _labels_found(words: list[str], labels: Sequence[str]) -> set[str]:
    """The labels occurring in `words` as whole-word runs, ignoring an occurrence that lies inside the occurrence
    of a longer label ("pickup truck" does not also count as "truck")."""
    occurrences = [(span, label) for label in labels for span in _spans(words, label.split()) if label]
    found = set()
    for (start, end), label in occurrences:
        inside_longer = any(
            other_start <= start and end <= other_end and other_end - other_start > end - start
            for (other_start, other_end), _ in occurrences
        )
        if not inside_longer:
            found.add(label)
    return found


def _strip_lead_ins(words: list[str]) -> list[str]:
    stripped = True
    while stripped:
        stripped = False
        for lead_in in _LEAD_INS:
            if tuple(words[: len(lead_in)]) == lead_in:
                words = words[len(lead_in) :]
                stripped = True
    return words


def label_match(prediction: str, label: str, labels: Sequence[str] | None = None) -> bool:
    """Whether a generated answer names the class `label` (CIFAR-10, CIFAR-100, MNIST).

    Prediction and labels are compared after `normalize_answer` (so case, punctuation, articles and number words
    do not matter: "A dog." names "dog", "Seven" names "7", and "maple_tree" is the label "maple tree").
    The prediction names `label` when:
      1. the whole prediction equals the label, or
      2. its first sentence or line equals it ("Dog.\\nIt sits on the grass." names "dog"), or
      3. with the label set `labels` given: the label occurs in the prediction as a whole-word run and no other
         label of the set does ("It is a dog" names "dog"; "a cat or a dog" names neither). An occurrence inside
         a longer label's occurrence does not count, so with labels "truck" and "pickup truck", "a pickup truck"
         names only "pickup truck". `label` must be one of `labels`.
         Without `labels`: the prediction, after lead-ins such as "it is", "this is", "the image shows",
         "a picture of" are dropped from its start, begins with the label as whole words ("It is a dog sitting"
         names "dog"; "hot dog" does not name "dog", and "dogs" does not either).
    Negation is not understood: with `labels`, "not a cat, a dog" names neither (two labels); without, "not a dog"
    does not begin with "dog". Pass `labels` whenever the label set is known: it is the more reliable rule.
    """
    target = normalize_answer(label)
    if not target:
        raise ValueError(f"label {label!r} is empty after normalisation")
    label_set = None if labels is None else [normalize_answer(candidate) for candidate in labels]
    if label_set is not None and target not in label_set:
        raise ValueError(f"label {label!r} is not in the label set given ({len(label_set)} labels)")
    predicted = normalize_answer(prediction)
    if predicted == target or normalize_answer(_first_sentence(prediction)) == target:
        return True
    words = predicted.split()
    if label_set is not None:
        return _labels_found(words, label_set) == {target}
    target_words = target.split()
    return _strip_lead_ins(words)[: len(target_words)] == target_words


# --- true/false, entailment, yes/no -------------------------------------------------------------------------------


def true_false(prediction: str) -> str:
    """Read a VSR answer as "true", "false" or "other" (after `normalize_answer`).

      1. If the first word is "true" or "yes", the answer is "true"; if it is "false" or "no", "false". Yes/no are
         accepted because instruction-tuned models often answer a true/false question with them.
      2. Otherwise, if exactly one of the words "true" and "false" occurs anywhere and the word "not" does not,
         that is the answer ("The statement is true." -> "true"; "That is not true" -> "other").
      3. Otherwise "other", which is always wrong.
    """
    words = normalize_answer(prediction).split()
    if not words:
        return "other"
    if words[0] in ("true", "yes"):
        return "true"
    if words[0] in ("false", "no"):
        return "false"
    found = {word for word in words if word in ("true", "false")}
    if len(found) == 1 and "not" not in words:
        return found.pop()
    return "other"


_ENTAILMENT_WORDS = {
    "entailment": "entailment", "entail": "entailment", "entails": "entailment", "entailed": "entailment",
    "neutral": "neutral",
    "contradiction": "contradiction", "contradict": "contradiction", "contradicts": "contradiction",
    "contradictory": "contradiction", "contradicted": "contradiction",
}
# The answer options of NLI instruction templates: "yes" / "it is not possible to tell" / "no".
_NEUTRAL_OPENINGS = (
    ("it", "is", "not", "possible", "to", "tell"), ("not", "possible", "to", "tell"), ("maybe",),
    ("cannot", "tell"), ("can't", "tell"), ("it", "is", "unclear"), ("unclear",),
)


def entailment_label(prediction: str) -> str:
    """Read a SNLI-VE answer as "entailment", "neutral", "contradiction" or "other" (after `normalize_answer`).

      1. The answer options of NLI instruction templates, at the start of the answer: "it is not possible to
         tell", "not possible to tell", "maybe", "cannot tell", "can't tell", "it is unclear", "unclear"
         -> "neutral"; a first word "yes" -> "entailment"; a first word "no" -> "contradiction".
      2. Otherwise, if the answer names exactly one of the classes by a class word (entailment/entail/entails/
         entailed; neutral; contradiction/contradict/contradicts/contradictory/contradicted) and does not
         contain the word "not", that class ("The answer is neutral." -> "neutral"; "It does not entail it" ->
         "other").
      3. Otherwise "other", which is always wrong.
    """
    words = normalize_answer(prediction).split()
    if any(tuple(words[: len(opening)]) == opening for opening in _NEUTRAL_OPENINGS):
        return "neutral"
    if words and words[0] == "yes":
        return "entailment"
    if words and words[0] == "no":
        return "contradiction"
    named = {_ENTAILMENT_WORDS[word] for word in words if word in _ENTAILMENT_WORDS}
    if len(named) == 1 and "not" not in words:
        return named.pop()
    return "other"


def pope_answer(prediction: str) -> str:
    """Read a POPE answer as "yes" or "no", following POPE's official evaluation.

    Keep only the first sentence (the text before the first "."), delete commas, split into words: if one of the
    words is "no" or "not" the answer is "no", otherwise "yes" (so an answer that is neither counts as "yes").
    Two deliberate differences from the official script, which matter only for answers it misreads: the words are
    lowercased first (the script checks "No", "no" and "not", so "NO" and "Not" read as yes there), and words are
    split on any whitespace (the script splits on single spaces, so "No\\nThere is..." reads as yes there).
    """
    first_sentence = prediction.split(".", maxsplit=1)[0]
    words = first_sentence.replace(",", "").lower().split()
    return "no" if "no" in words or "not" in words else "yes"


def _yes_no_target(target: str, index: int) -> str:
    parsed = target.strip().lower() if isinstance(target, str) else None
    if parsed not in ("yes", "no"):
        raise ValueError(f"target {index} is {target!r}; POPE targets must be 'yes' or 'no'")
    return parsed


def pope_metrics(predictions: Sequence[str], targets: Sequence[str]) -> dict:
    """POPE's metrics, with "yes" (the object is in the image) as the positive class.

    Predictions are read with `pope_answer`; targets must be "yes" or "no" (any case). Returns accuracy,
    precision = TP / (TP + FP), recall = TP / (TP + FN), f1 = 2PR / (P + R), yes_ratio = share of predictions
    read as yes, the counts tp, fp, tn, fn, and count. Zero divisions give 0.0: precision when nothing was
    predicted yes, recall when no target is yes, f1 when precision + recall is 0.
    """
    _check_lengths(predictions, targets)
    tp = fp = tn = fn = 0
    for index, (prediction, target) in enumerate(zip(predictions, targets, strict=True)):
        predicted_yes = pope_answer(prediction) == "yes"
        target_yes = _yes_no_target(target, index) == "yes"
        tp += predicted_yes and target_yes
        fp += predicted_yes and not target_yes
        tn += not predicted_yes and not target_yes
        fn += not predicted_yes and target_yes
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    count = len(predictions)
    return {
        "accuracy": (tp + tn) / count, "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": (tp + fp) / count, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "count": count,
    }


# --- dispatch -----------------------------------------------------------------------------------------------------

TASK_KINDS = ("vqa", "true_false", "entailment", "label", "yes_no")


def _check_lengths(predictions: Sequence, targets: Sequence) -> None:
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets; they must pair one to one")
    if not predictions:
        raise ValueError("no predictions to score")


def _single_target(target: str | Sequence[str], kind: str, index: int) -> str:
    if not isinstance(target, str):
        raise ValueError(f"target {index} is a list {target!r}; only kind 'vqa' takes several reference answers")
    return target


def _parsed_target(parse, target: str | Sequence[str], kind: str, index: int) -> str:
    parsed = parse(_single_target(target, kind, index))
    if parsed == "other":
        raise ValueError(f"target {index} is {target!r}, which {parse.__name__} cannot read for kind {kind!r}")
    return parsed


def item_scores(
    kind: str,
    predictions: Sequence[str],
    targets: Sequence[str | Sequence[str]],
    *,
    labels: Sequence[str] | None = None,
) -> list[float]:
    """The score of each prediction (1.0 right, 0.0 wrong; VQA accuracy for "vqa"), by the rules of `score_task`."""
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {', '.join(TASK_KINDS)}")
    if labels is not None and kind != "label":
        raise ValueError(f"labels are only used by kind 'label', not {kind!r}")
    _check_lengths(predictions, targets)
    scores = []
    for index, (prediction, target) in enumerate(zip(predictions, targets, strict=True)):
        if kind == "vqa":
            scores.append(vqa_accuracy(prediction, [target] if isinstance(target, str) else target))
        elif kind == "true_false":
            scores.append(float(true_false(prediction) == _parsed_target(true_false, target, kind, index)))
        elif kind == "entailment":
            parsed_target = _parsed_target(entailment_label, target, kind, index)
            scores.append(float(entailment_label(prediction) == parsed_target))
        elif kind == "label":
            scores.append(float(label_match(prediction, _single_target(target, kind, index), labels)))
        else:  # yes_no
            parsed_target = _yes_no_target(_single_target(target, kind, index), index)
            scores.append(float(pope_answer(prediction) == parsed_target))
    return scores


def score_task(
    kind: str,
    predictions: Sequence[str],
    targets: Sequence[str | Sequence[str]],
    *,
    labels: Sequence[str] | None = None,
) -> dict:
    """Score one dataset: {"accuracy": mean item score, "count": number of predictions, ...}.

    kind "vqa": a target is one reference answer or a list of them, scored with `vqa_accuracy`.
    kind "true_false" / "entailment": prediction and target are both read with `true_false` /
      `entailment_label` and must agree; a target that reads as "other" raises ValueError; the result adds
      "unparsed", the number of predictions read as "other".
    kind "label": `label_match(prediction, target, labels)`.
    kind "yes_no" (POPE): accuracy plus precision, recall, f1, yes_ratio and the confusion counts of `pope_metrics`.
    Predictions and targets of different lengths, an empty list or an unknown kind raise ValueError.
    """
    scores = item_scores(kind, predictions, targets, labels=labels)
    result: dict = {"accuracy": sum(scores) / len(scores), "count": len(scores)}
    if kind == "yes_no":
        result.update(pope_metrics(predictions, targets))
    elif kind in ("true_false", "entailment"):
        parse = true_false if kind == "true_false" else entailment_label
        result["unparsed"] = sum(parse(prediction) == "other" for prediction in predictions)
    return result
