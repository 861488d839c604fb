"""Factor selection for MixLoRA: pooling, IFS and CFS scores, top-r, router-gradient modes.

Pure functions on tensors, so that each equation of the method can be tested on its own. Shapes:
B batch, T sequence, d input features, E factors per pool, r factors selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """The factors chosen for each instance of a batch.

    index_a[b, i] and index_b[b, i] form the i-th factor pair of instance b: both in descending score order, as
    torch.topk returns them (pairing 'score'), or both in ascending factor order (pairing 'index'). `coef`, when
    present, multiplies pair i's contribution (router_grad modes that let gradients reach the routers); it is
    None when factors enter unscaled.
    """

    index_a: torch.Tensor  # [B, r] long
    index_b: torch.Tensor  # [B, r] long
    coef: torch.Tensor | None = None  # [B, r] float
    probs_a: torch.Tensor | None = None  # [B, E] A router distribution, for the load-balancing loss
    scores_b: torch.Tensor | None = None  # [B, E] B router probabilities (+ weighted CFS scores)

    @property
    def batch_size(self) -> int:
        return self.index_a.shape[0]


def pool(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x [B, T, d] over the positions where mask [B, T] is true (all positions when mask is None).

    Computed as a batched matrix product (mask @ x) so no [B, T, d] temporary is created. Callers make sure no
    instance has an empty mask (see `context.routing_mask`); should one slip through, it pools to zeros rather
    than NaN. No host-device synchronisation happens here: this runs in every adapted layer.
    """
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype)
    counts = weights.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.bmm((weights / counts).unsqueeze(1), x).squeeze(1)


def ifs_logits(xbar: torch.Tensor, router_ifs: torch.Tensor) -> torch.Tensor:
    """Independent Factor Selection logits [W_A xbar, W_B xbar]: [B, d] x [2, E, d] -> [B, 2, E], in float32.

    Both routers run as one matrix product. The small operand is cast to the routers' dtype, never the routers
    to float32: a float32 copy of every router on every call would cost memory that LoRA does not spend
    (routers that do not train are kept in the base model's dtype, as in the reference code).
    """
    two, num_factors, features = router_ifs.shape
    logits = xbar.to(router_ifs.dtype) @ router_ifs.reshape(two * num_factors, features).t()
    return logits.float().view(-1, two, num_factors)


def cfs_scores_paper(selected_a: torch.Tensor, cfs_weight: torch.Tensor) -> torch.Tensor:
    """p_CFS = sum_i softmax(A_x[i] . W_AB[i]) (method.md 3.3): [B, r, d] x [r, d, E] -> [B, E]."""
    logits = torch.einsum("brd,rde->bre", selected_a.to(cfs_weight.dtype), cfs_weight)
    return logits.float().softmax(dim=-1).sum(dim=1)


def cfs_scores_reference(selected_a: torch.Tensor, cfs_weight: torch.Tensor) -> torch.Tensor:
    """The reference code's CFS (method.md 3.3 a-b): softmax(sum_i softmax((sum_d a_i) * (sum_d W_AB[i, d])))."""
    # einsum('brd,rfe->bre') with distinct d and f sums each operand over its own index separately.
    logits = (selected_a.sum(dim=-1, dtype=torch.float32).unsqueeze(-1)
              * cfs_weight.sum(dim=1, dtype=torch.float32).unsqueeze(0))
    return logits.softmax(dim=-1).sum(dim=1).softmax(dim=-1)


def select_top_r(scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, r] of the r largest scores, in descending order, and those scores."""
    top = torch.topk(scores, r, dim=-1)
    return top.indices, top.values


def pair_by_index(index: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected factors [B, r] in ascending factor order, their scores [B, r] permuted with them."""
    index, order = index.sort(dim=-1)
    return index, top.gather(-1, order)


def random_indices(batch: int, num_factors: int, r: int, device: torch.device) -> torch.Tensor:
    """A fresh uniformly random subset of r factors per instance, in random order (the paper's 'random')."""
    return torch.rand(batch, num_factors, device=device).argsort(dim=-1)[:, :r]


