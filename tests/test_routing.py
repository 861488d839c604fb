"""The routing equations on small hand-computed examples (method.md 3.1-3.4)."""

import math

import pytest
import torch

from cmlora.routing import (
    cfs_scores_paper,
    cfs_scores_reference,
    load_balancing_loss,
    pair_coefficients,
    pool,
    random_indices,
    route,
    select_top_r,
)


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


# One instance, r=2 selected A factors in R^2, E=3; chosen so that the paper's and the reference's CFS differ.
SELECTED_A = torch.tensor([[[2.0, -1.0], [0.5, 1.0]]])
W_AB = torch.tensor([
    [[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]],   # W_AB[0]: d x E
    [[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]],   # W_AB[1]
])


def test_cfs_paper_matches_hand_computation():
    # a_0 . W_AB[0] = 2*[1,0,0] + (-1)*[0,3,0] = [2,-3,0];  a_1 . W_AB[1] = 0.5*[0,0,1] + 1*[0,2,0] = [0,2,0.5]
    expected = [p + q for p, q in zip(softmax([2, -3, 0]), softmax([0, 2, 0.5]), strict=True)]
    assert cfs_scores_paper(SELECTED_A, W_AB)[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_cfs_reference_matches_hand_computation():
    # The reference sums each a_i and each W_AB[i] separately: sum(a_0)=1, sum(a_1)=1.5,
    # W_AB[0] summed over d = [1,3,0], W_AB[1] summed over d = [0,2,1]; then a second softmax.
    inner = [p + q for p, q in zip(softmax([1, 3, 0]), softmax([0, 3, 1.5]), strict=True)]
    expected = softmax(inner)
    assert cfs_scores_reference(SELECTED_A, W_AB)[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_pool_ignores_masked_positions_and_never_divides_by_zero():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert pool(x, mask).tolist() == [[2.0, 3.0]]
    assert pool(x, None)[0].tolist() == pytest.approx([104 / 3, 106 / 3])
    assert pool(x, torch.zeros_like(mask)).tolist() == [[0.0, 0.0]]  # never NaN


def test_select_top_r_is_descending():
    indices, values = select_top_r(torch.tensor([[0.1, 0.5, 0.2, 0.9]]), 2)
    assert indices.tolist() == [[3, 1]]
    assert values[0].tolist() == pytest.approx([0.9, 0.5])


def test_pair_coefficients_modes():
    top_a = torch.tensor([[0.6, 0.2]], requires_grad=True)
    top_b = torch.tensor([[0.3, 0.3]], requires_grad=True)
    assert pair_coefficients(top_a, top_b, "none") is None
    scores = pair_coefficients(top_a, top_b, "scores")
    # r * renormalised: A -> [1.5, 0.5], B -> [1, 1]
    assert scores[0].tolist() == pytest.approx([1.5, 0.5])
    straight = pair_coefficients(top_a, top_b, "straight_through")
    assert straight[0].tolist() == pytest.approx([1.0, 1.0])
    (straight * torch.tensor([[1.0, 2.0]])).sum().backward()  # a plain sum of renormalised scores is constant
    assert top_a.grad is not None and top_a.grad.abs().sum() > 0


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    uniform = torch.full((4, 4), 0.25)
    spread = torch.tensor([[0], [1], [2], [3]])
    assert load_balancing_loss(uniform, spread).item() == pytest.approx(1.0)
    collapsed_probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(4, 1)
    collapsed = torch.zeros(4, 1, dtype=torch.long)
    assert load_balancing_loss(collapsed_probs, collapsed).item() == pytest.approx(4 * 0.97)


def test_random_indices_are_distinct_per_instance():
    torch.manual_seed(0)
    idx = random_indices(50, 8, 3, torch.device("cpu"))
    assert idx.shape == (50, 3)
    assert all(len(set(row)) == 3 for row in idx.tolist())
    assert len({tuple(row) for row in idx.tolist()}) > 10


def test_route_ifs_cfs_uses_selected_a_factors():
    torch.manual_seed(0)
    E, r, d = 6, 2, 5
    xbar = torch.randn(3, d)
    factors_a = torch.randn(E, d)
    router_a, router_b, w_ab = torch.randn(E, d), torch.randn(E, d), torch.randn(r, d, E) * 3
    sel = route(xbar, r=r, num_factors=E, routing="ifs+cfs", router_grad="none", factors_a=factors_a,
                router_ifs=torch.stack([router_a, router_b]), router_cfs=w_ab, cfs="paper", cfs_weight=1.0)
    expected_a = torch.topk(xbar @ router_a.t(), r).indices
    assert torch.equal(sel.index_a, expected_a)
    scores_b = (xbar @ router_b.t()).softmax(-1) + cfs_scores_paper(factors_a[expected_a], w_ab)
    assert torch.equal(sel.index_b, torch.topk(scores_b, r).indices)
    ifs_only = route(xbar, r=r, num_factors=E, routing="ifs", router_grad="none", factors_a=factors_a,
                     router_ifs=torch.stack([router_a, router_b]))
    assert torch.equal(ifs_only.index_b, torch.topk(xbar @ router_b.t(), r).indices)


def test_route_task_needs_task_ids():
    with pytest.raises(ValueError, match="mixlora_task_ids"):
        route(None, r=1, num_factors=2, routing="task", router_grad="none", factors_a=torch.zeros(2, 3),
              task_logits=torch.zeros(2, 3, 2))


@pytest.mark.parametrize("routing", ["ifs", "ifs+cfs", "random"])
def test_pairing_by_index_selects_the_same_factors_and_matches_them_in_factor_order(routing):
    torch.manual_seed(0)
    E, r, d = 8, 3, 5
    args = dict(r=r, num_factors=E, routing=routing, router_grad="scores", factors_a=torch.randn(E, d),
                router_ifs=torch.randn(2, E, d), router_cfs=torch.randn(r, d, E), batch=4)
    xbar = torch.randn(4, d)
    torch.manual_seed(1)
    by_score = route(xbar, **args)
    torch.manual_seed(1)  # the same random draw for routing='random'
    by_index = route(xbar, **args, pairing="index")
    for side in ("a", "b"):
        score_order, index_order = getattr(by_score, f"index_{side}"), getattr(by_index, f"index_{side}")
        assert torch.equal(index_order, score_order.sort(dim=-1).values)  # the same sets, in factor order
    assert not torch.equal(by_index.index_a, by_score.index_a)  # the orders differ here, so the test can tell
    if routing != "random":
        # pair i's coefficient belongs to the factors now at position i: r * p_a * r * p_b of those two
        top_a = by_score.probs_a.gather(1, by_index.index_a)
        top_b = by_score.scores_b.gather(1, by_index.index_b)
        expected = (r * top_a / top_a.sum(-1, keepdim=True)) * (r * top_b / top_b.sum(-1, keepdim=True))
        torch.testing.assert_close(by_index.coef, expected)
        # the scores are the score pairing's (CFS reads the A factors in score order in both)
        torch.testing.assert_close(by_index.scores_b, by_score.scores_b)
