"""Task interference (method.md section 5): does a step on task j's gradient lower or raise task i's loss?

For tasks i, j and a parameter group theta (one transformer block's adapter parameters on one side: for LoRA every
lora_A weight of the block's adapted modules, or every lora_B; for MixLoRA the whole factor pools
mixlora_factors_a, or mixlora_factors_b, of those modules):

    I_ij = E_{x_i}[ dL_i(j) / dL_i(i) ],   dL_i(j) = L_i(x_i; theta) - L_i(x_i; theta - lambda * u_j)

Estimator. Each task t contributes up to `batches` batches x_t^(1..n_t); g_t^(b) = grad_theta L_t(x_t^(b)) is the
gradient of the batch-mean answer loss, and u_t = mean_b g_t^(b) / ||mean_b g_t^(b)|| the unit direction of a
step on task t (E_{x_j} of the definition enters through this mean). Then, with one ratio per batch of task i,

    first order:  I_ij = (1/n_i) sum_b (u_j . g_i^(b)) / (u_i . g_i^(b))          (dL_i(j) ~= lambda u_j . g_i)
    exact:        I_ij = (1/n_i) sum_b [L_i^(b)(theta) - L_i^(b)(theta - lambda u_j)]
                                     / [L_i^(b)(theta) - L_i^(b)(theta - lambda u_i)]

lambda is absolute: the Euclidean length of the step in the group's parameter space (u_j has norm 1). The exact
losses are measured in the model's dtype under torch.no_grad (float32 or float64: bfloat16 rounds most of a small
step away), and theta is restored from a copy afterwards; both forms run in eval mode (dropout off, no router
noise). The loss is the mean next-token cross-entropy over a batch's answer tokens.

The diagonal is 1 by construction. I_ij > 0: a step on task j also lowers task i's loss; I_ij < 0: conflict. A
batch whose own-direction drop u_i . g_i^(b) is negative flips the sign of its ratios: that is the estimator's,
and the paper's, behaviour, not corrected here.

A group whose mean gradient is zero for a task (a LoRA A side at initialisation, where B = 0 makes dL/dA = 0) has
no direction u_t: that task's row and column are NaN (null in the JSON) and the group carries a note saying why.
For MixLoRA, a step can flip a top-r factor selection (in this block or a later one), and the loss jumps there:
the exact form then departs from the first-order one. Which (i, j) steps re-routed batches is recorded
(`routing_changed`) and noted.

Outputs (`run_interference`): interference.json and heatmaps.png (rows i, columns j; A and B side by side, one row
of panels per layer).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .common import (
    AnalysisModel,
    block_index,
    load_analysis_model,
    model_inputs,
    select_layers,
    task_batches,
    write_json,
)
from .plots import heatmap_grid

SIDES = ("A", "B")
# Parameter-name components of each side's adapter parameters: PEFT LoRA and MixLoRA.
SIDE_KEYS = {"A": ("lora_A", "mixlora_factors_a"), "B": ("lora_B", "mixlora_factors_b")}
FORMS = ("first_order", "exact")
IGNORE_INDEX = -100

Batch = dict[str, torch.Tensor]


@dataclass
class ParameterGroup:
    """One side (A or B) of one transformer block's adapter parameters, in a fixed order."""

    layer: int
    side: str
    names: list[str]
    params: list[nn.Parameter]

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclass
class GroupInterference:
    """The interference matrices [T, T] of one parameter group; `note` says why entries are NaN, if any are."""

    size: int
    first_order: torch.Tensor
    exact: torch.Tensor | None = None
    routing_changed: torch.Tensor | None = None  # MixLoRA: share of task i's batches re-routed by the step on j
    note: str | None = None

    def forms(self) -> dict[str, torch.Tensor]:
        return {"first_order": self.first_order, **({"exact": self.exact} if self.exact is not None else {})}

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"parameters": self.size, **{form: _nested(m) for form, m in self.forms().items()}}
        if self.routing_changed is not None:
            entry["exact_routing_changed"] = _nested(self.routing_changed)
        if self.note:
            entry["note"] = self.note
        return entry


