"""Per-task sampling weights: a task's records drawn more (or less) often, at the same number of steps.

A multi-task mix gives every record the same share of an epoch; tasks that need many more examples than their
records provide (the suite's counts by colour and by shape, the digit sum) then get the share of the easy ones.
`TaskWeightedSampler` draws each epoch's `len(dataset)` indexes so that a record of a task of weight w is drawn,
in expectation, w times as often as a record of weight 1: the epoch keeps its length, so the step count and the
learning-rate schedule stay those of the unweighted run and only the mix moves.

The draw has the least variance the expectation allows: record i of expected count c_i is drawn floor(c_i)
times, plus once more for a systematic sample over the fractional parts (a random offset, a fresh permutation
each epoch), so that a task's share of an epoch is its expectation to within one record, and a record expected
at least once an epoch is drawn in every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler


def check_task_weights(weights: Mapping[str, float], task_names: Sequence[str] | None = None,
                       where: str = "task_weights") -> None:
    """Raise ValueError unless every weight is a finite number > 0 and (given `task_names`, the records' tasks)
    names a task some record has."""
    bad = {name: value for name, value in weights.items() if isinstance(value, bool)
           or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0)}
    if bad:
        raise ValueError(f"{where}: weights must be finite numbers > 0, got {bad}")
    if task_names is None:
        return
    present = set(task_names)
    unknown = sorted(set(weights) - present)
    if unknown:
        raise ValueError(f"{where}: no training record has task_name {unknown}; the tasks are {sorted(present)}")


def expected_draws(task_names: Sequence[str], weights: Mapping[str, float]) -> list[float]:
    """Each record's expected number of draws in an epoch of len(task_names) draws (weight 1 if not named)."""
    record_weights = [float(weights.get(name, 1.0)) for name in task_names]
    scale = len(record_weights) / math.fsum(record_weights)
    return [weight * scale for weight in record_weights]


class TaskWeightedSampler(Sampler[int]):
    """Indexes of one epoch (`len(task_names)` of them), each record drawn about `expected_draws` times, shuffled.

    `task_names[i]` is record i's task. Deterministic in (seed, epoch), so every process of a distributed run
    draws the same epoch and accelerate shards its batches; `set_epoch` (called by transformers' Trainer and by
    accelerate) gives each epoch its own draw."""

    def __init__(self, task_names: Sequence[str], weights: Mapping[str, float], seed: int = 0) -> None:
        check_task_weights(weights, task_names)
        self.expected = expected_draws(task_names, weights)
        by_task: dict[str, list[int]] = {}
        for index, name in enumerate(task_names):
            by_task.setdefault(name, []).append(index)
        self.by_task = [by_task[name] for name in sorted(by_task)]
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.expected)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draws(self) -> list[int]:
        """How often each record is drawn this epoch (sums to len(self))."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        counts = [math.floor(c) for c in self.expected]
        # Systematic sampling of the remaining draws over the fractional parts: record i gets one more draw with
        # probability frac(c_i), and exactly len(self) - sum(counts) records get one. The records are visited
        # task by task (each task's in a fresh random order), so that each task's extra draws are its fractional
        # total rounded up or down.
        remaining = len(self) - sum(counts)
        if remaining:
            offset = torch.rand((), generator=generator, dtype=torch.float64).item()
            cumulative = 0.0
            order = [members[k] for members in self.by_task
                     for k in torch.randperm(len(members), generator=generator).tolist()]
            for index in order:
                before = cumulative
                cumulative += self.expected[index] - counts[index]
                # the multiples k + offset that fall in (before, cumulative]; at most one, as frac < 1
                if math.floor(cumulative - offset) > math.floor(before - offset) and remaining:
                    counts[index] += 1
                    remaining -= 1
            if remaining:  # float rounding left the last crossing just short: the largest unmet fractions take it
                for index in sorted(range(len(self)), key=lambda i: counts[i] - self.expected[i])[:remaining]:
                    counts[index] += 1
        return counts

    def __iter__(self) -> Iterator[int]:
        counts = self.draws()
        indexes = torch.tensor([i for i, n in enumerate(counts) for _ in range(n)], dtype=torch.long)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 500_009)
        return iter(indexes[torch.randperm(len(indexes), generator=generator)].tolist())
