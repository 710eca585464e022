"""Plots the training scripts write: a reconstruction grid and codebook-usage histograms (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no screen needed
    import matplotlib.pyplot as plt

    return plt


def reconstruction_grid(originals: torch.Tensor, reconstructions: list[tuple[str, torch.Tensor]], path: Path,
                        title: str) -> Path | None:
    """Originals in the first row, one row per (label, reconstructions) below; images (n, 1, 8, 8)."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = [("original", originals), *reconstructions]
    count = originals.shape[0]
    figure, axes = plt.subplots(len(rows), count, figsize=(count * 0.7, len(rows) * 0.8 + 0.4))
    for row, (label, images) in enumerate(rows):
        for column in range(count):
            axis = axes[row, column]
            axis.imshow(images[column, 0].detach().numpy(), cmap="gray_r", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def usage_histogram(indices_per_codebook: list[tuple[str, torch.Tensor]], codebook_size: int, path: Path,
                    title: str) -> Path | None:
    """How often each code is used, one bar chart per codebook (stage)."""
    plt = _pyplot()
    if plt is None:
        return None
    count = len(indices_per_codebook)
    figure, axes = plt.subplots(count, 1, figsize=(7, 1.6 * count + 0.6), squeeze=False)
    for axis, (label, indices) in zip(axes[:, 0], indices_per_codebook, strict=True):
        counts = np.bincount(indices.flatten().numpy(), minlength=codebook_size)
        used = int((counts > 0).sum())
        axis.bar(np.arange(codebook_size), counts, width=1.0, color="tab:blue")
        axis.set_xlim(-0.5, codebook_size - 0.5)
        axis.set_ylabel("tokens", fontsize=8)
        axis.set_title(f"{label}: {used}/{codebook_size} codes used", fontsize=8)
    axes[-1, 0].set_xlabel("code index", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def health_curves(health: list[tuple[int, dict[str, list[float]]]], codebook_size: int, path: Path,
                  title: str) -> Path | None:
    """Codebook health during training: perplexity and dead codes of each codebook against the step."""
    plt = _pyplot()
    if plt is None:
        return None
    steps = [step for step, _ in health]
    names = list(health[0][1]) if health else []
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.2), sharex=True)
    for name in names:
        top.plot(steps, [values[name][0] for _, values in health], label=name)
        bottom.plot(steps, [values[name][1] for _, values in health], label=name)
    top.axhline(codebook_size, color="gray", linewidth=0.8, linestyle="--")
    top.set_ylabel("perplexity", fontsize=8)
    bottom.set_ylabel("dead codes", fontsize=8)
    bottom.set_xlabel("training step", fontsize=8)
    top.legend(fontsize=7, ncol=max(1, len(names) // 2))
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