@dataclass
class InterferenceResult:
    """I for every chosen block (`groups[layer]["A" | "B"]`), tasks in row/column order, and how it was measured."""

    tasks: list[str]
    layers: list[int]
    lam: float
    batches: dict[str, int]  # batches used per task
    model: str = ""
    groups: dict[int, dict[str, GroupInterference]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per layer and side, per form: the share of negative off-diagonal entries and their mean."""
        table: dict[str, dict[str, dict[str, Any]]] = {}
        for layer, sides in self.groups.items():
            for side, group in sides.items():
                entry: dict[str, Any] = {form: negative_offdiagonal(m) for form, m in group.forms().items()}
                if group.note:
                    entry["note"] = group.note
                table.setdefault(str(layer), {})[side] = entry
        return table

    def to_json(self) -> dict[str, Any]:
        groups = {str(layer): {side: group.to_json() for side, group in sides.items()}
                  for layer, sides in self.groups.items()}
        return {"model": self.model, "tasks": self.tasks, "layers": self.layers, "lambda": self.lam,
                "batches": max(self.batches.values(), default=0), "batches_per_task": self.batches,
                "groups": groups, "summary": self.summary()}

    def table(self) -> str:
        """The summary as a fixed-width text table."""
        lines = [f"{'layer':>5}  {'side':<4}  {'form':<11}  {'neg share':>9}  {'neg mean':>9}"]
        notes = []
        for layer, sides in self.summary().items():
            for side, entry in sides.items():
                for form in FORMS:
                    if form in entry:
                        stats = entry[form]
                        lines.append(f"{layer:>5}  {side:<4}  {form:<11}  {_fmt(stats['negative_share']):>9}  "
                                     f"{_fmt(stats['negative_mean']):>9}")
                if "note" in entry:
                    notes.append(f"layer {layer} {side}: {entry['note']}")
        return "\n".join(lines + notes) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The estimator: pure functions of gradients and loss drops.


def unit_directions(gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """u_t = mean_b g_t^(b) / ||mean_b g_t^(b)|| for each task; `gradients[t]` is [n_t, D]. Returns [T, D] with a
    NaN row for a task whose mean gradient is zero (there is no direction to step in)."""
    means = torch.stack([g.mean(dim=0) for g in gradients])
    norms = means.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, means / norms.clamp_min(torch.finfo(means.dtype).tiny), torch.nan)


def mean_drop_ratio(drops: Sequence[torch.Tensor]) -> torch.Tensor:
    """I_ij = mean_b drops[i][b, j] / drops[i][b, i], where `drops[i]` [n_i, T] holds task i's loss drop on each
    of its batches after a step along each task's direction. Returns [T, T]; the diagonal is 1 wherever defined."""
    rows = [(d / d[:, i:i + 1]).mean(dim=0) for i, d in enumerate(drops)]
    return torch.stack(rows)


def first_order_interference(gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """The first-order I [T, T] from per-batch gradients (`gradients[t]`: [n_t, D], the rows g_t^(b)):
    I_ij = mean_b (u_j . g_i^(b)) / (u_i . g_i^(b)). Rows and columns of zero-gradient tasks are NaN."""
    gradients = [g.double() for g in gradients]
    units = unit_directions(gradients)
    return mean_drop_ratio([g @ units.T for g in gradients])


def negative_offdiagonal(matrix: torch.Tensor) -> dict[str, float | int | None]:
    """The share of negative entries among the finite off-diagonal ones, and their mean (None if there are none)."""
    off = matrix[~torch.eye(matrix.shape[0], dtype=torch.bool)]
    off = off[torch.isfinite(off)]
    negative = off[off < 0]
    return {"negative_share": float(negative.numel() / off.numel()) if off.numel() else None,
            "negative_mean": float(negative.mean()) if negative.numel() else None,
            "entries": int(off.numel())}


# ---------------------------------------------------------------------------------------------------------------
# The model side: parameter groups, per-batch gradients, loss drops after a step.


def parameter_groups(model: nn.Module, layers: str | Sequence[int] = "first,mid,last") -> list[ParameterGroup]:
    """The A and B groups of the chosen blocks (`select_layers` spec) for the model's active adapter."""
    adapter = getattr(model, "active_adapter", "default")
    adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
    found: dict[tuple[int, str], ParameterGroup] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        for side, keys in SIDE_KEYS.items():
            at = next((k for k, part in enumerate(parts) if part in keys), None)
            if at is None or at + 1 >= len(parts) or parts[at + 1] != adapter:
                continue
            layer = block_index(name)
            if layer is not None:
                group = found.setdefault((layer, side), ParameterGroup(layer, side, [], []))
                group.names.append(name)
                group.params.append(param)
    if not found:
        raise ValueError(f"the model has no LoRA or MixLoRA parameters of adapter {adapter!r} in a transformer "
                         "block; task interference is measured on adapter parameters (analyse a lora or mixlora "
                         "run, or a base model with fresh='lora'|'mixlora')")
    chosen = select_layers(layers, [layer for layer, _ in found])
    return [found[(layer, side)] for layer in chosen for side in SIDES if (layer, side) in found]


def batch_loss(model: nn.Module, batch: Batch, where: str = "") -> torch.Tensor:
    """The batch-mean answer loss: next-token cross-entropy averaged over the tokens whose label is not -100.

    Computed here from the logits in their own dtype (at least float32), not taken from the model: transformers
    casts logits to float32 for its loss, which would hide the small loss differences of the exact form in a
    float64 model. Labels still go into the model call: MixLoRA routes on the prompt positions they mark."""
    labels = batch.get("labels")
    if labels is None or not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise ValueError(f"{where}: the batch has no answer tokens (every label is -100), so it has no loss; "
                         "check the records' answers or raise max_length")
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model_inputs(model, batch).items()}
    logits = model(**inputs).logits[:, :-1]
    targets = inputs["labels"][:, 1:]
    loss = nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1),
                                       targets.flatten(), ignore_index=IGNORE_INDEX)
    if not torch.isfinite(loss):
        raise ValueError(f"{where}: the loss is {float(loss)}; the model or the batch is broken")
    return loss


