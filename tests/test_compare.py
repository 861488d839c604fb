"""`cmlora compare`: runs' scores side by side, every column its own run, held-out and MME subtask rows."""

import json

import pytest

from cmlora.cli import main
from cmlora.evaluation.runner import compare


def write_scores(folder, heldout=None, mme=None):
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"mean_of_seven": None}
    if mme:
        summary = {"mme_perception": 100.0 * sum(mme.values()), "mme_total": 100.0 * sum(mme.values()), **summary}
    scores = {"summary": summary, "mme": {"subtasks": {k: {"acc": v} for k, v in mme.items()}} if mme else None,
              "tasks": {}}
    if heldout is not None:
        scores["heldout"] = {task: {"accuracy": value, "count": 30} for task, value in heldout.items()}
    (folder / "scores.json").write_text(json.dumps(scores))
    return folder / "scores.json"


def rows(table):
    lines = table.splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return lines[0], {row[0]: row[1:] for row in cells}


def test_runs_whose_score_folders_share_a_name_get_a_column_each(tmp_path):
    lora = write_scores(tmp_path / "runs" / "lora" / "eval-train", heldout={"count": 0.9})
    mixlora = write_scores(tmp_path / "runs" / "mixlora" / "eval-train", heldout={"count": 0.5})
    write_scores(tmp_path / "runs" / "plain" / "eval", heldout={"count": 0.7})
    header, table = rows(compare([lora, mixlora, tmp_path / "runs" / "plain"]))
    assert header == "| metric | lora/eval-train | mixlora/eval-train | plain |"
    assert table["heldout count"] == ["90.00", "50.00", "70.00"]


def test_names_grow_only_as_far_as_needed_to_differ(tmp_path):
    first = write_scores(tmp_path / "a" / "x" / "eval-train")
    second = write_scores(tmp_path / "b" / "x" / "eval-train")
    third = write_scores(tmp_path / "b" / "y" / "eval-mme")
    header, _ = rows(compare([first, second, third]))
    assert header == "| metric | a/x/eval-train | b/x/eval-train | eval-mme |"


def test_a_linked_run_keeps_the_name_it_was_given(tmp_path):
    write_scores(tmp_path / "base0" / "eval")
    (tmp_path / "lora-s0").symlink_to(tmp_path / "base0")
    other = write_scores(tmp_path / "mixlora-s0" / "eval")
    header, _ = rows(compare([tmp_path / "lora-s0", other]))
    assert header == "| metric | lora-s0 | mixlora-s0 |"


def test_the_same_scores_twice_is_an_error(tmp_path):
    scores = write_scores(tmp_path / "run" / "eval")
    with pytest.raises(ValueError, match="given twice"):
        compare([tmp_path / "run", scores])


def test_heldout_tasks_their_mean_and_the_count_at_a_threshold(tmp_path):
    a = write_scores(tmp_path / "a", heldout={"t1": 1.0, "t2": 0.8, "t3": 0.3})
    b = write_scores(tmp_path / "b", heldout={"t1": 0.6, "t2": 0.79, "t3": 0.9})
    _, table = rows(compare([a, b], at_least=0.8))
    assert table["heldout t2"] == ["80.00", "79.00"]
    assert table["heldout mean"] == ["70.00", "76.33"]
    assert table["heldout tasks >= 80"] == ["2", "1"]  # counts print as integers
    _, table = rows(compare([a, b]))
    assert not any(key.startswith("heldout tasks") for key in table)


def test_mme_subtasks_and_a_run_without_them(tmp_path):
    mme = write_scores(tmp_path / "with", mme={"existence": 0.9, "count": 0.5})
    heldout = write_scores(tmp_path / "without", heldout={"t1": 1.0})
    _, table = rows(compare([mme, heldout]))
    assert table["mme existence acc"] == ["90.00", "-"]
    assert table["mme count acc"] == ["50.00", "-"]
    assert table["heldout t1"] == ["-", "100.00"]


def test_the_command_takes_the_threshold(tmp_path, capsys):
    a = write_scores(tmp_path / "a", heldout={"t1": 0.85})
    b = write_scores(tmp_path / "b", heldout={"t1": 0.5})
    main(["compare", str(a), str(b), "--at-least", "0.8"])
    _, table = rows(capsys.readouterr().out)
    assert table["heldout tasks >= 80"] == ["1", "0"]
