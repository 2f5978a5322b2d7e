r"""Controlled comparisons: run a sweep of attention variants under identical conditions, then
write one table, a claims section and the plots.

    python compare.py --sweep configs/sweeps/quick.py --workdir runs/cmp
    python compare.py --sweep configs/sweeps/quick.py --workdir runs/cmp --out docs/results
    python compare.py --sweep configs/sweeps/quick.py --workdir runs/cmp --report_only
    python compare.py --sweep configs/sweeps/quick.py --workdir runs/cmp --groups lm,vit

A sweep file (``configs/sweeps/*.py``, executed as Python) defines ``get_sweep()``: groups of
members that differ only in their attention variant and seed (see ``arch_zoo/compare``).
Every member's config is checked before any trains; each member is then a ``train.py`` run and
an ``eval.py`` run in ``WORKDIR/GROUP/VARIANT/seedS``, in this process (default) or as
subprocesses (``--subprocess``). Re-running the command skips finished members and resumes the
others from their last checkpoint. A mistake in the sweep prints one ``error:`` line (the
traceback with ``ARCH_ZOO_DEBUG=1``).

Output (``--out``, default the workdir root): ``comparison.md``, ``comparison.csv`` and the plots
(``loss_curves.png``, ``validation_curves.png``, ``metric_vs_params.png``, ``metric_vs_flops.png``,
``metric_vs_width.png``, ``metric_vs_state.png``). ``--budget_s`` bounds one call: the member training then checkpoints,
the report lists it apart, and the same command resumes it (docs/comparisons.md).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.abspath(__file__))
if REPO not in sys.path:  # config files import `configs.common`; members import train.py
  sys.path.insert(0, REPO)

from arch_zoo import errors  # noqa: E402
from arch_zoo.compare import Preempted, SweepError, run_sweep  # noqa: E402


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep", required=True, help="configs/sweeps/NAME.py")
  parser.add_argument("--workdir", required=True, help="root of the members' workdirs")
  parser.add_argument("--out", default=None,
                      help="where comparison.md/.csv and the plots go (default: --workdir)")
  parser.add_argument("--subprocess", action="store_true",
                      help="run each member as train.py and eval.py subprocesses (isolated) "
                           "instead of in this process")
  parser.add_argument("--report_only", action="store_true",
                      help="run nothing; rebuild the table and plots from the finished members")
  parser.add_argument("--groups", default=None,
                      help="comma-separated group names: run and report only these")
  parser.add_argument("--variants", default=None,
                      help="comma-separated variant names: run only their members (the report "
                           "still lists every member; the others wait for a later call)")
  parser.add_argument("--one_by_one", default=None,
                      help="comma-separated attention families whose members train one at a "
                           "time even in a batch_members group (kernels not trusted under vmap)")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="time budget of this call in seconds: no member starts after it and "
                           "the one training checkpoints and stops; the report lists unfinished "
                           "members apart; run again to resume")
  parser.add_argument("--start_margin_s", type=float, default=0.0,
                      help="with --budget_s: start no member in the last this many seconds of "
                           "the budget (a member's compilation and first checkpoint), so the "
                           "call ends close to its budget")
  args = parser.parse_args(argv)
  if args.start_margin_s < 0 or (args.start_margin_s and args.budget_s is None):
    print("error: --start_margin_s must be >= 0 and needs --budget_s", file=sys.stderr)
    raise SystemExit(2)
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # as train.py: orbax logs every file it renames at INFO
  try:
    path, failed = run_sweep(args.sweep, args.workdir, not args.subprocess, args.out,
                             args.report_only, args.groups, args.budget_s, args.variants,
                             args.one_by_one, args.start_margin_s)
  except SweepError as e:
    if errors.debug():
      raise
    print(f"error: {errors.one_line(str(e))}", file=sys.stderr)
    return 1
  except Preempted as e:
    print(f"stopped: {e} The report of the finished members is written.", file=sys.stderr)
    return 1
  print(f"wrote {path} (+ comparison.csv and the plots)")
  if failed:
    print(f"{len(failed)} member(s) failed: {', '.join(failed)}. Fix the cause each one printed "
          "(ARCH_ZOO_DEBUG=1 adds the tracebacks), then run the same command again: finished "
          "members are skipped and the failed ones continue from their last checkpoint. If the "
          "fix changes the sweep file, the members it changes start again: delete their "
          "workdirs (compare.py names any it finds changed).",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
