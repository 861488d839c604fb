"""benchmarks/suite_quality.py: the results file survives a run cut off, and --resume goes on from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .benchmark_helpers import benchmark_module


def _module():
    return benchmark_module("suite_quality")


def _main(module, monkeypatch, results: Path, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["suite_quality.py", "--suite", "S", "--out", "O", "--config", "C.yaml",
                                      "--results", str(results), *args])
    module.main()


def _measure(calls: list[int], stop_at: int | None = None):
    def one_seed(suite, out, seed, *rest):
        calls.append(seed)
        if seed == stop_at:
            raise KeyboardInterrupt  # the session ends in the middle of this seed
        return {"seed": seed, "train_tasks": {"a": 0.5 + seed / 10}}
    return one_seed


def test_a_run_cut_off_keeps_the_seeds_it_finished_and_resume_measures_only_the_rest(tmp_path, monkeypatch, capsys):
    module, results, calls = _module(), tmp_path / "results.json", []
    monkeypatch.setattr(module, "one_seed", _measure(calls, stop_at=1))
    with pytest.raises(KeyboardInterrupt):
        _main(module, monkeypatch, results, "--seeds", "0", "1", "2")
    cut = json.loads(results.read_text())
    assert [run["seed"] for run in cut["runs"]] == [0] and cut["pending_seeds"] == [1, 2]
    assert not list(tmp_path.glob("*.partial"))

    calls.clear()
    monkeypatch.setattr(module, "one_seed", _measure(calls))
    _main(module, monkeypatch, results, "--seeds", "0", "1", "2", "--resume")
    assert calls == [1, 2]
    done = json.loads(results.read_text())
    assert [run["seed"] for run in done["runs"]] == [0, 1, 2] and "pending_seeds" not in done
    assert done["runs"][0] == cut["runs"][0]
    printed = capsys.readouterr()
    assert json.loads(printed.out) == done and f"seed 0: kept from {results}" in printed.err


def test_without_resume_the_file_is_measured_afresh(tmp_path, monkeypatch):
    module, results, calls = _module(), tmp_path / "results.json", []
    monkeypatch.setattr(module, "one_seed", _measure(calls))
    _main(module, monkeypatch, results, "--seeds", "0", "1")
    _main(module, monkeypatch, results, "--seeds", "1")
    assert calls == [0, 1, 1]
    assert [run["seed"] for run in json.loads(results.read_text())["runs"]] == [1]


def test_resume_refuses_a_file_of_another_measurement(tmp_path, monkeypatch):
    module, results, calls = _module(), tmp_path / "results.json", []
    monkeypatch.setattr(module, "one_seed", _measure(calls))
    _main(module, monkeypatch, results, "--seeds", "0")
    monkeypatch.setattr(sys, "argv", ["suite_quality.py", "--suite", "S", "--out", "O", "--config", "other.yaml",
                                      "--results", str(results), "--seeds", "1", "--resume"])
    with pytest.raises(SystemExit, match=r"results\.json: holds runs of suite 'S' with config 'C.yaml', not of 'S' "
                                         r"with 'other.yaml'"):
        module.main()
    assert calls == [0]
