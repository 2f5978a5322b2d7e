r"""How long the head suite (``eval.py --suite heads``) takes at research scale: a 124M language
model (12 layers x 12 heads, 1024 tokens, vocabulary 50304) and a ViT-S/16 (12 x 6 heads, 196
tokens), each randomly initialised, on synthetic inputs of the real shapes (the GPU machine has no
datasets; the timing depends on shapes, not on values).

    python benchmarks/bench_heads.py --out benchmarks/results/heads_suite_h100.json   # one GPU
    python benchmarks/bench_heads.py --smoke --out /tmp/heads_smoke.json             # any CPU

Every pass of the suite is timed (maps: entropy, distance, sink, previous-token, induction,
retrieval and streaming on passkey prompts; ablation: every head alone plus the pruning curve,
batched; figures), compilation included: what a user waits for. The JSON also records the
figures and the shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


class SyntheticText:
  """What the suite reads from a language model's data, with random tokens."""

  def __init__(self, seq_len: int, vocab: int, seed: int = 0):
    import numpy as np
    from arch_zoo.data.tokenizers import ByteTokenizer

    self.seq_len, self.vocab_size = seq_len, vocab
    self.tokenizer = ByteTokenizer()
    rng = np.random.default_rng(seed)
    self.validation = type("Split", (), {})()
    self.validation.tokens = rng.integers(32, 127, size=200_000).astype(np.int32)  # byte text
    self._rng = rng

  def eval_batches(self, batch: int, max_batches=None, split=None):
    import numpy as np
    for _ in range(max_batches or 1):
      tokens = self._rng.integers(0, self.vocab_size, (batch, self.seq_len + 1)).astype(np.int32)
      yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": np.ones((batch, self.seq_len), np.float32)}


class SyntheticImages:
  def __init__(self, model_cfg, seed: int = 0):
    import numpy as np
    self.cfg, self._rng = model_cfg, np.random.default_rng(seed)

  def eval_batches(self, batch: int, max_batches=None, split=None):
    import numpy as np
    c = self.cfg
    for _ in range(max_batches or 1):
      yield {"inputs": self._rng.normal(size=(batch, c.image_size, c.image_size,
                                             c.num_channels)).astype(np.float32),
             "targets": self._rng.integers(0, c.num_classes, batch).astype(np.int32),
             "weights": np.ones((batch,), np.float32)}


def measure(kind: str, size: str, attn: str) -> dict:
  import jax
  from flax import nnx

  from arch_zoo import models
  from arch_zoo.analysis import Analysis, suite
  from configs import lm, vit

  config = (lm if kind == "lm" else vit).get_config(f"attn={attn},size={size}")
  start = time.perf_counter()
  model = models.build(config.model, rngs=nnx.Rngs(0))
  jax.block_until_ready(nnx.state(model))
  build_seconds = time.perf_counter() - start
  data = (SyntheticText(config.data.seq_len, config.model.vocab_size) if kind == "lm"
          else SyntheticImages(config.model))
  analysis = Analysis.of(model, config=config)
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    result = suite.evaluate(analysis, config, data, workdir)
    total = time.perf_counter() - start
    with open(os.path.join(workdir, suite.JSON_FILE)) as f:
      record = json.load(f)
  layers, heads = analysis.shape
  return {"kind": kind, "size": size, "attention": attn, "layers": layers, "heads": heads,
          "eval_batch_size": config.eval.batch_size,
          "seq_len": config.data.seq_len if kind == "lm" else None,
          "build_seconds": build_seconds, "suite_seconds": total,
          "passes_seconds": record["seconds"], "figures": len(result["figures"]),
          "heads_needed_90": result["heads_needed_90"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lm_size", default="124M")
  parser.add_argument("--vit_size", default="S/16")
  parser.add_argument("--attn", default="mha")
  parser.add_argument("--smoke", action="store_true", help="tiny test sizes, any CPU")
  parser.add_argument("--out", default="benchmarks/results/heads_suite.json")
  args = parser.parse_args()
  lm_size, vit_size = ("test", "test") if args.smoke else (args.lm_size, args.vit_size)
  import jax
  rows = []
  for kind, size in (("lm", lm_size), ("vit", vit_size)):
    rows.append(measure(kind, size, args.attn))
    print(rows[-1], flush=True)
    common.write(args.out, {"backend": jax.default_backend(),
                            "versions": common.versions("jax", "jaxlib", "flax"), "rows": rows})


if __name__ == "__main__":
  main()
