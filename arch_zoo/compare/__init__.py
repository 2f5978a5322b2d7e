r"""Controlled comparisons: run a sweep of attention variants under identical conditions, then
write one table, a claims section and the plots (``compare.py`` is the command line).

A sweep file (``configs/sweeps/*.py``) defines ``get_sweep()``: a list of groups. Inside a group
every member is the same config (size, data, data order, steps, optimizer, evaluation) except for
its attention variant and its seed; the seed also drives the data order, so for a given seed every
variant sees the same batches. With ``match="params"`` (or ``"flops"``) the MLP width ``d_ff`` of
each variant is solved so that its parameter count (or training FLOPs per token) lands within 2% of
the reference variant's; the attention itself is left exactly as configured. A sweep file may also
define ``get_claims()``: paper claims to restate as what this sweep measured (``spec.Claim``).

Every member's config is built and checked (``spec.plan``: all groups, variants and seeds,
matching included) before any member trains, so a mistake anywhere in the sweep stops it at once
with one ``SweepError``. The members then run (``runner``), each an ordinary train.py run followed
by eval.py in its own workdir; finished members are skipped and part-done ones resume.

Output (default: the workdir root): ``comparison.md`` and ``comparison.csv`` (one table row per
variant at its best learning rate, the CSV every grid point; metrics as mean ± 95% Student-t
interval over seeds; the workdirs every number comes from; members that did not finish listed
apart) and the plots of ``plots.PLOT_FILES`` (``report``, ``plots``; the numbers from
``analysis``). Groups may sweep learning rates, must train equal budgets, and may train a
variant's seeds and learning rates together as one vmapped program (``batched``); a time budget
(``budget_s``) stops a sweep that the same call resumes later (docs/comparisons.md).
"""

from __future__ import annotations

from arch_zoo.compare import report, runner, spec
from arch_zoo.compare.runner import BudgetReached, Preempted
from arch_zoo.compare.spec import SweepError


def run_sweep(sweep_path: str, root: str, in_process: bool = True, out_dir: str | None = None,
              report_only: bool = False, group_names: str | None = None,
              budget_s: float | None = None, variant_names: str | None = None,
              one_by_one: str | None = None,
              start_margin_s: float = 0.0) -> tuple[str, list[str]]:
  """Checks every member of the sweep, runs the unfinished ones, then writes the report; returns
  the path of comparison.md and the workdirs that failed. ``variant_names`` (comma separated)
  runs only those variants' members, the report still covering every member; the attention
  families in ``one_by_one`` (comma separated) train their members one at a time even where the
  group trains members together (``spec.train_one_by_one``). No member starts in the last
  ``start_margin_s`` of the budget. A sweep stopped by its time budget (``budget_s``) or SIGTERM
  still writes the report of what finished, then raises ``Preempted`` (``BudgetReached``):
  unfinished members are listed apart, never in a table."""
  groups, claims = spec.select_groups(*spec.load_sweep(sweep_path), group_names)
  if not report_only and in_process:
    runner.apply_shared_xla_flags(groups)  # before planning: it may start JAX
  planned = spec.plan(groups)
  failed = []
  if not report_only:
    to_run = spec.select_members(spec.train_one_by_one(planned, one_by_one), variant_names)
    try:
      failed = runner.run_members(to_run, root, in_process, budget_s, start_margin_s)
    except Preempted:
      report.report(root, groups, claims, planned, out_dir or root, sweep_path)
      raise
  return report.report(root, groups, claims, planned, out_dir or root, sweep_path), failed


__all__ = ["BudgetReached", "Preempted", "SweepError", "run_sweep"]
