"""The comparison's plots: every member's training loss, and each group's headline metric (the
task's, ``arch_zoo.tasks``) against parameters."""

from __future__ import annotations

import os

from arch_zoo import tasks
from arch_zoo.compare.analysis import VariantResult


def plot(results: dict[str, list[VariantResult]], out_dir: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = [n for n, variants in results.items() if any(v.runs for v in variants)]
  if not names:
    return
  fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    for i, variant in enumerate(results[name]):
      for j, run in enumerate(variant.runs):
        if not run["curve"]:
          continue
        steps, losses = zip(*run["curve"])
        ax.plot(steps, losses, color=f"C{i}", alpha=1.0 if j == 0 else 0.45, linewidth=1.2,
                linestyle="-" if j == 0 else "--", label=variant.variant if j == 0 else None)
    ax.set_title(f"{name}: training loss (dashed: other seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "loss_curves.png"), dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    variants = [v for v in results[name] if v.runs]
    task = variants[0].first["task"]
    metric = tasks.get(task).headline_metric()
    for i, variant in enumerate(results[name]):
      mean, std = variant.mean_std(metric) if variant.runs else (None, None)
      if mean is None:
        continue
      x = variant.first["params"] / 1e6
      ax.errorbar([x], [mean], yerr=[std] if std else None, fmt="o", color=f"C{i}",
                  capsize=3, label=variant.variant)
      ax.annotate(variant.variant, (x, mean), fontsize=7, xytext=(4, 3),
                  textcoords="offset points")
    ax.set_title(f"{name}: {metric.label} vs parameters "
                 f"({'lower' if metric.lower_is_better else 'higher'} is better)", fontsize=9)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(metric.label)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "metric_vs_params.png"), dpi=110)
  plt.close(fig)
