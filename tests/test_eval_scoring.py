"""Scoring rules for the unseen datasets other than MME, on hand-worked cases."""

import pytest

from cmlora.evaluation.scoring import (
    entailment_label,
    exact_match,
    item_scores,
    label_match,
    normalize_answer,
    pope_answer,
    pope_metrics,
    score_task,
    true_false,
    vqa_accuracy,
)

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGITS = tuple(str(digit) for digit in range(10))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two dogs!", "2 dogs"),  # "!" not next to a space -> space; number word -> digit
        ("the cat", "cat"),
        ("An Apple", "apple"),
        ("1,000", "1000"),  # comma between digits: punctuation deleted, the number stays whole
        ("1,000 (about)", "1000 about"),  # ... and then every mark is deleted, not spaced
        ("dont", "don't"),
        ("don't", "don't"),  # apostrophes are kept
        ("Yes, it is.", "yes it is"),  # ", " -> deleted; final period deleted
        ("t-shirt", "t shirt"),  # no space next to "-": replaced by a space
        ("1.5", "1.5"),  # a period followed by a digit stays
        ("5.", "5"),
        ("a.m.", "am"),
        ("None", "0"),
        ("  A   Red\tCar \n", "red car"),
        ("answer: dog", "answer: dog"),  # colons are not in the official punctuation list
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_vqa_accuracy_leave_one_out_with_ten_answers():
    answers = ["2 dogs", "two dogs"] + ["dogs"] * 8
    # 2 of 10 references match. Leaving out a matching one: 1 match left -> 1/3; a non-matching one: 2 -> 2/3.
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("Two dogs.", answers) == pytest.approx(0.6)
    # 3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9; 4 or more: 1.0.
    assert vqa_accuracy("2 dogs", ["2 dogs"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2 dogs", ["2 dogs"] * 4 + ["cat"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("horse", answers) == 0.0


def test_vqa_accuracy_with_few_references_is_exact_match():
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("3", ["2"]) == 0.0
    assert vqa_accuracy("stop", ["STOP", "stop", "stop"]) == 1.0  # the formula would give 2/3 here
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("stop", [])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("stop", "stop")


def test_exact_match():
    assert exact_match("The Cat.", "cat")
    assert not exact_match("cats", "cat")


@pytest.mark.parametrize(
    ("prediction", "label", "expected"),
    [
        ("Dog", "dog", True),
        ("A dog.", "dog", True),
        ("It is a dog", "dog", True),  # lead-in dropped
        ("This is a picture of a dog sitting on grass.", "dog", True),
        ("Dog.\nIt is sitting on the grass.", "dog", True),  # first line
        ("Seven", "7", True),
        ("maple tree", "maple_tree", True),
        ("hot dog", "dog", False),  # a different thing that contains the label
        ("dogs", "dog", False),  # not the whole word
        ("I see a dog", "dog", False),  # without the label set only the start counts
        ("not a dog", "dog", False),
    ],
)
def test_label_match_without_label_set(prediction, label, expected):
    assert label_match(prediction, label) is expected


@pytest.mark.parametrize(
    ("prediction", "label", "labels", "expected"),
    [
        ("It is a dog", "dog", CIFAR10, True),
        ("I see a cute dog on the grass.", "dog", CIFAR10, True),
        ("a cat or a dog", "dog", CIFAR10, False),  # two labels named
        ("I see a cat", "dog", CIFAR10, False),
        ("The digit is 7.", "7", DIGITS, True),
        ("seven", "7", DIGITS, True),
        ("17", "7", DIGITS, False),
        ("a pickup truck", "pickup_truck", ("truck", "pickup_truck"), True),
        ("a pickup truck", "truck", ("truck", "pickup_truck"), False),  # inside the longer label
        ("hot dog", "dog", ("dog", "hot dog"), False),
    ],
)
def test_label_match_with_label_set(prediction, label, labels, expected):
    assert label_match(prediction, label, labels) is expected


def test_label_match_label_must_be_in_the_set():
    with pytest.raises(ValueError, match="not in the label set"):
        label_match("a wolf", "wolf", CIFAR10)


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("True", "true"),
        ("yes, the cat is on the mat", "true"),
        ("False.", "false"),
        ("No", "false"),
        ("The statement is true.", "true"),
        ("That is not true", "other"),
        ("I don't know", "other"),
        ("", "other"),
    ],
)
def test_true_false(prediction, expected):
    assert true_false(prediction) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Entailment", "entailment"),
        ("yes", "entailment"),
        ("No, the man is sleeping.", "contradiction"),
        ("contradiction", "contradiction"),
        ("It is not possible to tell", "neutral"),
        ("Maybe", "neutral"),
        ("The answer is neutral.", "neutral"),
        ("The image does not entail the sentence", "other"),
        ("a cat", "other"),
    ],
)
def test_entailment_label(prediction, expected):
    assert entailment_label(prediction) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("No.", "no"),
        ("NO", "no"),  # lowercased (the official script would read "NO" as yes)
        ("Not at all", "no"),
        ("Yes, there is a dog.", "yes"),
        ("There is a dog. There is no cat.", "yes"),  # only the first sentence counts
        ("No\nThere is not", "no"),
        ("Nothing like that", "yes"),  # "nothing" is not the word "no"
        ("no, there isn't", "no"),
    ],
)
def test_pope_answer(prediction, expected):
    assert pope_answer(prediction) == expected


