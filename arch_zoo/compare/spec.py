"""Sweep files: groups, variants and claims; the members they define, with matched MLP widths; and
the check of every member before anything trains.

A sweep file defines ``get_sweep()``, a list of groups (dicts with the keys of ``GROUP_KEYS``),
and may define ``get_claims()``, a list of ``Claim`` keyword dicts. Every mistake in it is a
``SweepError``: one line that says where (file, group, variant, seed) and what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

from ml_collections import ConfigDict

from arch_zoo import config_files, provenance, tasks

MATCH_TOLERANCE = 0.02
MATCH_KINDS = ("none", "params", "flops")
GROUP_KEYS = dict(name=None, config=None, arg="", variants=None, seeds=(0,), overrides={},
                  attention_overrides={}, match="none", reference="mha", suite="default",
                  eval_max_batches=None, learning_rates=(), select_by=None, batch_members=False)
# What every member of a group must share: the training budget (steps x batch = tokens or images
# seen), so that no row of a table trained longer than another.
BUDGET_KEYS = ("train.steps", "train.batch_size")
# What a mistake in a sweep or config file raises while its members are built.
USER_ERRORS = (ValueError, KeyError, TypeError, AttributeError, FileNotFoundError)


class SweepError(ValueError):
  """A mistake in a sweep: its message is the one line compare.py prints."""


def describe(error: BaseException) -> str:
  """The message of ``error`` on one line (a KeyError's without the quotes ``str`` adds)."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return " ".join(str(text).split()) or type(error).__name__


@contextlib.contextmanager
def where(place: str):
  """Turns a user error raised inside into a SweepError that starts with ``place``."""
  try:
    yield
  except SweepError:
    raise
  except USER_ERRORS as e:
    raise SweepError(f"{place}: {describe(e)}") from e


@dataclasses.dataclass
class Claim:
  """A paper's claim, restated as what the sweep measured: ``variant`` against ``baseline`` in
  ``group`` on each of ``metrics`` (column ids, e.g. ``bits_per_byte``, ``mqar_accuracy``,
  ``top1``). The numbers are computed from the table; ``paper`` says what the paper claims."""

  title: str
  paper: str
  group: str
  variant: str
  baseline: str
  metrics: tuple[str, ...] | list[str]

  def check(self, groups: list[dict]) -> None:
    group = next((g for g in groups if g["name"] == self.group), None)
    if group is None:
      raise ValueError(f"Claim {self.title!r} names group {self.group!r}, which the sweep lacks.")
    labels = [v["name"] for v in group["variants"]]
    for name in (self.variant, self.baseline):
      if name not in labels:
        raise ValueError(f"Claim {self.title!r} names variant {name!r}; group {self.group!r} "
                         f"has {labels}.")


def normalize_variant(entry, group_name: str) -> dict[str, Any]:
  """A variant is an attention name (``"moh"``) or ``dict(name=LABEL, attention=NAME,
  overrides={...})`` for two settings of one family in one group."""
  if isinstance(entry, str):
    return {"name": entry, "attention": entry, "overrides": {}}
  if not isinstance(entry, dict) or set(entry) - {"name", "attention", "overrides"} \
      or "attention" not in entry:
    raise ValueError(f"Group {group_name!r}: a variant is an attention name or "
                     f"dict(name=..., attention=..., overrides=...); got {entry!r}.")
  return {"name": entry.get("name", entry["attention"]), "attention": entry["attention"],
          "overrides": dict(entry.get("overrides", {}))}


def read_sweep_file(path: str) -> tuple[list, list]:
  """The raw groups and claims of the sweep file at ``path``; a missing file, or one that raises
  when executed, is a SweepError."""
  try:
    config_files.resolve(path)
  except FileNotFoundError as e:
    raise SweepError(f"--sweep: {describe(e)} Pass the path of a sweep file, e.g. "
                     "configs/sweeps/quick.py.") from None
  try:
    module = config_files.load_module(path, prefix="_sweep_")
    if not hasattr(module, "get_sweep"):
      raise SweepError(f"{path} defines no get_sweep(); see configs/sweeps/quick.py.")
    raw_groups = module.get_sweep()
    raw_claims = module.get_claims() if hasattr(module, "get_claims") else []
  except SweepError:
    raise
  except Exception as e:  # noqa: BLE001  a sweep file is user code: any error is the user's
    raise SweepError(f"the sweep file {path} raised {type(e).__name__}: {describe(e)}. Fix it "
                     "(ARCH_ZOO_DEBUG=1 shows the traceback).") from e
  if not isinstance(raw_groups, (list, tuple)) or not all(isinstance(g, dict) for g in raw_groups):
    raise SweepError(f"{path}: get_sweep() must return a list of dicts (one per group); got "
                     f"{type(raw_groups).__name__}.")
  return list(raw_groups), list(raw_claims)


def load_sweep(path: str) -> tuple[list[dict[str, Any]], list[Claim]]:
  """The sweep's groups (every key filled, variants normalised) and claims, checked."""
  raw_groups, raw_claims = read_sweep_file(path)
  groups = []
  for raw in raw_groups:
    with where(f"{path}, group {raw.get('name')!r}"):
      groups.append(normalize_group(raw))
  names = [g["name"] for g in groups]
  if len(set(names)) != len(names):
    raise SweepError(f"{path}: sweep groups need distinct names; got {names}.")
  claims = []
  for raw in raw_claims:
    with where(f"{path}, claim {raw!r}" if not isinstance(raw, dict)
               else f"{path}, claim {raw.get('title')!r}"):
      claim = Claim(**raw)
      claim.check(groups)
      claims.append(claim)
  return groups, claims


def normalize_group(raw: dict) -> dict[str, Any]:
  unknown = set(raw) - set(GROUP_KEYS)
  if unknown:
    raise ValueError(f"Unknown sweep keys {sorted(unknown)} in group {raw.get('name')!r}; "
                     f"valid: {sorted(GROUP_KEYS)}.")
  missing = [k for k in ("name", "config", "variants") if k not in raw]
  if missing:
    raise ValueError(f"Sweep group {raw.get('name')!r} lacks {missing}.")
  group = {**GROUP_KEYS, **raw}
  group["variants"] = [normalize_variant(v, group["name"]) for v in group["variants"]]
  labels = [v["name"] for v in group["variants"]]
  if len(set(labels)) != len(labels):
    raise ValueError(f"Group {group['name']!r} has repeated variant names {labels}; give each "
                     "variant a distinct name.")
  if group["match"] not in MATCH_KINDS:
    raise ValueError(f"match must be one of {MATCH_KINDS}, got {group['match']!r}.")
  if group["match"] != "none" and group["reference"] not in labels:
    raise ValueError(f"Group {group['name']!r}: the reference {group['reference']!r} must be "
                     f"one of its variants {labels}.")
  group["seeds"] = [int(s) for s in group["seeds"]]
  group["learning_rates"] = learning_rate_grid(group)
  if group["select_by"] is not None and not isinstance(group["select_by"], str):
    raise ValueError(f"select_by must be a column id (e.g. 'mqar_accuracy', 'loss'), got "
                     f"{group['select_by']!r}.")
  together = group["batch_members"]
  if not (isinstance(together, bool) or (isinstance(together, int) and together >= 1)):
    raise ValueError(f"batch_members must be True, False or the most members to train together "
                     f"(an integer >= 1, e.g. 6), got {together!r}.")
  return group


def learning_rate_grid(group: dict) -> list[float]:
  """The group's learning rates (empty: each member keeps its config's own), checked."""
  grid = group["learning_rates"]
  if isinstance(grid, (int, float)) or not isinstance(grid, (list, tuple)):
    raise ValueError(f"learning_rates must be a list of numbers, e.g. [1e-3, 3e-3]; got {grid!r}.")
  if not all(isinstance(lr, (int, float)) and lr > 0 for lr in grid):
    raise ValueError(f"learning_rates must be positive numbers; got {list(grid)}.")
  if len(set(grid)) != len(grid):
    raise ValueError(f"learning_rates repeats a value: {list(grid)}.")
  overridden = [f"{where}" for where, overrides in
                [("overrides", group["overrides"]),
                 *[(f"attention_overrides[{k!r}]", v)
                   for k, v in group["attention_overrides"].items()],
                 *[(f"variant {v['name']!r}", v["overrides"]) for v in group["variants"]]]
                if "optim.learning_rate" in overrides]
  if grid and overridden:
    raise ValueError(f"Group {group['name']!r} has a learning_rates grid and also sets "
                     f"optim.learning_rate in {', '.join(overridden)}; the grid sets it: remove "
                     "the override.")
  return [float(lr) for lr in grid]


def select_groups(groups: list[dict], claims: list[Claim], names: str | None):
  """Only the groups named in ``names`` (comma separated), and the claims about them."""
  if not names:
    return groups, claims
  wanted = [n.strip() for n in names.split(",") if n.strip()]
  unknown = sorted(set(wanted) - {g["name"] for g in groups})
  if unknown or not wanted:
    raise SweepError(f"--groups names {unknown or repr(names)}; pass some of the sweep's groups, "
                     f"comma separated: {','.join(g['name'] for g in groups)}.")
  return ([g for g in groups if g["name"] in wanted],
          [c for c in claims if c.group in wanted])


def select_members(planned: dict[str, list[dict]], names: str | None) -> list[dict]:
  """The members to run: all of them, or those of the variants named in ``names`` (comma
  separated), e.g. to finish the variants a comparison needs first; the others wait."""
  everyone = [m for members in planned.values() for m in members]
  if not names:
    return everyone
  wanted = [n.strip() for n in names.split(",") if n.strip()]
  known = list(dict.fromkeys(m["variant"] for m in everyone))
  unknown = sorted(set(wanted) - set(known))
  if unknown or not wanted:
    raise SweepError(f"--variants names {unknown or repr(names)}; pass some of the sweep's "
                     f"variants, comma separated: {','.join(known)}.")
  return [m for m in everyone if m["variant"] in wanted]


def train_one_by_one(planned: dict[str, list[dict]], families: str | None
                     ) -> dict[str, list[dict]]:
  """``planned`` with the members of the attention ``families`` named (comma separated) trained
  one at a time even in a ``batch_members`` group: for a family whose kernels are not trusted
  under ``vmap`` (``tests/test_vmapped_members.py -m gpu``). Their results are the same runs,
  slower. Any family of the sweep may be named, run in this call or not."""
  if not families:
    return planned
  wanted = {n.strip() for n in families.split(",") if n.strip()}
  known = list(dict.fromkeys(m["attention"] for ms in planned.values() for m in ms))
  unknown = sorted(wanted - set(known))
  if unknown or not wanted:
    raise SweepError(f"--one_by_one names {unknown or repr(families)}; pass some of the "
                     f"sweep's attention families, comma separated: {','.join(known)}.")
  return {group: [dict(m, batch_members=False) if m["attention"] in wanted else m
                  for m in members] for group, members in planned.items()}


# ---------------------------------------------------------------------------- members

def config_arg(group: dict, attention: str) -> str:
  return ",".join(filter(None, [f"attn={attention}", group["arg"]]))


def variant_overrides(group: dict, variant: dict, seed: int,
                      learning_rate: float | None = None) -> dict[str, Any]:
  """Every config change of a member: group, family, variant, the grid's learning rate, then the
  seed."""
  grid = {} if learning_rate is None else {"optim.learning_rate": learning_rate}
  return {**group["overrides"], **group["attention_overrides"].get(variant["attention"], {}),
          **variant["overrides"], **grid, "seed": seed}


def build_config(config_file: str, arg: str, overrides: dict[str, Any]) -> ConfigDict:
  return config_files.build(config_file, arg, overrides)


def count_params(model_cfg: ConfigDict) -> dict[str, int]:
  """Parameter counts from shapes only (the model is built abstractly: nothing is allocated)."""
  from flax import nnx

  from arch_zoo import models
  model = nnx.eval_shape(lambda: models.build(model_cfg, rngs=nnx.Rngs(0)))
  return provenance.parameter_counts(nnx.state(model, nnx.Param))


def cost(config: ConfigDict, kind: str) -> float:
  if kind == "params":
    return count_params(config.model)["total"]
  return provenance.flops_per_token(config)["train_flops_per_token"]


def match_d_ff(config: ConfigDict, target: float, kind: str) -> int:
  """The MLP width that brings ``config``'s cost to ``target``, within ``MATCH_TOLERANCE``.

  Parameters and FLOPs are both affine in ``d_ff`` (the MLP's matrices and bias grow linearly; the
  attention does not depend on it), so two evaluations give the solution; rounding to an integer
  moves the cost by one column of the MLP, and the result is verified."""
  if config.model.get("mlp") == "none":
    raise ValueError(f"Cannot match {kind} through the MLP width: model.mlp='none' (attention-only "
                     "blocks) has no MLP. Set match='none' (the table shows the costs anyway).")
  base = config.model.d_ff or 4 * config.model.d_model
  probe = config.copy_and_resolve_references()
  probe.model.d_ff = base
  at_base = cost(probe, kind)
  probe.model.d_ff = base + 64
  slope = (cost(probe, kind) - at_base) / 64
  d_ff = int(round(base + (target - at_base) / slope))
  if d_ff < 1:
    raise ValueError(
        f"Cannot match {kind} for attention {config.model.attention.name!r}: it would need "
        f"d_ff={d_ff}, i.e. its attention alone exceeds the reference's budget. Match on the other "
        "kind, use a larger reference, or set match='none' (the table shows the costs anyway).")
  probe.model.d_ff = d_ff
  reached = cost(probe, kind)
  if abs(reached - target) > MATCH_TOLERANCE * target:
    raise ValueError(f"Matching {kind} reached {reached:.4g} for a target of {target:.4g} "
                     f"(d_ff={d_ff}); more than {MATCH_TOLERANCE:.0%} off.")
  return d_ff


def members(group: dict) -> list[dict[str, Any]]:
  """Every (variant, seed) of a group with its final overrides (matched ``d_ff`` included)."""
  target = None
  if group["match"] != "none":
    reference = next(v for v in group["variants"] if v["name"] == group["reference"])
    with where(f"sweep group {group['name']!r}, variant {reference['name']!r} (the reference)"):
      target = cost(build_config(group["config"], config_arg(group, reference["attention"]),
                                 variant_overrides(group, reference, 0)), group["match"])
  out = []
  for variant in group["variants"]:
    matched_d_ff = None
    if target is not None and variant["name"] != group["reference"]:
      with where(f"sweep group {group['name']!r}, variant {variant['name']!r}"):
        config = build_config(group["config"], config_arg(group, variant["attention"]),
                              variant_overrides(group, variant, 0))
        matched_d_ff = match_d_ff(config, target, group["match"])
    for learning_rate in group["learning_rates"] or [None]:
      for seed in group["seeds"]:
        overrides = variant_overrides(group, variant, seed, learning_rate)
        if matched_d_ff is not None:
          overrides["model.d_ff"] = matched_d_ff
        out.append({"group": group["name"], "variant": variant["name"],
                    "attention": variant["attention"], "seed": seed,
                    "learning_rate": learning_rate, "config_file": group["config"],
                    "arg": config_arg(group, variant["attention"]), "overrides": overrides,
                    "suite": group["suite"], "eval_max_batches": group["eval_max_batches"],
                    "batch_members": group["batch_members"]})
  return out


def budget(config: ConfigDict) -> dict[str, Any]:
  """What a member trains for (``BUDGET_KEYS``: steps and batch size, hence tokens or images)."""
  return {key: config[key.split(".")[0]][key.split(".")[1]] for key in BUDGET_KEYS}


def check_equal_budgets(group: str, budgets: dict[str, dict[str, Any]]) -> None:
  """Every member of a group trains the same steps on batches of the same size, else no table of
  it compares like with like."""
  distinct = {json.dumps(b, sort_keys=True) for b in budgets.values()}
  if len(distinct) > 1:
    listed = "; ".join(f"{who}: {b}" for who, b in budgets.items())
    raise SweepError(f"sweep group {group!r}: its members must train equal budgets "
                     f"({', '.join(BUDGET_KEYS)}), but they differ ({listed}). Set steps and batch "
                     "size in the group's overrides, not per variant or family.")


def check_member(member: dict, checked_models: set[str]) -> ConfigDict:
  """Builds the member's config, checks that its task has its evaluation suite, and builds its
  model abstractly (once per distinct model config): what ``train.py`` would refuse at start-up,
  found before anything trains. Returns the config."""
  config = build_config(member["config_file"], member["arg"], member["overrides"])
  if member["suite"] is not None:
    tasks.get(config.task).suite(member["suite"])
  model = json.dumps(config.model.to_dict(), sort_keys=True, default=str)
  if model not in checked_models:
    count_params(config.model)
    checked_models.add(model)
  return config


def plan(groups: list[dict]) -> dict[str, list[dict[str, Any]]]:
  """Every member of every group (matching included), each checked (``check_member``), before
  anything trains: a mistake in any member stops the sweep with one SweepError."""
  planned, checked_models = {}, set()
  for group in groups:
    found, budgets = members(group), {}
    for member in found:
      label = member_label(member)
      with where(f"sweep group {member['group']!r}, {label}"):
        config = check_member(member, checked_models)
      member["steps"] = int(config.train.steps)
      budgets[label] = budget(config)
    check_equal_budgets(group["name"], budgets)
    planned[group["name"]] = found
  return planned


def lr_text(learning_rate: float) -> str:
  return f"{learning_rate:g}"


def member_label(member: dict) -> str:
  lr = member.get("learning_rate")
  return (f"variant {member['variant']!r}, " + (f"lr {lr_text(lr)}, " if lr is not None else "")
          + f"seed {member['seed']}")


def member_dir(root: str, member: dict) -> str:
  """``ROOT/GROUP/VARIANT/seedS``, with ``lrLR/`` before the seed in a learning-rate grid."""
  grid = [] if member.get("learning_rate") is None else [f"lr{lr_text(member['learning_rate'])}"]
  return os.path.join(root, member["group"], member["variant"], *grid, f"seed{member['seed']}")


def member_identity(member: dict) -> dict[str, Any]:
  """What makes a member this member; a workdir holding another is refused."""
  return json.loads(json.dumps({k: member[k] for k in ("group", "variant", "attention", "seed",
                                                       "config_file", "arg", "overrides")}))
