"""Per-task sampling weights (cmlora.data.sampling): the mix moves, the epoch's length does not."""

from collections import Counter

import pytest

from cmlora.data.sampling import TaskWeightedSampler, check_task_weights, expected_draws

# Three tasks of unequal sizes, as a suite with replay has (the replay records' task is "pretrain").
TASKS = ["digit_sum"] * 300 + ["read_word"] * 300 + ["pretrain"] * 510 + ["count_shape"] * 300


def epoch(sampler, number):
    sampler.set_epoch(number)
    return list(sampler)


def test_an_epoch_keeps_its_length_and_gives_each_task_its_weighted_share_to_within_one_record():
    weights = {"digit_sum": 3, "count_shape": 2.5, "read_word": 0.5}
    sampler = TaskWeightedSampler(TASKS, weights, seed=0)
    total_weight = 300 * 3 + 300 * 2.5 + 300 * 0.5 + 510 * 1
    for number in range(4):
        shares = Counter(TASKS[i] for i in epoch(sampler, number))
        assert sum(shares.values()) == len(sampler) == len(TASKS)
        for task, records in Counter(TASKS).items():
            expected = len(TASKS) * records * weights.get(task, 1) / total_weight
            assert abs(shares[task] - expected) < 1, (task, shares[task], expected)


def test_a_record_expected_at_least_once_is_drawn_every_epoch_and_the_rest_spread_over_epochs():
    sampler = TaskWeightedSampler(TASKS, {"digit_sum": 3}, seed=1)
    digit_sum = set(range(300))
    for number in range(3):
        counts = Counter(epoch(sampler, number))
        # each digit_sum record is expected 3 x 1410 / 2010 = 2.10 times: 2 or 3 draws, never fewer
        assert {counts[i] for i in digit_sum} <= {2, 3} and all(counts[i] >= 2 for i in digit_sum)
    # the other records are expected 0.70 times: over epochs every one is seen, none twice in an epoch
    seen = Counter()
    for number in range(6):
        counts = Counter(epoch(sampler, number))
        assert max(counts[i] for i in range(300, len(TASKS))) == 1
        seen.update(i for i in range(300, len(TASKS)) if counts[i])
    assert len(seen) > 0.99 * (len(TASKS) - 300)


def test_the_draw_is_deterministic_in_seed_and_epoch_and_shuffled():
    a, b = TaskWeightedSampler(TASKS, {"digit_sum": 2}, seed=5), TaskWeightedSampler(TASKS, {"digit_sum": 2}, seed=5)
    assert epoch(a, 0) == epoch(b, 0) and epoch(a, 1) == epoch(b, 1)
    assert epoch(a, 0) != epoch(a, 1) != epoch(TaskWeightedSampler(TASKS, {"digit_sum": 2}, seed=6), 1)
    first = epoch(a, 0)
    assert first != sorted(first)  # not in task order: batches mix the tasks
    assert len({TASKS[i] for i in first[:32]}) >= 3


def test_weights_of_one_draw_every_record_once():
    sampler = TaskWeightedSampler(TASKS, {"digit_sum": 1.0}, seed=0)
    assert sorted(epoch(sampler, 0)) == list(range(len(TASKS)))
    assert expected_draws(["a", "b"], {"a": 3}) == [1.5, 0.5]


@pytest.mark.parametrize(("weights", "message"), [
    ({"digit_sum": 0}, r"weights must be finite numbers > 0, got \{'digit_sum': 0\}"),
    ({"digit_sum": -1.0}, "finite numbers > 0"),
    ({"digit_sum": float("nan")}, "finite numbers > 0"),
    ({"digit_sum": True}, "finite numbers > 0"),
    ({"digit_sum": "3"}, "finite numbers > 0"),
    ({"digit_summ": 3}, r"no training record has task_name \['digit_summ'\]; the tasks are \['count_shape', "),
])
def test_bad_weights_are_refused_naming_them(weights, message):
    with pytest.raises(ValueError, match=message):
        check_task_weights(weights, TASKS)
    with pytest.raises(ValueError, match=message):
        TaskWeightedSampler(TASKS, weights)