def test_pope_metrics_hand_worked_confusion_matrix():
    predictions = [
        "Yes, there is a dog.",  # target yes: TP
        "yes",  # yes: TP
        "No, there is not.",  # yes: FN
        "There is a dog in the image.",  # yes: TP (no "no"/"not")
        "NO.",  # no: TN
        "Yes",  # no: FP
        "I see a cat. There is no dog.",  # no: FP (first sentence only)
        "There is not a dog",  # no: TN
    ]
    targets = ["yes"] * 4 + ["No"] * 4
    metrics = pope_metrics(predictions, targets)
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (3, 2, 2, 1)
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["precision"] == pytest.approx(3 / 5)
    assert metrics["recall"] == pytest.approx(3 / 4)
    assert metrics["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)  # 2/3
    assert metrics["yes_ratio"] == pytest.approx(5 / 8)
    assert metrics["count"] == 8


def test_pope_metrics_zero_divisions_give_zero():
    metrics = pope_metrics(["No", "no"], ["yes", "no"])
    assert (metrics["precision"], metrics["recall"], metrics["f1"], metrics["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    assert metrics["accuracy"] == 0.5
    with pytest.raises(ValueError, match="target 1 is 'maybe'"):
        pope_metrics(["no", "no"], ["yes", "maybe"])


def test_score_task_dispatch():
    vqa = score_task("vqa", ["Two dogs", "cat"], [["2 dogs", "two dogs"] + ["dogs"] * 8, "a cat"])
    assert vqa == {"accuracy": pytest.approx((0.6 + 1.0) / 2), "count": 2}
    assert score_task("true_false", ["Yes", "maybe", "false"], ["true", "False", "true"]) == {
        "accuracy": pytest.approx(1 / 3), "count": 3, "unparsed": 1,
    }
    entailment = score_task("entailment", ["yes", "it is not possible to tell"], ["entailment", "neutral"])
    assert entailment == {"accuracy": 1.0, "count": 2, "unparsed": 0}
    labels = score_task("label", ["It is a dog", "a cat or a dog"], ["dog", "dog"], labels=CIFAR10)
    assert labels == {"accuracy": 0.5, "count": 2}
    pope = score_task("yes_no", ["Yes", "No", "Yes"], ["yes", "no", "no"])
    assert pope["accuracy"] == pytest.approx(2 / 3)
    assert (pope["precision"], pope["recall"], pope["yes_ratio"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert item_scores("label", ["dog", "cat"], ["dog", "dog"]) == [1.0, 0.0]


def test_score_task_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        score_task("vqa", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        score_task("vqa", [], [])
    with pytest.raises(ValueError, match="unknown task kind 'mcq'"):
        score_task("mcq", ["a"], ["a"])
    with pytest.raises(ValueError, match="only used by kind 'label'"):
        score_task("vqa", ["a"], ["a"], labels=["a"])
    with pytest.raises(ValueError, match="target 0 is 'perhaps'"):
        score_task("true_false", ["yes"], ["perhaps"])
    with pytest.raises(ValueError, match="only kind 'vqa' takes several"):
        score_task("label", ["dog"], [["dog", "puppy"]])
