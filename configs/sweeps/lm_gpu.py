r"""The language-model comparison on one GPU: the six attention families at ~30M parameters,
matched in parameters, on the offline corpora (Jane Austen's novels and the King James Bible by
chapter) with a BPE tokenizer and packed documents; four learning rates and three seeds each.

Set-up, once, on a machine with the prepared datasets (`make data`), then carry ``.data`` to the
GPU machine (it is git-ignored; about 9 MB):

    python -m arch_zoo.data.prepare text --corpus austen+kjv --out .data/docs
    python -m arch_zoo.data.prepare tokenizer --corpus austen+kjv --vocab_size 8192 \
        --out .data/tokenizers/austen_kjv_bpe8192.json

Then, as many times as it takes (each call trains what fits its budget, the next resumes):

    python compare.py --sweep configs/sweeps/lm_gpu.py --workdir runs/lm_gpu --budget_s 540 \
        --out docs/results/lm_gpu

The choices, identical for every member:

* ``configs/lm.py:size=M``: 8 layers, width 512, 8 heads, 512 tokens of context, 29.4M
  parameters with ``mha``; every other family's MLP width is set so that its total matches
  (``match="params"``, within 2%).
* Data: the training splits of both corpora as text files (``prepare text``), documents packed
  into rows (``data.packing=pack``: no attention or loss across chapters), the last 5% of the
  text held out for validation (``text:GLOB``'s ``val_fraction``). The tokenizer was trained on
  the same files, held-out part included: it sees the validation text's byte pairs, never its
  targets, and it is the same tokenizer for every family.
* Budget: 900 steps of 16 x 512 tokens (7.4M tokens, about 4 epochs of the ~1.8M-token
  training text), the same for every member; learning rates 5e-4, 1e-3, 2e-3, 4e-3 (the best
  by validation bits per byte is the row), seeds 0, 1, 2 (95% intervals). The grid began at
  1e-3; `mha`'s best on the GPU was that edge (docs/results/lm_comparison_gpu.md), so 5e-4 joined it.
* The sparse families get windows of 128 (a quarter of the context; their defaults exceed it).

Bits per byte divide by the bytes of the original text, so they compare across tokenizers;
perplexity is per BPE token. How to run it larger: raise ``STEPS`` (every member keeps the same
budget), or add a corpus to ``DATA`` (more documents in ``.data/docs``).
"""

from __future__ import annotations

from arch_zoo import attention

DATA = "text:.data/docs/*_train.txt"
TOKENIZER = "hf:.data/tokenizers/austen_kjv_bpe8192.json"
STEPS = 900
LEARNING_RATES = [5e-4, 1e-3, 2e-3, 4e-3]  # 5e-4: mha's best was 1e-3, the grid's edge
SEEDS = [0, 1, 2]
WINDOW = 128
# Six members (two learning rates' seeds) per vmapped program: a GPU call whose time runs out
# loses the program in flight (its checkpoints stay on that machine), and twelve took over 240 s
# on a shared H100, more than a call's share (docs/results/lm_comparison_gpu.md, call 5).
MEMBERS_TOGETHER = 6


def families() -> list[str]:
  """Every registered causal family, the baseline ``mha`` first."""
  return sorted(attention.names_supporting(True), key=lambda name: name != "mha")


def get_sweep():
  return [dict(
      name="lm_M", config="configs/lm.py", arg=f"size=M,data={DATA}",
      variants=families(), seeds=SEEDS, learning_rates=LEARNING_RATES,
      batch_members=MEMBERS_TOGETHER,
      match="params", reference="mha",
      overrides={"data.tokenizer": TOKENIZER, "data.doc_separator": "\\x1e",
                 "data.packing": "pack", "train.steps": STEPS, "train.log_every": 25,
                 "train.eval_every": STEPS // 6, "train.checkpoint_every": STEPS // 3,
                 "train.keep_checkpoints": 1},
      attention_overrides={"dynamic_mask": {"model.attention.keep_window_size": WINDOW},
                           "routing": {"model.attention.local_window": WINDOW}},
      suite=None)]  # the final validation over the whole held-out part is the measurement


def get_claims():
  return [
      dict(title=f"{family} vs MHA: language modelling at matched parameters",
           paper=paper, group="lm_M", variant=family, baseline="mha",
           metrics=["bits_per_byte", "perplexity"])
      for family, paper in (
          ("moh", "MoH with 75% of the heads active matches or beats MHA (LLM-S/B from scratch)."),
          ("lightning", "TransNormerLLM (lightning attention) reaches lower perplexity than a "
                        "softmax Transformer (Wikitext-103, ~45M: 24.03 vs 24.78)."),
          ("masa", "MASA keeps or improves quality with 1/3 of the attention parameters (110M: "
                   "WikiText PPL 72.82 vs 76.11)."),
          ("dynamic_mask", "DMA has lower perplexity than MHA at every size from 80M to 1.7B."),
          ("routing", "The Routing Transformer beats its baseline (Wikitext-103: 15.8 vs 18.3 "
                      "PPL)."))]
