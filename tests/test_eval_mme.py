"""MME scoring (method.md 6) on hand-worked examples, and the official results files."""

import pytest

from cmlora.evaluation.mme import (
    COGNITION,
    PERCEPTION,
    MMERow,
    parse_yes_no,
    read_official_results,
    score_mme,
    write_official_results,
)


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("YES", "yes"),
        ("No.", "no"),
        (" yes", "yes"),  # stripped first
        ("yes\n", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("Not sure", "no"),  # "not " contains "no"
        ("None of them", "no"),
        ("Know", "no"),  # "know" contains "no"
        ("Eyes are closed", "yes"),  # "eyes" contains "yes"
        ("I think yes", "other"),  # only the first 4 characters count: "i th"
        ("The answer is no", "other"),
        ("Y", "other"),
        ("", "other"),
    ],
)
def test_parse_yes_no_follows_the_official_rule_and_its_quirks(prediction, expected):
    assert parse_yes_no(prediction) == expected


def row(subtask, image, answer, prediction, question=None):
    return MMERow(subtask, image, question or f"Is it {answer} for {image}?", answer, prediction)


# Rows interleaved across images on purpose: an image's questions are paired by image name, not by position.
HAND_ROWS = [
    # existence: e1 both right; e2 one wrong; e3 an "other" answer (wrong) and a right one.
    row("existence", "e1.jpg", "Yes", "Yes"),
    row("existence", "e2.jpg", "Yes", "No"),
    row("existence", "e1.jpg", "No", "No."),
    row("existence", "e3.jpg", "Yes", "I think so"),
    row("existence", "e2.jpg", "No", "no"),
    row("existence", "e3.jpg", "No", "Not at all"),
    # code_reasoning: c1 both right; c2 one wrong.
    row("code_reasoning", "c1.png", "Yes", "Yes, it prints 3."),
    row("code_reasoning", "c1.png", "No", "No"),
    row("code_reasoning", "c2.png", "yes", "yes"),
    row("code_reasoning", "c2.png", "no", "Yes"),
]


def test_score_mme_hand_worked_two_subtasks():
    result = score_mme(HAND_ROWS)
    existence = result["subtasks"]["existence"]
    # 4 of 6 questions right; 1 of 3 images with both right: 100 * 4/6 + 100 * 1/3 = 100.
    assert existence["acc"] == pytest.approx(4 / 6)
    assert existence["acc_plus"] == pytest.approx(1 / 3)
    assert existence["score"] == pytest.approx(100.0)
    assert (existence["questions"], existence["images"], existence["other_answers"]) == (6, 3, 1)
    code = result["subtasks"]["code_reasoning"]
    # 3 of 4 right; 1 of 2 images: 75 + 50 = 125.
    assert (code["acc"], code["acc_plus"], code["score"]) == pytest.approx((0.75, 0.5, 125.0))
    assert result["perception"] == pytest.approx(100.0)
    assert result["cognition"] == pytest.approx(125.0)
    assert result["total"] == pytest.approx(225.0)
    assert result["subtasks_scored"] == ["existence", "code_reasoning"]


def test_missing_subtasks_are_listed_not_counted_as_zero():
    result = score_mme(HAND_ROWS)
    assert result["missing"] == [name for name in PERCEPTION + COGNITION if name not in ("existence", "code_reasoning")]
    assert len(result["missing"]) == 12
    assert result["complete"] is False
    assert "12 are missing" in result["note"]
    assert "existence" not in result["missing"]
    only_perception = score_mme(row for row in HAND_ROWS if row.subtask == "existence")
    assert only_perception["cognition"] is None  # no cognition subtask present: no cognition total
    assert only_perception["total"] == pytest.approx(100.0)


def test_all_fourteen_subtasks_perfect_give_the_maximum_scores():
    rows = [row(subtask, "1.jpg", answer, answer) for subtask in PERCEPTION + COGNITION for answer in ("Yes", "No")]
    result = score_mme(rows)
    assert (result["perception"], result["cognition"], result["total"]) == (2000.0, 800.0, 2800.0)
    assert result["complete"] is True and result["missing"] == []


def test_strict_rejects_unknown_subtasks_and_images_without_two_questions():
    with pytest.raises(ValueError, match=r"subtask 'shape_count' \(image 's1.jpg'\)"):
        score_mme([row("shape_count", "s1.jpg", "Yes", "Yes"), row("shape_count", "s1.jpg", "No", "No")])
    with pytest.raises(ValueError, match=r"subtask 'count', image 'k1.jpg': 1 question"):
        score_mme([row("count", "k1.jpg", "Yes", "Yes")])
    three = [row("count", "k1.jpg", answer, answer) for answer in ("Yes", "No", "No")]
    with pytest.raises(ValueError, match=r"subtask 'count', image 'k1.jpg': 3 question"):
        score_mme(three)
    with pytest.raises(ValueError, match=r"subtask 'count', image 'k1.jpg'.*'Maybe' is not Yes or No"):
        score_mme([row("count", "k1.jpg", "Yes", "Yes"), row("count", "k1.jpg", "Maybe", "No")])
    with pytest.raises(ValueError, match="no MME rows"):
        score_mme([])


