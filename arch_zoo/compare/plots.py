"""The comparison's plots, as a paper would show them.

* ``loss_curves.png``: every member's training loss, one panel per group;
* ``validation_curves.png``: the headline metric on the validation data over training (mean over
  seeds, the band spans the seeds' range), one panel per group;
* ``metric_vs_params.png``, ``metric_vs_flops.png``: the headline metric against parameters and
  against training FLOPs per token;
* ``metric_vs_width.png``: the headline metric against the model width (log scale), Zoology's
  Figure 2;
* ``metric_vs_state.png``: the headline metric against the decode-time state of the whole model at
  the training length (log scale): Zoology's and Based's accuracy against state size.

The four ``metric_vs`` plots have one panel per task and training length (Zoology's panels: one
per sequence length), one line per family through its points (its widths, when the sweep has
them); where every family is one point at the same cost (a comparison at one size), the families
stand side by side instead, named on the axis.

Each family keeps one colour in every plot (``family_color``: a fixed map, not the sweep's order);
in the curves a family's several variants (its widths) differ by line style, the n-th variant of
every family drawn alike. The legends name families, error bars are the 95% Student-t interval
of the mean over seeds (none for a single seed), and every axis prints plain numbers (``1.2M``,
``0.43``), never an offset such as ``1e-6+4.266e-1``. Only the selected learning rate of each
variant is plotted, and only finished members (``analysis``).
"""

from __future__ import annotations

import math
import os
import zlib

from arch_zoo import tasks
from arch_zoo.compare.analysis import VariantResult

PLOT_FILES = ("loss_curves.png", "validation_curves.png", "metric_vs_params.png",
              "metric_vs_flops.png", "metric_vs_width.png", "metric_vs_state.png")
# Colour-blind-safe (Okabe-Ito) colours for the built-in families; any other family gets one of
# the spare colours from its name, so it too is the same in every plot and every sweep.
FAMILY_COLORS = {"mha": "#000000", "moh": "#E69F00", "lightning": "#0072B2",
                 "routing": "#009E73", "dynamic_mask": "#D55E00", "masa": "#CC79A7"}
SPARE_COLORS = ("#56B4E9", "#F0E442", "#999999", "#882255", "#44AA99", "#117733")
MARKERS = ("o", "s", "^", "D", "v", "P")


def family_color(family: str) -> str:
  if family in FAMILY_COLORS:
    return FAMILY_COLORS[family]
  return SPARE_COLORS[zlib.crc32(family.encode()) % len(SPARE_COLORS)]


def family_marker(family: str) -> str:
  names = list(FAMILY_COLORS)
  index = names.index(family) if family in names else zlib.crc32(family.encode())
  return MARKERS[index % len(MARKERS)]


def plain_number(value: float, _position=None) -> str:
  """``1,234,567`` -> ``1.23M``, ``0.4266`` -> ``0.4266``: short, plain, no offset."""
  magnitude = abs(value)
  for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if magnitude >= limit:
      return f"{value / limit:.3g}{suffix}"
  return f"{value:.4g}"


def plain_axes(ax, x: bool = True, y: bool = True) -> None:
  from matplotlib.ticker import FuncFormatter
  if x:
    ax.xaxis.set_major_formatter(FuncFormatter(plain_number))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
  if y:
    ax.yaxis.set_major_formatter(FuncFormatter(plain_number))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))


def pad_limits(ax, values: list[float], axis: str, log: bool = False,
               bounds: tuple[float, float] | None = None) -> None:
  """Limits that leave room around the points, at least 10% of their value on each side: points
  matched within 2% (``match="params"``) then sit in a readable range with round ticks.
  ``bounds``: the values the quantity can take (an accuracy's [0, 1]); the limits stay within a
  small margin of them even where an interval reaches past them."""
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return
  low, high = min(values), max(values)
  if log:
    low, high = low / 1.6, high * 1.6
  else:
    pad = max(0.1 * max(abs(low), abs(high)), 0.08 * (high - low))
    low, high = low - pad, high + pad
  if bounds is not None:
    margin = 0.03 * (bounds[1] - bounds[0])
    low, high = max(low, bounds[0] - margin), min(high, bounds[1] + margin)
  (ax.set_xlim if axis == "x" else ax.set_ylim)(low, high)


def family_legend(ax, families: list[str], styles: dict[str, tuple[str, str]] | None = None
                  ) -> None:
  """The colour legend of the families; with ``styles`` (``variant_styles``) a second one for the
  line styles that tell a family's variants apart."""
  from matplotlib.lines import Line2D
  handles = [Line2D([], [], color=family_color(f), marker=family_marker(f), label=f)
             for f in families]
  if not handles:
    return
  if not styles:
    ax.legend(handles=handles, fontsize=8, title="family", title_fontsize=8)
    return
  # Many curves fill the panel: both legends go beside it.
  ax.add_artist(ax.legend(handles=handles, fontsize=8, title="family", title_fontsize=8,
                          loc="upper left", bbox_to_anchor=(1.02, 1.0)))
  labels = dict((style, label) for style, label in styles.values())
  ax.legend(handles=[Line2D([], [], color="0.3", linestyle=style, label=label)
                     for style, label in labels.items()],
            fontsize=8, title="variant", title_fontsize=8, loc="lower left",
            bbox_to_anchor=(1.02, 0.0))