def pair_coefficients(top_a: torch.Tensor, top_b: torch.Tensor, mode: str) -> torch.Tensor | None:
    """Per-pair multipliers for the router-gradient modes.

    'scores': pair i is scaled by (r * renormalised score of A factor i) * (r * renormalised score of B factor i);
    the factors r make equal scores reproduce the unscaled update, so lora_alpha keeps its meaning.
    'straight_through': the same gradient, but the forward value is exactly 1 (the update is unscaled).
    """
    if mode == "none":
        return None
    r = top_a.shape[-1]
    coef = (r * top_a / top_a.sum(dim=-1, keepdim=True)) * (r * top_b / top_b.sum(dim=-1, keepdim=True))
    if mode == "scores":
        return coef
    if mode == "straight_through":
        return coef - coef.detach() + 1.0
    raise ValueError(f"unknown router_grad mode {mode!r}")


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss E * sum_e f_e * P_e for one router.

    f_e: share of the batch's selections that went to factor e (no gradient); P_e: mean router probability of e.
    Equals 1 when usage and probabilities are uniform, grows as they concentrate on the same factors.
    """
    num_factors = probs.shape[-1]
    counts = torch.zeros_like(probs).scatter_add_(1, indices, torch.ones_like(indices, dtype=probs.dtype))
    usage = counts.sum(dim=0) / indices.numel()
    return num_factors * (usage.detach() * probs.mean(dim=0)).sum()


def route(
    xbar: torch.Tensor | None,
    *,
    r: int,
    num_factors: int,
    routing: str,
    router_grad: str,
    factors_a: torch.Tensor,
    router_ifs: torch.Tensor | None = None,
    router_cfs: torch.Tensor | None = None,
    cfs: str = "paper",
    cfs_weight: float = 1.0,
    task_logits: torch.Tensor | None = None,
    task_ids: torch.Tensor | None = None,
    noise_std: float = 0.0,
    pairing: str = "score",
    batch: int | None = None,
    device: torch.device | None = None,
) -> Selection:
    """Select r A factors and r B factors for each instance.

    routing: 'ifs' (routers W_A = router_ifs[0] and W_B = router_ifs[1] on xbar), 'ifs+cfs' (B scores refined
    by the selected A factors through router_cfs = W_AB [r, d, E]), 'random' (fresh random indices), 'task'
    (logits looked up per task id in task_logits [2, num_tasks, E] instead of computed from xbar).

    pairing: which selected A factor goes with which selected B factor. 'score' (the paper's and the reference
    code's): the i-th by score of each pool, so that two instances that select the same factors in another order
    get different updates. 'index': the i-th in factor order, so that the update depends on the selected sets
    alone (with E == r every instance then gets one and the same update: plain LoRA). CFS reads the A factors
    in score order either way; only the matching changes.
    """
    if routing == "random":
        index_a = random_indices(batch, num_factors, r, device)
        index_b = random_indices(batch, num_factors, r, device)
        if pairing == "index":
            index_a, index_b = index_a.sort(dim=-1).values, index_b.sort(dim=-1).values
        return Selection(index_a, index_b)

    if routing == "task":
        if task_ids is None:
            raise ValueError(
                "routing='task' needs the task of every instance: pass mixlora_task_ids=LongTensor[batch] to the "
                "model call (forward or generate)."
            )
        logits = task_logits.float().index_select(1, task_ids).transpose(0, 1)  # [B, 2, E]
    else:
        logits = ifs_logits(xbar, router_ifs)
    if noise_std > 0:
        logits = logits + noise_std * torch.randn_like(logits)
    probs = logits.softmax(dim=-1)
    probs_a, probs_b = probs[:, 0], probs[:, 1]

    if routing != "ifs+cfs":  # A and B are independent: one top-r over both
        indices, top = select_top_r(probs, r)
        index_a, index_b, top_a, top_b = indices[:, 0], indices[:, 1], top[:, 0], top[:, 1]
        scores_b = probs_b
    else:
        index_a, top_a = select_top_r(probs_a, r)
        selected_a = factors_a.index_select(0, index_a.reshape(-1)).view(*index_a.shape, -1)
        cfs_fn = cfs_scores_paper if cfs == "paper" else cfs_scores_reference
        scores_b = torch.add(probs_b, cfs_fn(selected_a, router_cfs), alpha=cfs_weight)
        index_b, top_b = select_top_r(scores_b, r)
    if pairing == "index":
        index_a, top_a = pair_by_index(index_a, top_a)
        index_b, top_b = pair_by_index(index_b, top_b)
    coef = pair_coefficients(top_a, top_b, router_grad)
    return Selection(index_a, index_b, coef, probs_a, scores_b)
