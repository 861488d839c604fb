"""Figures of `cmlora routes`: factor-usage histograms, task x task Jaccard heatmaps, t-SNE of selections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MAX_BAR_TASKS = 8  # more tasks than this: a task x factor heatmap instead of grouped bars
MAX_ANNOTATED = 12  # write the values into heatmap cells up to this many tasks


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(name: str, layer: dict[str, Any]) -> str:
    module = name.rsplit(".", 1)[-1]
    depth = f", {layer['depth']}" if layer.get("depth") else ""
    return f"block {layer['block']} {module}{depth}"


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return path


def plot_histograms(report: dict[str, Any], path: Path) -> Path:
    """Rows: layers; columns: pools A and B. Each task's share of selections per factor (grouped bars)."""
    plt = _pyplot()
    layers = report["layers"]
    figure, axes = plt.subplots(len(layers), 2, figsize=(12, 3 * len(layers)), squeeze=False, layout="constrained")
    for row, (name, layer) in enumerate(layers.items()):
        labels, E = layer["labels"], layer["num_factors"]
        for column, pool in enumerate(("a", "b")):
            axis = axes[row][column]
            shares = np.array([layer["tasks"][label][pool]["histogram"] for label in labels], dtype=float)
            shares /= shares.sum(axis=1, keepdims=True)
            if len(labels) <= MAX_BAR_TASKS:
                width = 0.8 / len(labels)
                for index, label in enumerate(labels):
                    axis.bar(np.arange(E) + (index - (len(labels) - 1) / 2) * width, shares[index], width,
                             label=label, color=plt.cm.tab10(index % 10))
                axis.set_ylabel("share of selections")
                axis.set_xticks(range(E))
            else:
                image = axis.imshow(shares, aspect="auto", cmap="viridis")
                axis.set_yticks(range(len(labels)), labels, fontsize=6)
                figure.colorbar(image, ax=axis, label="share of selections")
            collapsed = " (COLLAPSED)" if layer["collapse"][pool]["collapsed"] else ""
            axis.set_title(f"{_title(name, layer)}: pool {pool.upper()}{collapsed}", fontsize=10)
            axis.set_xlabel("factor")
        if len(labels) <= MAX_BAR_TASKS:
            axes[row][1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.suptitle(f"{report['model']}: factor usage per task", fontsize=11)
    return _save(figure, path)


def plot_jaccard(report: dict[str, Any], path: Path) -> Path:
    """Rows: layers; columns: pools A and B. Task x task Jaccard overlap of the used-factor sets."""
    plt = _pyplot()
    layers = report["layers"]
    size = max(3.5, 0.45 * len(report["tasks"]) + 2)
    figure, axes = plt.subplots(len(layers), 2, figsize=(2 * size + 1.5, size * len(layers)), squeeze=False,
                                layout="constrained")
    for row, (name, layer) in enumerate(layers.items()):
        labels = layer["labels"]
        for column, pool in enumerate(("a", "b")):
            axis = axes[row][column]
            matrix = np.array(layer["jaccard"][pool])
            image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
            axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
            axis.set_yticks(range(len(labels)), labels, fontsize=7)
            if len(labels) <= MAX_ANNOTATED:
                for i in range(len(labels)):
                    for j in range(len(labels)):
                        axis.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                  color="black" if matrix[i, j] > 0.6 else "white")
            axis.set_title(f"{_title(name, layer)}: pool {pool.upper()}", fontsize=10)
            figure.colorbar(image, ax=axis, shrink=0.8)
    figure.suptitle(f"{report['model']}: Jaccard overlap of used factors (share >= "
                    f"{report['settings']['min_share']:g})", fontsize=11)
    return _save(figure, path)


def plot_tsne(report: dict[str, Any], embeddings: dict[str, dict[str, dict]], path: Path) -> Path:
    """Rows: seen / unseen tasks; columns: layers. t-SNE points of instances, coloured by task."""
    plt = _pyplot()
    splits = list(embeddings)
    layers = report["layers"]
    figure, axes = plt.subplots(len(splits), len(layers), figsize=(4.2 * len(layers) + 1.5, 3.8 * len(splits)),
                                squeeze=False, layout="constrained")
    for row, split in enumerate(splits):
        for column, (name, layer) in enumerate(layers.items()):
            axis = axes[row][column]
            panel = embeddings[split][name]
            axis.set_title(f"{split} tasks, {_title(name, layer)}", fontsize=10)
            axis.set_xticks([])
            axis.set_yticks([])
            if panel["points"] is None:
                axis.text(0.5, 0.5, panel["note"], ha="center", va="center", wrap=True, transform=axis.transAxes)
                continue
            tasks = np.array(panel["tasks"])
            names = list(dict.fromkeys(panel["tasks"]))
            colours = plt.cm.tab10 if len(names) <= 10 else plt.cm.tab20
            for index, task in enumerate(names):  # instances with identical selections coincide
                points = panel["points"][tasks == task]
                axis.scatter(points[:, 0], points[:, 1], s=16, alpha=0.6, label=f"{task} ({len(points)})",
                             color=colours(index % colours.N))
            if column == len(layers) - 1:
                axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), markerscale=1.5)
    figure.suptitle(f"{report['model']}: t-SNE of factor selections (Jaccard distance on A|B indicators)",
                    fontsize=11)
    return _save(figure, path)
