r"""Seconds of ``dynamic_mask``'s selection (``selection_plan``: ranks, thresholds, key intervals,
the kernels' lists) on random scores, for one or more versions of the kernel module, in one
process on one device: a change to the selection measured against the code it replaces.

    git show eaa5ad7:arch_zoo/attention/ops/dynamic_mask_pallas.py > /tmp/dmp_before.py
    python benchmarks/time_selection.py --modules /tmp/dmp_before.py,current \
        --out benchmarks/results/dmask_selection_h100.json

``current`` is the package's own ``arch_zoo/attention/ops/dynamic_mask_pallas.py``. Scores are
``[1, T, G]`` standard normal (the paper's 1.7B shape: G = 8 KV heads, w = 2048), the tiling
that of ``--pallas_config`` (default: the module's own default).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def load(path: str):
  if path == "current":
    from arch_zoo.attention.ops import dynamic_mask_pallas
    return dynamic_mask_pallas
  spec = importlib.util.spec_from_file_location(f"dmp_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--modules", default="current", help="comma-separated paths, or current")
  parser.add_argument("--seq_lens", default="8192,32768")
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--keep_window", type=int, default=2048)
  parser.add_argument("--pallas_config", default="block_q=128,block_k=32",
                      help="tile fields both versions know, e.g. block_q=128,block_k=32")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  import jax

  fields = {key: int(value) for key, value in
            (item.split("=") for item in filter(None, args.pallas_config.split(",")))}
  rows = []
  for t in map(int, args.seq_lens.split(",")):
    score = jax.random.normal(jax.random.key(0), (1, t, args.kv_heads))
    row = {"seq_len": t}
    for path in args.modules.split(","):
      module = load(path)
      config = module.KernelConfig(**fields)
      plan = jax.jit(lambda s, m=module, c=config: m.selection_plan(
          s, causal=True, keep_window=args.keep_window, config=c))
      row[path] = common.best_call_seconds(plan, score)
      print(t, path, f"{row[path] * 1e3:.3f} ms", flush=True)
    rows.append(row)
  if args.out:
    common.write(args.out, {"benchmark": "dynamic_mask selection_plan seconds, random scores",
                            "kv_heads": args.kv_heads, "keep_window": args.keep_window,
                            "pallas_config": args.pallas_config, "rows": rows,
                            "versions": common.versions("jax", "jaxlib")})


if __name__ == "__main__":
  main()
