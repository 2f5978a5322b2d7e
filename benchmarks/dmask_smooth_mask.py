r"""What ``dynamic_mask``'s ``block_smooth`` does to the mask and to the kernels' work, on synthetic
scores (the CPU, no timing; causal, one row per score kind):

    python benchmarks/dmask_smooth_mask.py --seq_lens 8192,32768 --blocks 32,64,128

Two kinds of key scores, the two ends of how a trained model's could lie (none is measured here):

* ``iid``: independent normal scores, no order along the sequence (a random layer's are close);
* ``drift``: a random walk along the sequence (Gaussian steps), so that neighbouring keys score
  alike and a query's best keys come in runs.

For each, at ``w = --keep_window``, over ``--queries`` query positions drawn among those that
select (that see more than ``w`` keys): the share of a query's exact top-``w`` keys that the vote
keeps (``recall``), the size of its smoothed set over ``w`` (``size``), and the share of queries
that keep nothing (``empty``); then the tiles the Pallas kernels compute (forward and dQ, at the
default tiling; with the vote, key tiles of the block) over dense causal attention's at the same
tiles, exact and smoothed (``dynamic_mask_pallas.work_fraction``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scores(kind: str, length: int, seed: int):
  import numpy as np
  rng = np.random.default_rng(seed)
  steps = rng.normal(size=length).astype(np.float32)
  return steps if kind == "iid" else np.cumsum(steps).astype(np.float32)


def mask_statistics(score, keep_window: int, block: int, queries) -> dict:
  """Per sampled query ``i``: its exact top-``w`` of ``score[:i + 1]`` (ties to the later key),
  then the blocks of ``block`` keys from position 0 holding more than ``block / 2`` of them."""
  import numpy as np
  recall, size, empty = [], [], 0
  for i in queries:
    prefix = score[:i + 1]
    # Highest score first, ties to the later key: sort by (-score, -position).
    order = np.lexsort((-np.arange(i + 1), -prefix))[:keep_window]
    exact = np.zeros(i + 1, bool)
    exact[order] = True
    padded = np.zeros(-(-(i + 1) // block) * block, bool)
    padded[:i + 1] = exact
    votes = 2 * padded.reshape(-1, block).sum(axis=1) > block
    smoothed = np.repeat(votes, block)[:i + 1]
    recall.append(np.count_nonzero(smoothed & exact) / keep_window)
    size.append(np.count_nonzero(smoothed) / keep_window)
    empty += not smoothed.any()
  return {"recall": float(np.mean(recall)), "size": float(np.mean(size)),
          "empty": empty / len(queries)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", default="8192,32768")
  parser.add_argument("--keep_window", type=int, default=2048)
  parser.add_argument("--blocks", default="32,64,128")
  parser.add_argument("--queries", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="also write the rows as JSON")
  args = parser.parse_args()

  import jax.numpy as jnp
  import numpy as np

  from arch_zoo.attention.ops import dynamic_mask_pallas as dmp

  config = dmp.KernelConfig(interpret=True)  # the default tiling; the CPU builds the lists
  rows = []
  print("T | scores | block | recall | size | empty | forward tiles, exact | with the vote")
  for length in map(int, args.seq_lens.split(",")):
    rng = np.random.default_rng(args.seed)
    queries = rng.choice(np.arange(args.keep_window, length), size=args.queries, replace=False)
    for kind in ("iid", "drift"):
      score = scores(kind, length, args.seed)
      batch_score = jnp.asarray(score)[None, :, None]
      # Eagerly, op by op: XLA's CPU compile of the whole selection at these lengths is slow.
      exact = float(dmp.work_fraction(batch_score, causal=True, keep_window=args.keep_window,
                                      config=config)["forward"])
      for block in map(int, args.blocks.split(",")):
        smoothed = float(dmp.work_fraction(batch_score, causal=True,
                                           keep_window=args.keep_window, config=config,
                                           block_smooth=block)["forward"])
        row = dict(seq_len=length, scores=kind, block=block, keep_window=args.keep_window,
                   forward_tiles_exact=exact, forward_tiles_smoothed=smoothed,
                   **mask_statistics(score, args.keep_window, block, queries))
        rows.append(row)
        print(f"{length} | {kind} | {block} | {row['recall']:.3f} | {row['size']:.3f} | "
              f"{row['empty']:.3f} | {exact:.3f} | {smoothed:.3f}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