LINE_STYLES = ("-", "--", ":", "-.")


def variant_styles(variants: list[VariantResult]) -> dict[str, tuple[str, str]]:
  """Where a family has several variants in a panel (Zoology's widths), a line style for each, by
  its place in the family (the n-th width of every family looks the same), labelled by what its
  name adds to the family's (``mha_d128`` -> ``d128``); empty where every family has one."""
  by_family: dict[str, list[str]] = {}
  for variant in variants:
    by_family.setdefault(variant.attention, []).append(variant.variant)
  if all(len(names) < 2 for names in by_family.values()):
    return {}
  styles = {}
  for family, names in by_family.items():
    for i, name in enumerate(names):
      label = name.removeprefix(family).strip("_-") or name
      styles[name] = (LINE_STYLES[i % len(LINE_STYLES)], label)
  return styles


def headline(results: list[VariantResult]):
  task = next(v for v in results if v.runs).first["task"]
  return task, tasks.get(task).headline_metric()


def plot(results: dict[str, list[VariantResult]], out_dir: str) -> None:
  """Writes every file of ``PLOT_FILES`` from ``results`` (per group, one result per variant:
  its selected learning rate)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = {name: variants for name, variants in results.items() if any(v.runs for v in variants)}
  for name in PLOT_FILES:
    path = os.path.join(out_dir, name)
    if not groups:
      if os.path.exists(path):
        os.remove(path)  # never leave another sweep's plot next to this report
      continue
    maker = {"loss_curves.png": loss_curves, "validation_curves.png": validation_curves,
             "metric_vs_params.png": lambda f, g: metric_vs(f, g, "params"),
             "metric_vs_flops.png": lambda f, g: metric_vs(f, g, "flops"),
             "metric_vs_width.png": lambda f, g: metric_vs(f, g, "width"),
             "metric_vs_state.png": lambda f, g: metric_vs(f, g, "state")}[name]
    fig = maker(plt, groups)
    save(fig, path)
    plt.close(fig)


def panels(plt, count: int):
  fig, axes = plt.subplots(1, count, figsize=(5.4 * count, 4.2), squeeze=False)
  return fig, list(axes[0])


def save(fig, path: str, dpi: int = 120) -> None:
  lay_out(fig)
  # "tight" takes in the legends beside the last panel, which the figure's width leaves out;
  # a legend added as an artist (the first of two) only when named.
  fig.savefig(path, dpi=dpi, bbox_inches="tight",
              bbox_extra_artists=[artist for ax in fig.axes for artist in ax.artists])


def lay_out(fig) -> None:
  """Spaces the panels; where ``family_legend`` put two legends beside each panel, wider gaps
  for them, which tight_layout does not count (one panel's legends covered the next panel's
  axis label)."""
  from matplotlib.legend import Legend
  fig.tight_layout()
  if any(isinstance(artist, Legend) for ax in fig.axes for artist in ax.artists):
    fig.set_figwidth(fig.get_figwidth() * 1.3)
    fig.subplots_adjust(wspace=0.55)


def loss_curves(plt, groups: dict[str, list[VariantResult]]):
  fig, axes = panels(plt, len(groups))
  for ax, (name, variants) in zip(axes, groups.items()):
    families = []
    finished = [v for v in variants if v.runs]
    styles = variant_styles(finished)
    for variant in finished:
      families.append(variant.attention)
      for j, run in enumerate(variant.runs):
        if run["curve"]:
          steps, losses = zip(*run["curve"])
          ax.plot(steps, losses, color=family_color(variant.attention), linewidth=1.1,
                  linestyle=styles.get(variant.variant, ("-",))[0],
                  alpha=0.9 if j == 0 else 0.45)
    ax.set_title(f"{name}: training loss (every seed)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    plain_axes(ax)
    family_legend(ax, list(dict.fromkeys(families)), styles)
  return fig


def validation_curves(plt, groups: dict[str, list[VariantResult]]):
  import numpy as np
  fig, axes = panels(plt, len(groups))
  for ax, (name, variants) in zip(axes, groups.items()):
    _, metric = headline(variants)
    keys = [source[1] for source in metric.sources if source[0] == "final"]
    families, drew = [], False
    finished = [v for v in variants if v.runs]
    styles = variant_styles(finished)
    for variant in finished:
      series = [dict(run["validation"].get(keys[0], [])) if keys else {} for run in variant.runs]
      steps = sorted(set.intersection(*[set(s) for s in series])) if series else []
      if len(steps) < 2:
        continue
      values = np.asarray([[s[step] for step in steps] for s in series])
      color = family_color(variant.attention)
      ax.plot(steps, values.mean(axis=0), color=color, marker=family_marker(variant.attention),
              markersize=4, linewidth=1.4, linestyle=styles.get(variant.variant, ("-",))[0])
      if len(series) > 1:
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color, alpha=0.15)
      families.append(variant.attention)
      drew = True
    ax.set_title(f"{name}: validation {metric.label} (band: seeds' range)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {metric.label}")
    if not drew:
      ax.text(0.5, 0.5, "no validation during training\n(train.eval_every = 0)",
              ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
    plain_axes(ax)
    family_legend(ax, list(dict.fromkeys(families)), styles)
  return fig


COST_AXES = {
    "params": ("parameters", lambda run: run["params"], False),
    "flops": ("training FLOPs per token", lambda run: run["flops_per_token"], False),
    "width": ("model width (d_model, log scale)", lambda run: run.get("d_model"), True),
    "state": ("decode state at the training length (elements, log scale)",
              lambda run: run["state_at_seq_len"], True),
}


def metric_vs(plt, groups: dict[str, list[VariantResult]], cost: str):
  """The headline metric against a cost, one panel per task and training length: every variant
  of every group at its selected learning rate; the points of one family joined in order of
  cost."""
  by_panel: dict[tuple[str, int | None], list[VariantResult]] = {}
  for variants in groups.values():
    task, _ = headline(variants)
    for variant in (v for v in variants if v.runs):
      by_panel.setdefault((task, variant.first.get("seq_len")), []).append(variant)
  lengths_per_task: dict[str, int] = {}
  for task, _ in by_panel:
    lengths_per_task[task] = lengths_per_task.get(task, 0) + 1
  label, cost_of, log = COST_AXES[cost]
  fig, axes = panels(plt, len(by_panel))
  for ax, ((task, seq_len), variants) in zip(axes, by_panel.items()):
    metric = tasks.get(task).headline_metric()
    families: dict[str, list[tuple]] = {}
    for variant in variants:
      mean, _ = variant.mean_std(metric)
      x = cost_of(variant.first)
      if mean is None or x is None:
        continue
      families.setdefault(variant.attention, []).append(
          (x, mean, variant.interval(metric), len(variant.runs)))
    xs = [p[0] for points in families.values() for p in points]
    # A comparison at one size (matched parameters, one width): every family is one point at
    # nearly the same cost, drawn on top of each other. Side by side instead, named on the axis.
    side_by_side = (len(families) > 1 and all(len(p) == 1 for p in families.values())
                    and max(xs) <= 1.02 * min(xs))
    ys = []
    for i, (family, points) in enumerate(families.items()):
      points.sort()
      color = family_color(family)
      px, py, pe, _ = zip(*points)
      ax.errorbar([i] if side_by_side else px, py, yerr=[e or 0.0 for e in pe], color=color,
                  marker=family_marker(family), markersize=6, capsize=4,
                  linewidth=1.3 if len(points) > 1 else 0, elinewidth=1.2)
      ys += [y + s * (e or 0.0) for y, e in zip(py, pe) for s in (-1, 1)]
    seeds = sorted({p[3] for points in families.values() for p in points})
    where = f" at length {seq_len}" if lengths_per_task[task] > 1 else ""
    ax.set_title(f"{task}{where}: {metric.label} vs {cost} "
                 f"({'lower' if metric.lower_is_better else 'higher'} is better)", fontsize=10)
    ax.set_ylabel(metric.label + f"\n(error bars: 95% interval, {'/'.join(map(str, seeds))} "
                  f"seed{'s' if seeds != [1] else ''})")
    if side_by_side:
      ax.set_xticks(range(len(families)), list(families), rotation=20, fontsize=8)
      ax.set_xlim(-0.6, len(families) - 0.4)
      low, high = plain_number(min(xs)), plain_number(max(xs))
      spread = low if low == high else f"{low} to {high}"
      ax.set_xlabel(f"family (each at {spread}: {label.removesuffix(', log scale)')
                                                     .replace(' (', ', ')})", fontsize=9)
    else:
      ax.set_xlabel(label)
      if cost == "width":  # powers of two, each width a tick
        from matplotlib.ticker import FixedLocator
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(xs))))
      elif log:
        from matplotlib.ticker import LogLocator
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
      pad_limits(ax, xs, "x", log=log)
    pad_limits(ax, ys, "y", bounds=(0.0, 1.0) if is_fraction(metric) else None)
    plain_axes(ax, x=not side_by_side)
    ax.grid(alpha=0.3)
    family_legend(ax, list(families))
  return fig


def is_fraction(metric) -> bool:
  """Accuracies live in [0, 1]; an axis past them only shows where an interval overshoots."""
  return "accuracy" in f"{metric.key} {metric.label}".lower()