def test_non_strict_scores_custom_subtasks_in_group_other():
    rows = [
        row("shape_count", "s1.jpg", "Yes", "Yes"),  # an image with one question, right
        row("shape_count", "s2.jpg", "No", "Yes"),  # one question, wrong
        row("shape_count", "s3.jpg", "Yes", "Yes"),  # three questions, all right
        row("shape_count", "s3.jpg", "No", "No"),
        row("shape_count", "s3.jpg", "No", "no"),
        row("existence", "e1.jpg", "Yes", "Yes"),
        row("existence", "e1.jpg", "No", "Yes"),
    ]
    result = score_mme(rows, strict=False)
    shapes = result["subtasks"]["shape_count"]
    # 4 of 5 questions right; 2 of 3 images all right: 80 + 66.67.
    assert shapes["score"] == pytest.approx(80 + 200 / 3)
    assert shapes["unpaired_images"] == 3
    assert result["other"] == pytest.approx(shapes["score"])
    assert result["perception"] == pytest.approx(50.0)  # acc 1/2, acc+ 0
    assert result["total"] == pytest.approx(50.0 + 80 + 200 / 3)
    assert "shape_count" not in result["missing"]


def test_custom_groups():
    rows = [row("shape_count", "s1.jpg", "Yes", "Yes"), row("shape_count", "s1.jpg", "No", "No")]
    result = score_mme(rows, groups={"shapes": ("shape_count", "shape_color")})
    assert result["shapes"] == 200.0
    assert result["missing"] == ["shape_color"]
    assert "perception" not in result
    with pytest.raises(ValueError, match="reserved"):
        score_mme(rows, groups={"total": ("shape_count",)})
    with pytest.raises(ValueError, match="two groups"):
        score_mme(rows, groups={"a": ("shape_count",), "b": ("shape_count",)})


def official_tool_scores(results_dir, subtasks):
    """MME's official calculation as method.md 6 describes it, written out independently for this test: read
    each <subtask>.txt line by line, take lines two at a time, split on tabs, lowercase (no strip), read the
    answer from the whole text or its first 4 characters."""

    def read_answer(text):
        if text in ("yes", "no"):
            return text
        return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"

    scores = {}
    for subtask in subtasks:
        with open(results_dir / f"{subtask}.txt", encoding="utf-8") as handle:
            lines = handle.readlines()
        pairs = [lines[i : i + 2] for i in range(0, len(lines), 2)]
        correct = both_right = 0
        for pair in pairs:
            assert len(pair) == 2
            right = 0
            for line in pair:
                _, _, truth, prediction = line.split("\t")
                right += read_answer(prediction.lower()) == truth.lower()
            correct += right
            both_right += right == 2
        scores[subtask] = 100 * correct / len(lines) + 100 * both_right / len(pairs)
    return scores


def test_official_results_round_trip_and_agree_with_the_official_tool(tmp_path):
    rows = [
        *HAND_ROWS,
        row("OCR", "o1.jpg", "Yes", "  Yes\tthe sign says STOP"),  # tab inside; two leading spaces
        row("OCR", "o1.jpg", "No", "\nNo,\r\nit does not"),  # line breaks inside
    ]
    paths = write_official_results(rows, tmp_path)
    assert [path.name for path in paths] == ["existence.txt", "code_reasoning.txt", "OCR.txt"]
    existence_lines = (tmp_path / "existence.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in existence_lines] == ["e1.jpg", "e1.jpg", "e2.jpg", "e2.jpg", "e3.jpg",
                                                                 "e3.jpg"]
    assert existence_lines[0] == "e1.jpg\tIs it Yes for e1.jpg?\tYes\tYes"
    assert (tmp_path / "OCR.txt").read_text(encoding="utf-8") == (
        "o1.jpg\tIs it Yes for o1.jpg?\tYes\tYes the sign says STOP\n"
        "o1.jpg\tIs it No for o1.jpg?\tNo\tNo,  it does not\n"
    )

    read_back = read_official_results(tmp_path)
    assert len(read_back) == len(rows)
    assert read_back[0] == MMERow("OCR", "o1.jpg", "Is it Yes for o1.jpg?", "Yes", "Yes the sign says STOP")
    assert {(r.subtask, r.image, r.question, r.answer, r.prediction) for r in read_back if r.subtask != "OCR"} == {
        (r.subtask, r.image, r.question, r.answer, r.prediction) for r in HAND_ROWS
    }

    ours = score_mme(rows)
    rescored = score_mme(read_back)
    official = official_tool_scores(tmp_path, ["existence", "code_reasoning", "OCR"])
    for subtask, score in official.items():
        assert ours["subtasks"][subtask]["score"] == pytest.approx(score)
        assert rescored["subtasks"][subtask]["score"] == pytest.approx(score)
    assert official["OCR"] == 200.0  # the official tool would read "  ye" as other without the writer's strip


def test_read_official_results_errors_name_file_and_line(tmp_path):
    (tmp_path / "count.txt").write_text("a.jpg\tq\tYes\tYes\na.jpg\tq\tNo\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"count.txt:2: expected 4 tab-separated fields.*found 3"):
        read_official_results(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        read_official_results(tmp_path / "absent")


def test_write_official_results_rejects_unwritable_data(tmp_path):
    with pytest.raises(ValueError, match=r"question 'two\\tfields'"):
        write_official_results([MMERow("count", "a.jpg", "two\tfields", "Yes", "Yes")], tmp_path)
    with pytest.raises(ValueError, match="results file name"):
        write_official_results([MMERow("../count", "a.jpg", "q", "Yes", "Yes")], tmp_path)
