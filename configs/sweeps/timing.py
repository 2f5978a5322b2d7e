r"""Timing of the quick sweep: its groups with one seed and 100 steps, to measure what a member
costs on this machine (start-up, compilation, training, final validation, eval.py) before
choosing the quick sweep's step counts.

    python compare.py --sweep configs/sweeps/timing.py --workdir runs/timing

The "Runs" table of runs/timing/comparison.md gives each member's seconds; the main table its
training throughput.
"""

from configs.sweeps import quick

STEPS = 100


def get_sweep():
  groups = []
  for group in quick.get_sweep():
    overrides = {**group["overrides"], **quick.quiet(STEPS, 20)}
    groups.append(dict(group, seeds=[0], overrides=overrides))
  return groups
