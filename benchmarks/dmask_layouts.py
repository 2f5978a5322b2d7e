r"""How much work two key layouts of a ``dynamic_mask`` kernel do (causal, random scores; the
CPU, no timing): the tiles computed per (batch, KV group) row as a fraction of dense causal flash
attention's at the same tiles, forward (and dQ).

    python benchmarks/dmask_layouts.py --seq_lens 8192,32768 --chunks 1024,2048,4096

* ``gathered``: the Pallas kernels' layout today (``dynamic_mask_pallas.work_fraction``): per
  query block the kept keys in position order, gathered key by key into tiles.
* ``chunk-rank``: the keys of each position chunk of ``C`` sorted by their rank in the selection
  order, so that a query's kept keys in a past chunk are a contiguous prefix of it (those with
  ``rank <= tau``); its own chunk adds the keys of that prefix not yet visible (masked). A query
  block then reads whole tiles of a permuted copy of K and V: contiguous loads, where the
  gathered layout loads key by key. Per query block and chunk: ``ceil(n / block_k)`` tiles, ``n``
  the chunk's keys with ``rank <= tau`` of the block's first query (``tau`` does not rise along
  the sequence). Tiles never cross a chunk (``C`` a multiple of ``block_k``).

The ratio of the two is the per-tile speed-up the contiguous layout must bring to win.

``--dkv_tiles 128x32,32x128`` prints instead the dK/dV pass's work (``work_fraction``'s ``dkv``)
at each of its own tilings (``dkv_block_q x dkv_block_k``) and each interval-end bucket of
``--end_buckets`` (0: the default, ``w / 2``), the forward's tiles those of the first of
``--tiles``, beside the kept pairs themselves over the same dense tiles' area (the least any
tiling could compute):

    python benchmarks/dmask_layouts.py --dkv_tiles 128x32,64x64 --end_buckets 512,1024,2048,4096
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def chunk_rank_tiles(rank, tau, *, block_q: int, block_k: int, chunk: int) -> int:
  """Tiles the chunk-rank layout computes for one row: ``rank``, ``tau`` numpy ``[T]``."""
  import numpy as np
  length = len(rank)
  total = 0
  for start in range(0, length, block_q):
    threshold = tau[start]
    last = min(start + block_q, length)
    for c0 in range(0, last, chunk):
      kept = int(np.count_nonzero(rank[c0:min(c0 + chunk, length)] <= threshold))
      total += -(-kept // block_k)
  return total


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", default="8192,32768")
  parser.add_argument("--keep_window", type=int, default=2048)
  parser.add_argument("--tiles", default="64x64,128x32", help="block_q x block_k, comma separated")
  parser.add_argument("--chunks", default="1024,2048,4096")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dkv_tiles", default="",
                      help="dK/dV tilings to count instead, e.g. 128x32,32x128,64x64")
  parser.add_argument("--end_buckets", default="0",
                      help="with --dkv_tiles: interval-end buckets (queries), 0 = w / 2")
  args = parser.parse_args()
  if args.dkv_tiles:
    dkv_work(args)
    return

  import jax
  import jax.numpy as jnp
  import numpy as np

  from arch_zoo.attention.ops import dynamic_mask_pallas as dmp

  print("| T | tiles | gathered | " + " | ".join(f"chunk-rank, C = {c}" for c in
                                                  args.chunks.split(",")) + " |")
  print("|---|---|---|" + "---|" * len(args.chunks.split(",")))
  for length in map(int, args.seq_lens.split(",")):
    score = jax.random.normal(jax.random.key(args.seed), (1, length, 1), jnp.float32)
    rank = dmp.selection_ranks(score, "recent")
    first, end = dmp.document_bounds(None, 1, length, length)
    tau = dmp.thresholds(rank, args.keep_window, causal=True, first=first, end=end,
                         seq_len=length)
    rank, tau = np.asarray(rank[0, 0]), np.asarray(tau[0, 0])
    for tiles in args.tiles.split(","):
      block_q, block_k = map(int, tiles.split("x"))
      config = dmp.KernelConfig(block_q=block_q, block_k=block_k)
      gathered = float(dmp.work_fraction(score, causal=True, keep_window=args.keep_window,
                                         config=config)["forward"])
      dense = sum(-(-min(s + block_q, length) // block_k) for s in range(0, length, block_q))
      cells = [chunk_rank_tiles(rank, tau, block_q=block_q, block_k=block_k, chunk=int(c)) / dense
               for c in args.chunks.split(",")]
      print(f"| {length:,} | {block_q} x {block_k} | {gathered:.3f} | "
            + " | ".join(f"{c:.3f}" for c in cells) + " |")


def dkv_work(args) -> None:
  import jax
  import jax.numpy as jnp

  from arch_zoo.attention.ops import dynamic_mask_pallas as dmp

  block_q, block_k = map(int, args.tiles.split(",")[0].split("x"))
  w = args.keep_window
  print("| T | dK/dV tiles | end bucket | dK/dV work | kept pairs |")
  print("|---|---|---|---|---|")
  for length in map(int, args.seq_lens.split(",")):
    score = jax.random.normal(jax.random.key(args.seed), (1, length, 1), jnp.float32)
    # Causal, one document: query i keeps min(i + 1, w) keys.
    pairs = sum(min(i + 1, w) for i in range(length))
    for tiles in args.dkv_tiles.split(","):
      dkv_q, dkv_k = map(int, tiles.split("x"))
      dense = sum(-(-min(s + dkv_q, length) // dkv_k) for s in range(0, length, dkv_q))
      for bucket in map(int, args.end_buckets.split(",")):
        config = dmp.KernelConfig(block_q=block_q, block_k=block_k, dkv_block_q=dkv_q,
                                  dkv_block_k=dkv_k, end_bucket=bucket)
        work = dmp.work_fraction(score, causal=True, keep_window=w, config=config)
        print(f"| {length:,} | {dkv_q} x {dkv_k} | {bucket or w // 2} | "
              f"{float(work['dkv']):.3f} | {pairs / (dense * dkv_q * dkv_k):.3f} |", flush=True)


if __name__ == "__main__":
  main()
