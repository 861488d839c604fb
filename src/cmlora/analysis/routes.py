"""Factor-selection patterns of a MixLoRA model: which factors the instances of each task select, per layer, for
seen and unseen tasks (the paper's routing analysis and t-SNE plots).

Each instance selects r distinct factors out of the E of a pool, once for pool A and once for pool B. Per adapted
layer and per pool:

- histogram: how often each factor was selected, counted over instances x r slots (it sums to N * r).
- entropy: of the normalised histogram p = counts / (N * r), in nats, H = -sum_e p_e log p_e; `normalised_entropy`
  = H / log E, in [0, 1]: 1 when all factors are used equally, log r / log E when one set of r factors is always used.
- used factors of a task: the factors selected by at least `min_share` (default 0.05) of the task's instances; the
  threshold ignores factors a task picks only now and then (min_share=0: every factor picked at least once).
- jaccard (task x task): |U_i & U_j| / |U_i | U_j| of the used-factor sets U (1 when both are empty).
- weighted_jaccard (task x task): sum_e min(p_i,e, p_j,e) / sum_e max(p_i,e, p_j,e) of the normalised histograms
  (Ruzicka similarity): threshold-free; 1 for identical usage, 0 for disjoint factors.
- collapse: a pool of a layer has collapsed when its r most selected factors take at least `collapse_threshold`
  (default 0.9) of all its selections, pooled over every traced instance of every task: nearly every instance then
  selects (nearly) the same factor set, whatever its task. Uniform routing gives r / E. The share of the single most
  common factor set (`mode_set_share`, never above `top_r_share`) is reported beside it. A task whose own instances
  all select the same factors is not flagged: that is task-specific routing, not collapse.

Routing is traced with one forward per batch of training-format examples (no decoding): with pooling='prompt' the
routers see the prompt positions only, which is the routing a generation prefill computes and decoding reuses.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import (
    AnalysisModel,
    block_index,
    load_analysis_model,
    model_inputs,
    select_layers,
    task_batches,
    write_json,
)

NOT_MIXLORA = "routes needs a MixLoRA adapter"
POOLS = ("a", "b")


# ----------------------------------------------------------------------------------------------- statistics
def _indices(indices: np.ndarray | torch.Tensor, num_factors: int) -> np.ndarray:
    array = indices.numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    if array.ndim != 2:
        raise ValueError(f"selected indices must have shape [instances, r], got {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= num_factors):
        raise ValueError(f"selected indices must lie in [0, {num_factors}), got {array.min()}..{array.max()}")
    return array.astype(np.int64)


def selection_histogram(indices: np.ndarray | torch.Tensor, num_factors: int) -> np.ndarray:
    """How often each of the `num_factors` factors was selected: counts over instances x r, shape [E]."""
    return np.bincount(_indices(indices, num_factors).reshape(-1), minlength=num_factors)


def usage_entropy(counts: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Entropy of the normalised histogram `counts`: (nats, normalised by log E so that it lies in [0, 1])."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise ValueError("the entropy of an empty histogram is undefined: no instance was traced")
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    return entropy, entropy / math.log(len(counts)) if len(counts) > 1 else 0.0


def used_factors(indices: np.ndarray | torch.Tensor, num_factors: int, min_share: float = 0.05) -> list[int]:
    """The factors selected by at least `min_share` of the instances (and by at least one)."""
    selected = indicator_matrix(indices, num_factors)
    if not len(selected):
        return []
    share = selected.mean(axis=0)
    return [int(e) for e in np.flatnonzero((share > 0) & (share >= min_share))]


def jaccard(first: Iterable[int], second: Iterable[int]) -> float:
    """|first & second| / |first | second| of two factor sets; 1 when both are empty."""
    first, second = set(first), set(second)
    union = first | second
    return len(first & second) / len(union) if union else 1.0


def weighted_jaccard(counts_first: Sequence[float], counts_second: Sequence[float]) -> float:
    """sum min(p, q) / sum max(p, q) of two histograms, each normalised to sum to one."""
    p = np.asarray(counts_first, dtype=np.float64)
    q = np.asarray(counts_second, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("weighted Jaccard of an empty histogram is undefined")
    p, q = p / p.sum(), q / q.sum()
    return float(np.minimum(p, q).sum() / np.maximum(p, q).sum())


def collapse_statistics(indices: np.ndarray | torch.Tensor, num_factors: int, threshold: float = 0.9) -> dict:
    """Whether nearly every instance selects the same factors (see the module docstring), with the numbers."""
    array = _indices(indices, num_factors)
    counts = selection_histogram(array, num_factors)
    r = array.shape[1]
    top_r_share = float(np.sort(counts)[::-1][:r].sum() / counts.sum())
    mode_count = Counter(tuple(sorted(row)) for row in array.tolist()).most_common(1)[0][1]
    return {"collapsed": top_r_share >= threshold, "top_r_share": top_r_share,
            "mode_set_share": mode_count / len(array), "normalised_entropy": usage_entropy(counts)[1],
            "uniform_top_r_share": r / num_factors}


def indicator_matrix(indices: np.ndarray | torch.Tensor, num_factors: int) -> np.ndarray:
    """Boolean [N, E]: entry (n, e) is True when instance n selected factor e."""
    array = _indices(indices, num_factors)
    selected = np.zeros((len(array), num_factors), dtype=bool)
    selected[np.arange(len(array))[:, None], array] = True
    return selected


def selection_features(index_a: np.ndarray | torch.Tensor, index_b: np.ndarray | torch.Tensor,
                       num_factors: int) -> np.ndarray:
    """Boolean [N, 2E] per instance: its A selections, then its B selections (the t-SNE input)."""
    return np.concatenate([indicator_matrix(index_a, num_factors), indicator_matrix(index_b, num_factors)], axis=1)


def embed_tsne(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray | None, float | None, str | None]:
    """2-D t-SNE of boolean selection vectors under the Jaccard distance: (points, perplexity, note).

    Perplexity is min(30, (n - 1) / 3) (t-SNE needs it below n); fewer than 5 instances give no embedding and a note.
    """
    from sklearn.manifold import TSNE
    from sklearn.metrics import pairwise_distances

    n = len(features)
    if n < 5:
        return None, None, f"{n} instance(s): too few for t-SNE (need 5)"
    distances = pairwise_distances(np.asarray(features, dtype=bool), metric="jaccard")
    perplexity = min(30.0, (n - 1) / 3)
    tsne = TSNE(n_components=2, metric="precomputed", init="random", perplexity=perplexity, random_state=seed)
    return tsne.fit_transform(distances), perplexity, None


# ------------------------------------------------------------------------------------------------ tracing
@dataclass(frozen=True)
class RoutedLayer:
    """A MixLoRA-routed module: its path (the routing trace's key), transformer block and pool sizes."""

    name: str
    block: int
    num_factors: int
    r: int


@dataclass
class TaskRouting:
    """The selections of one task's traced instances: layer name -> (index_a [N, r], index_b [N, r])."""

    task: str
    split: str  # "seen" or "unseen"
    selections: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def label(self) -> str:
        return self.task if self.split == "seen" else f"{self.task} (unseen)"

    @property
    def instances(self) -> int:
        return len(next(iter(self.selections.values()))[0]) if self.selections else 0


@dataclass(frozen=True)
class TaskSource:
    """Records to trace: a records file, its image folder and optionally the tasks to keep (default: all)."""

    data: str | Path
    image_folder: str | Path | None = None
    tasks: Sequence[str] | None = None


def routed_layers(model: nn.Module, module: str | None = None) -> dict[int, RoutedLayer]:
    """Per transformer block, the first MixLoRA-routed module (or the one named `module`, e.g. 'v_proj').

    Plain-LoRA layers (below mix_start_layer) do not route and are left out.
    """
    from ..layer import MixLoraLayer

    layers: dict[int, RoutedLayer] = {}
    any_mixlora = False
    for layer in model.modules():
        if not isinstance(layer, MixLoraLayer):
            continue
        for adapter in layer.active_adapters:
            settings = layer.mixlora_settings.get(adapter)
            if settings is None or settings.plain:
                continue
            any_mixlora = True
            name = layer.mixlora_layer_name
            block = block_index(name)
            if block is None or (module is not None and name != module and not name.endswith(f".{module}")):
                continue
            key = name if adapter == "default" else f"{name}@{adapter}"
            layers.setdefault(block, RoutedLayer(key, block, settings.num_factors, settings.r))
    if not any_mixlora:
        raise ValueError(f"{NOT_MIXLORA}: the model has no MixLoRA-routed layer (a LoRA, full or base model?)")
    if not layers:
        raise ValueError(f"no MixLoRA-routed module named {module!r} in a transformer block; try q_proj or v_proj")
    return layers


@torch.no_grad()
def trace_tasks(model: nn.Module, batches: dict[str, list[dict[str, torch.Tensor]]], layers: Sequence[RoutedLayer],
                split: str) -> list[TaskRouting]:
    """One forward per batch (eval mode, no gradient) while tracing the routing; the selections of `layers`."""
    from tqdm.auto import tqdm

    from .. import trace_routing

    model.eval()
    traced = []
    progress = tqdm(total=sum(len(b) for b in batches.values()), desc=f"tracing {split} tasks", unit="batch",
                    disable=None)
    for task, task_batch_list in batches.items():
        with trace_routing(model) as trace:
            for batch in task_batch_list:
                model(**model_inputs(model, batch))
                progress.update(1)
        traced.append(TaskRouting(task, split, {
            layer.name: (trace.indices(layer.name, "a").numpy(), trace.indices(layer.name, "b").numpy())
            for layer in layers}))
    progress.close()
    return traced


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class RouteSettings:
    layers: str | Sequence[int] = "0,mid,last"  # blocks: indices or first/mid/last
    module: str | None = None  # None: the first adapted module of each block (q_proj in LLaMA)
    batches: int = 4  # per task
    batch_size: int = 8
    max_length: int = 1024
    min_share: float = 0.05
    collapse_threshold: float = 0.9
    seed: int = 0


def layer_statistics(tasks: Sequence[TaskRouting], layer: RoutedLayer, min_share: float = 0.05,
                     collapse_threshold: float = 0.9) -> dict[str, Any]:
    """routes.json's entry of one layer: per-task histograms, entropies and used factors, the task x task Jaccard
    matrices, and the collapse check over all tasks' instances."""
    E = layer.num_factors
    per_task: dict[str, dict] = {}
    for routing in tasks:
        entry: dict[str, Any] = {"task": routing.task, "split": routing.split, "instances": routing.instances}
        for pool, indices in zip(POOLS, routing.selections[layer.name], strict=True):
            counts = selection_histogram(indices, E)
            entropy, normalised = usage_entropy(counts)
            entry[pool] = {"histogram": counts.tolist(), "entropy": entropy, "normalised_entropy": normalised,
                           "used": used_factors(indices, E, min_share)}
        per_task[routing.label] = entry
    labels = list(per_task)
    report: dict[str, Any] = {"block": layer.block, "num_factors": E, "r": layer.r, "labels": labels,
                              "tasks": per_task, "jaccard": {}, "weighted_jaccard": {}, "collapse": {}}
    for position, pool in enumerate(POOLS):
        entries = [per_task[label][pool] for label in labels]
        report["jaccard"][pool] = [[jaccard(i["used"], j["used"]) for j in entries] for i in entries]
        report["weighted_jaccard"][pool] = [[weighted_jaccard(i["histogram"], j["histogram"]) for j in entries]
                                            for i in entries]
        pooled = np.concatenate([routing.selections[layer.name][position] for routing in tasks])
        report["collapse"][pool] = collapse_statistics(pooled, E, collapse_threshold)
    return report


def analyse_routes(analysis: AnalysisModel, seen: TaskSource, out: str | Path, unseen: TaskSource | None = None,
                   settings: RouteSettings | None = None) -> dict[str, Any]:
    """Trace the routing of seen (and unseen) tasks, write routes.json, histograms.png, jaccard.png and tsne.png to
    `out`, warn about collapsed layers, and return the report (the content of routes.json)."""
    from .route_plots import plot_histograms, plot_jaccard, plot_tsne

    settings = settings or RouteSettings()
    out = Path(out)
    available = routed_layers(analysis.model, settings.module)
    blocks = select_layers(settings.layers, list(available))
    layers = [available[block] for block in blocks]
    traced: list[TaskRouting] = []
    for split, source in (("seen", seen), ("unseen", unseen)):
        if source is None:
            continue
        batches = task_batches(analysis, source.data, source.tasks, image_folder=source.image_folder,
                               batch_size=settings.batch_size, max_batches=settings.batches,
                               max_length=settings.max_length)
        traced += trace_tasks(analysis.model, batches, layers, split)

    ordered = sorted(available)
    depth = {ordered[0]: "shallow", ordered[len(ordered) // 2]: "middle", ordered[-1]: "deep"}
    report: dict[str, Any] = {
        "model": analysis.name, "module": settings.module, "blocks": blocks,
        "settings": {"batches": settings.batches, "batch_size": settings.batch_size, "min_share": settings.min_share,
                     "collapse_threshold": settings.collapse_threshold, "seed": settings.seed},
        "definitions": DEFINITIONS,
        "tasks": [{"label": t.label, "task": t.task, "split": t.split, "instances": t.instances} for t in traced],
        "layers": {}, "collapsed": [], "tsne": {},
    }
    embeddings: dict[str, dict[str, dict]] = {}
    for layer in layers:
        stats = layer_statistics(traced, layer, settings.min_share, settings.collapse_threshold)
        stats["depth"] = depth.get(layer.block, "")
        report["layers"][layer.name] = stats
        for pool in POOLS:
            check = stats["collapse"][pool]
            if check["collapsed"]:
                report["collapsed"].append({"layer": layer.name, "pool": pool.upper(),
                                            "top_r_share": check["top_r_share"]})
                warnings.warn(f"MixLoRA routing collapsed at {layer.name} (pool {pool.upper()}): its {layer.r} most "
                              f"selected factors take {check['top_r_share']:.0%} of all selections (uniform: "
                              f"{check['uniform_top_r_share']:.0%}); nearly every instance selects the same factors.",
                              stacklevel=2)
        report["tsne"][layer.name] = {}
        for split in dict.fromkeys(t.split for t in traced):
            group = [t for t in traced if t.split == split]
            features = np.concatenate([selection_features(*t.selections[layer.name], layer.num_factors)
                                       for t in group])
            points, perplexity, note = embed_tsne(features, settings.seed)
            tasks = [t.task for t in group for _ in range(t.instances)]
            embeddings.setdefault(split, {})[layer.name] = {"points": points, "tasks": tasks, "note": note}
            report["tsne"][layer.name][split] = {"instances": len(features), "perplexity": perplexity,
                                                 "skipped": note}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "routes.json", report)
    plot_histograms(report, out / "histograms.png")
    plot_jaccard(report, out / "jaccard.png")
    plot_tsne(report, embeddings, out / "tsne.png")
    return report


DEFINITIONS = {
    "histogram": "times each factor was selected, over instances x r",
    "entropy": "-sum p log p (nats) of the normalised histogram; normalised_entropy = entropy / log E",
    "used": "factors selected by at least min_share of the task's instances",
    "jaccard": "|U_i & U_j| / |U_i | U_j| of the tasks' used-factor sets (1 if both empty)",
    "weighted_jaccard": "sum min(p_i, p_j) / sum max(p_i, p_j) of the normalised histograms",
    "collapse": "the r most selected factors take >= collapse_threshold of all selections of the layer, pooled "
                "over all tasks (top_r_share); uniform routing gives r / E",
    "tsne": "t-SNE of per-instance boolean vectors [A selections | B selections] (length 2E) under the Jaccard "
            "distance, per split; perplexity min(30, (n-1)/3), skipped below 5 instances",
}


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: normalised entropy (A/B) per layer and task, then collapse warnings."""
    lines = []
    for name, layer in report["layers"].items():
        lines.append(f"{name} (block {layer['block']}, E={layer['num_factors']}, r={layer['r']}): normalised "
                     "entropy A/B")
        for label, entry in layer["tasks"].items():
            entropy_a, entropy_b = entry["a"]["normalised_entropy"], entry["b"]["normalised_entropy"]
            lines.append(f"  {label:<32} {entropy_a:.3f} / {entropy_b:.3f}  ({entry['instances']} instances)")
    for item in report["collapsed"]:
        lines.append(f"WARNING: routing collapsed at {item['layer']} pool {item['pool']} "
                     f"(top-r share {item['top_r_share']:.0%})")
    if not report["collapsed"]:
        lines.append("no collapsed layer")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ CLI
def _check_mixlora_source(args: argparse.Namespace) -> None:
    """Fail before loading anything when the arguments name a model that cannot be a MixLoRA model."""
    from ..train import load_config

    if args.run:
        adapter = load_config(Path(args.run) / "config.yaml").adapter
        if adapter != "mixlora":
            raise SystemExit(f"cmlora routes: {NOT_MIXLORA}; {args.run} is a {adapter!r} run")
    elif args.adapter:
        config_path = Path(args.adapter) / "adapter_config.json"
        peft_type = json.loads(config_path.read_text()).get("peft_type") if config_path.exists() else None
        if peft_type is not None and peft_type != "MIXLORA":
            raise SystemExit(f"cmlora routes: {NOT_MIXLORA}; {config_path} is a {peft_type} adapter")
    elif args.fresh is not None and args.fresh != "mixlora":
        raise SystemExit(f"cmlora routes: {NOT_MIXLORA}; use --fresh mixlora")
    elif not args.fresh:
        raise SystemExit(f"cmlora routes: {NOT_MIXLORA}; give --run, or --base with --adapter or --fresh mixlora")


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def run_routes(args: argparse.Namespace) -> dict[str, Any]:
    """The `cmlora routes` command."""
    _check_mixlora_source(args)
    if args.run:
        analysis = load_analysis_model(args.run)
    elif args.adapter:
        analysis = load_analysis_model(base=args.base, adapter=args.adapter)
    else:
        analysis = load_analysis_model(base=args.base, fresh="mixlora", seed=args.seed, num_factors=args.num_factors,
                                       r=args.rank, routing=args.routing)
    settings = RouteSettings(layers=args.layers, module=args.module, batches=args.batches, batch_size=args.batch_size,
                             max_length=args.max_length, min_share=args.min_share,
                             collapse_threshold=args.collapse_threshold, seed=args.seed)
    out = Path(args.out) if args.out else (Path(args.run) if args.run else Path(".")) / "analysis" / "routes"
    seen = TaskSource(args.data, args.image_folder, _names(args.tasks))
    unseen = TaskSource(args.unseen, args.unseen_image_folder, _names(args.unseen_tasks)) if args.unseen else None
    try:
        report = analyse_routes(analysis, seen, out, unseen, settings)
    except ValueError as error:
        raise SystemExit(f"cmlora routes: {error}") from error
    print(summary(report), end="")
    print(f"[cmlora] routes written to {out}")
    return report
