"""Figures of the head diagnostics: one layers x heads heat map per metric, the pruning curve, and
for ViTs the attention rollout and per-head maps over sample images (PNG, matplotlib)."""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def heatmap(matrix: np.ndarray, title: str, path: str, *, note: str = "",
            vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis") -> str:
  """``matrix [L, H]`` as a heat map with each value written in its cell; NaN cells (a metric a
  layer does not have) stay blank."""
  plt = _pyplot()
  layers, heads = matrix.shape
  fig, ax = plt.subplots(figsize=(max(4.2, 1.6 + 0.62 * heads), 1.5 + 0.45 * layers))
  masked = np.ma.masked_invalid(matrix)
  image = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
  ax.set_xticks(range(heads), [str(h) for h in range(heads)])
  ax.set_yticks(range(layers), [str(layer) for layer in range(layers)])
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  ax.set_title(textwrap.fill(title, 50) + (f"\n{note}" if note else ""), fontsize=8)
  finite = matrix[np.isfinite(matrix)]
  middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
  if layers * heads <= 400:  # values stay legible up to about 20 x 20
    for (i, j), value in np.ndenumerate(matrix):
      if np.isfinite(value):
        ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7,
                color="white" if value < middle else "black")
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def pruning_curve(curve: dict, path: str, *, accuracy: bool = False) -> str:
  """Loss (or top-1) after removing 0, 1, ... heads, least important first."""
  plt = _pyplot()
  values = curve["accuracy" if accuracy else "loss"]
  total = len(values) - 1
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  ax.plot(range(total + 1), values, marker="o", markersize=3)
  needed = curve["heads_needed"]
  ax.axvline(total - needed, color="gray", linestyle="--",
             label=f"{needed} of {total} heads keep {curve['keep_fraction']:.0%} of their effect")
  ax.set_xlabel("heads removed (least important first)")
  ax.set_ylabel("top-1 accuracy" if accuracy else "loss")
  ax.set_title("pruning curve")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def rollout(maps: Sequence[np.ndarray], prefix_tokens: int) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema 2020): per layer the head-mean attention plus the
  residual (``0.5 A + 0.5 I``, rows renormalised), multiplied through the layers. ``maps``: per
  layer ``[B, H, T, T]`` probabilities. Returns ``[B, patches]``: what the class token (or, without
  one, the mean of all tokens) reads from each patch."""
  joint = None
  for probs in maps:
    mean = probs.mean(axis=1)  # [B, T, T]
    mixed = 0.5 * mean + 0.5 * np.eye(mean.shape[-1])[None]
    mixed = mixed / mixed.sum(-1, keepdims=True)
    joint = mixed if joint is None else mixed @ joint
  reads = joint[:, 0] if prefix_tokens else joint.mean(axis=1)
  return reads[:, prefix_tokens:]


def query_maps(maps: Sequence[np.ndarray], prefix_tokens: int) -> np.ndarray:
  """``[B, L, H, patches]``: what the class token (or the mean query) of each head reads."""
  out = []
  for probs in maps:
    reads = probs[:, :, 0] if prefix_tokens else probs.mean(axis=2)
    out.append(reads[..., prefix_tokens:])
  return np.stack(out, axis=1)


def _show_image(ax, image: np.ndarray):
  image = np.asarray(image, np.float32)
  image = (image - image.min()) / max(float(image.max() - image.min()), 1e-9)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray")
  else:
    ax.imshow(image)
  ax.axis("off")


def vit_rollout_grid(images: np.ndarray, rolled: np.ndarray, grid: int, path: str,
                     labels: Sequence[str] = ()) -> str:
  """One row per image: the image, its rollout map, and the map over the image."""
  plt = _pyplot()
  n = len(images)
  fig, axes = plt.subplots(n, 3, figsize=(6.0, 2.0 * n), squeeze=False)
  for i in range(n):
    heat = rolled[i].reshape(grid, grid)
    _show_image(axes[i, 0], images[i])
    axes[i, 0].set_title(labels[i] if i < len(labels) else "image", fontsize=8)
    axes[i, 1].imshow(heat, cmap="inferno")
    axes[i, 1].axis("off")
    axes[i, 1].set_title("rollout", fontsize=8)
    _show_image(axes[i, 2], images[i])
    size = images[i].shape[0]
    axes[i, 2].imshow(heat, cmap="inferno", alpha=0.55, extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                      interpolation="nearest")
    axes[i, 2].set_title("rollout over the image", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def vit_head_grid(image: np.ndarray, per_head: np.ndarray, grid: int, path: str,
                  title: str) -> str:
  """``per_head [L, H, patches]`` of one image as a layers x heads grid of maps, the image first."""
  plt = _pyplot()
  layers, heads = per_head.shape[:2]
  fig, axes = plt.subplots(layers, heads + 1, figsize=(1.5 * (heads + 1), 1.5 * layers + 0.4),
                           squeeze=False)
  for layer in range(layers):
    if layer == 0:
      _show_image(axes[0, 0], image)
      axes[0, 0].set_title("image", fontsize=8)
    else:
      axes[layer, 0].axis("off")
    for head in range(heads):
      ax = axes[layer, head + 1]
      ax.imshow(per_head[layer, head].reshape(grid, grid), cmap="inferno")
      ax.set_xticks([])
      ax.set_yticks([])
      if layer == 0:
        ax.set_title(f"head {head}", fontsize=8)
      if head == 0:
        ax.set_ylabel(f"layer {layer}", fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def figure_path(directory: str, name: str) -> str:
  os.makedirs(directory, exist_ok=True)
  return os.path.join(directory, f"{name}.png")