@contextlib.contextmanager
def _analysis_mode(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode (no dropout, no router noise) with gradients enabled for `params` only; restored afterwards."""
    was_training = model.training
    required = [p.requires_grad for p in params]
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, required, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def batch_gradients(model: nn.Module, batches: dict[str, list[Batch]], groups: Sequence[ParameterGroup],
                    progress: bool = True) -> list[list[torch.Tensor]]:
    """`result[g][t]` [n_t, D_g]: the flattened gradient of group g on each batch of task t (one backward per batch
    for all groups), kept on the CPU in at least float32."""
    params = [p for group in groups for p in group.params]
    per_task: list[list[list[torch.Tensor]]] = [[[] for _ in batches] for _ in groups]
    steps = sum(len(b) for b in batches.values())
    with _analysis_mode(model, params), tqdm(total=steps, desc="gradients", disable=not progress) as bar:
        for t, (task, task_list) in enumerate(batches.items()):
            for b, batch in enumerate(task_list):
                loss = batch_loss(model, batch, f"task {task!r}, batch {b}")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                offset = 0
                for g, group in enumerate(groups):
                    parts = [torch.zeros_like(p) if grad is None else grad
                             for p, grad in zip(group.params, grads[offset:offset + len(group.params)], strict=True)]
                    offset += len(group.params)
                    flat = torch.cat([part.reshape(-1) for part in parts]).detach()
                    per_task[g][t].append(flat.to("cpu", torch.promote_types(flat.dtype, torch.float32)))
                bar.update()
    return [[torch.stack(rows) for rows in group_rows] for group_rows in per_task]


@dataclass
class Evaluation:
    """Per task, the loss of each batch [n_t] (float64) and, for a MixLoRA model, each batch's routing: the factor
    indices every MixLoRA layer selected, concatenated (None for other models)."""

    losses: list[torch.Tensor]
    routes: list[list[torch.Tensor]] | None


@torch.no_grad()
def evaluate(model: nn.Module, batches: dict[str, list[Batch]]) -> Evaluation:
    from ..model import MixLoraModel

    tuner = next((m for m in model.modules() if isinstance(m, MixLoraModel)), None)
    with tuner.trace_routing() if tuner is not None else contextlib.nullcontext() as trace:
        losses = [torch.tensor([float(batch_loss(model, batch, f"task {task!r}, batch {b}"))
                                for b, batch in enumerate(task_list)], dtype=torch.float64)
                  for task, task_list in batches.items()]
    if trace is None:
        return Evaluation(losses, None)
    # The trace holds one record per MixLoRA layer and model call, in call order: tasks, then their batches.
    per_call = [torch.cat([torch.cat((records[call].index_a.reshape(-1), records[call].index_b.reshape(-1)))
                           for records in trace.records.values()])
                for call in range(sum(len(task_losses) for task_losses in losses))]
    routes, start = [], 0
    for task_losses in losses:
        routes.append(per_call[start:start + len(task_losses)])
        start += len(task_losses)
    return Evaluation(losses, routes)


@torch.no_grad()
def exact_drops(model: nn.Module, batches: dict[str, list[Batch]], group: ParameterGroup, units: torch.Tensor,
                lam: float, base: Evaluation, progress: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """`drops[i]` [n_i, T]: L_i^(b)(theta) - L_i^(b)(theta - lam * u_j) for each batch b of task i and each step
    direction u_j (the rows of `units`; a NaN row gives NaN drops). theta is restored from a copy after each step.

    Also, for a MixLoRA model, `changed` [T, T]: the share of task i's batches whose factor selection the step along
    u_j changed (anywhere in the model: a step in one block changes the inputs the later blocks route on)."""
    saved = [p.detach().clone() for p in group.params]
    tasks = len(base.losses)
    drops = [torch.full((len(losses), tasks), torch.nan, dtype=torch.float64) for losses in base.losses]
    changed = None if base.routes is None else torch.full((tasks, tasks), torch.nan, dtype=torch.float64)
    model.eval()
    for j, unit in enumerate(tqdm(units, desc=f"exact L{group.layer}{group.side}", disable=not progress)):
        if not bool(torch.isfinite(unit).all()):
            continue
        try:
            offset = 0
            for p in group.params:
                step = unit[offset:offset + p.numel()].view(p.shape).to(p.device, torch.float64)
                p.copy_((p.double() - lam * step).to(p.dtype))
                offset += p.numel()
            stepped = evaluate(model, batches)
        finally:
            for p, copy in zip(group.params, saved, strict=True):
                p.copy_(copy)
        for i, losses in enumerate(stepped.losses):
            drops[i][:, j] = base.losses[i] - losses
            if changed is not None:
                flips = [not torch.equal(a, b) for a, b in zip(base.routes[i], stepped.routes[i], strict=True)]
                changed[i, j] = sum(flips) / len(flips)
    return drops, changed


def _zero_gradient_note(tasks: Sequence[str], units: torch.Tensor, side: str) -> str | None:
    zero = [task for task, unit in zip(tasks, units, strict=True) if not bool(torch.isfinite(unit).all())]
    if not zero:
        return None
    cause = ("LoRA/MixLoRA A at initialisation has this: B = 0 makes dL/dA = 0" if side == "A"
             else "the group does not affect these tasks' loss")
    return (f"the mean gradient of task(s) {zero} is zero on this group, so the step direction g/||g|| is undefined "
            f"and their rows and columns are NaN ({cause})")


def _routing_note(changed: torch.Tensor | None, lam: float) -> str | None:
    if changed is None or not bool((changed[torch.isfinite(changed)] > 0).any()):
        return None
    pairs = int((changed[torch.isfinite(changed)] > 0).sum())
    return (f"a step of lambda={lam:g} changed MixLoRA's factor selection for {pairs} (i, j) pair(s) (see "
            "exact_routing_changed); the loss jumps where a selection flips, so there the exact form departs from "
            "the first-order one (a gradient, blind to selection flips). A smaller lambda flips fewer selections.")


def task_interference(analysis: AnalysisModel | nn.Module, batches: dict[str, list[Batch]], *,
                      layers: str | Sequence[int] = "first,mid,last", lam: float = 1e-3, exact: bool = True,
                      progress: bool = True) -> InterferenceResult:
    """I (first-order and, with `exact`, the exact form) for every task pair, chosen block and side.

    `batches`: task -> batches, as `task_batches` returns them (the tasks in that order); `lam`: the absolute step
    length in parameter units (see the module docstring)."""
    model = analysis.model if isinstance(analysis, AnalysisModel) else analysis
    if not lam > 0:
        raise ValueError(f"lambda must be positive, got {lam}")
    empty = [task for task, task_list in batches.items() if not task_list]
    if len(batches) < 2 or empty:
        raise ValueError(f"interference needs at least two tasks with batches; got {list(batches)} "
                         f"(without batches: {empty})")
    tasks = list(batches)
    groups = parameter_groups(model, layers)
    gradients = batch_gradients(model, batches, groups, progress)
    base = evaluate(model, batches) if exact else None
    result = InterferenceResult(tasks, sorted({g.layer for g in groups}), lam,
                                {task: len(b) for task, b in batches.items()},
                                model=getattr(analysis, "name", type(model).__name__))
    for group, group_gradients in zip(groups, gradients, strict=True):
        units = unit_directions([g.double() for g in group_gradients])
        matrices = GroupInterference(group.size, first_order_interference(group_gradients))
        notes = [_zero_gradient_note(tasks, units, group.side)]
        if base is not None:
            drops, matrices.routing_changed = exact_drops(model, batches, group, units, lam, base, progress)
            matrices.exact = mean_drop_ratio(drops)
            notes.append(_routing_note(matrices.routing_changed, lam))
        matrices.note = " ".join(note for note in notes if note) or None
        result.groups.setdefault(group.layer, {})[group.side] = matrices
    return result


# ---------------------------------------------------------------------------------------------------------------
# Files and the command line.


def plot_interference(result: InterferenceResult, path: str | Path, form: str = "first_order") -> Path:
    """heatmaps.png: one row of panels per layer, A and B side by side; rows i (loss of task i), columns j (step on
    task j); a diverging colormap centred at 0 with limits +-1 (the diagonal's value) in every panel, so that panels
    and runs compare at a glance; the cells of small matrices carry the exact numbers."""
    panels = [[(f"layer {layer}, {side} ({group.size:,} params)",
                (group.exact if form == "exact" else group.first_order).numpy()) for side, group in sides.items()]
              for layer, sides in result.groups.items()]
    title = f"Task interference I_ij ({form.replace('_', '-')}, lambda={result.lam:g}) - {result.model}"
    return heatmap_grid(panels, result.tasks, result.tasks, path, title=title, limit=1.0,
                        xlabel="j: step on task j", ylabel="i: loss of task i")


def run_interference(analysis: AnalysisModel, data: str | Path, out: str | Path, *, tasks: Sequence[str] | None = None,
                     image_folder: str | Path | None = None, layers: str | Sequence[int] = "first,mid,last",
                     batches: int = 4, batch_size: int = 8, lam: float = 1e-3, exact: bool = True,
                     progress: bool = True) -> InterferenceResult:
    """Batches from `data`, the interference result, and out/interference.json + out/heatmaps.png."""
    per_task = task_batches(analysis, data, tasks, image_folder=image_folder, batch_size=batch_size,
                            max_batches=batches)
    result = task_interference(analysis, per_task, layers=layers, lam=lam, exact=exact, progress=progress)
    out = Path(out)
    write_json(out / "interference.json", result.to_json())
    plot_interference(result, out / "heatmaps.png")
    return result


def run_from_args(args: argparse.Namespace) -> InterferenceResult:
    """`cmlora interference`: load the model, compute, write, print the summary table."""
    if args.base and bool(args.adapter) == bool(args.fresh):
        raise SystemExit("cmlora interference: --base needs exactly one of --adapter DIR or --fresh lora|mixlora")
    if args.run and (args.adapter or args.fresh):
        raise SystemExit("cmlora interference: --adapter and --fresh go with --base, not --run")
    analysis = load_analysis_model(args.run, base=args.base, adapter=args.adapter, fresh=args.fresh)
    out = Path(args.out) if args.out else Path(args.run or ".") / "analysis" / "interference"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    result = run_interference(analysis, args.data, out, tasks=tasks, image_folder=args.image_folder,
                              layers=args.layers, batches=args.batches, batch_size=args.batch_size, lam=args.lam,
                              exact=not args.first_order_only)
    print(result.table(), end="")
    print(f"[cmlora] interference written to {out}")
    return result


def _nested(matrix: torch.Tensor) -> list[list[float | None]]:
    """Rows of floats, NaN as None (JSON has no NaN)."""
    return [[float(v) if math.isfinite(v) else None for v in row] for row in matrix.tolist()]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
