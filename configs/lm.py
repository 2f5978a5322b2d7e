r"""Decoder-only language model on Jane Austen (byte-level), any attention family.

    python train.py --config configs/lm.py:attn=mha,size=S --workdir runs/lm_mha_S
    python train.py --config configs/lm.py:attn=mha,size=124M,data=tfds:lm1b --workdir runs/x \
        --config.train.steps=20000

Arguments (``get_config("attn=NAME,size=SIZE,data=DATA")``):

* ``attn``: a registered attention name (``python -c "from arch_zoo import attention;
  print(attention.names())"``).
* ``size``: ``test`` (unit tests), ``S`` (the 2-core CPU demo), ``124M`` (GPT-2 small shape) or
  ``350M`` (GPT-2 medium shape). The two GPT-2 shapes use GPT-2's padded vocabulary (50304) so
  shapes and FLOPs match the peers; with the byte tokenizer only the first 256 rows are used. A
  tokenizer with a larger vocabulary (``data.tokenizer``) grows ``model.vocab_size`` to fit it,
  rounded up to a multiple of 128, unless ``model.vocab_size`` was set.
* ``data``: ``austen`` (default, offline), ``kjv`` (the King James Bible, offline),
  ``tfds:NAME`` (a prepared catalog dataset in ``data.data_dir``, text feature ``data.text_key``)
  or ``text:GLOB`` (local UTF-8 files, one document each or split by ``data.doc_separator``; the
  last ``data.val_fraction`` of the text is validation); several joined by ``+`` (``austen+kjv``)
  are mixed. Documents keep their boundaries (an end-of-document token follows each);
  ``data.packing`` (``concat`` | ``pack`` | ``none``) says how they fill the rows
  (``arch_zoo/data/text.py``, docs/data/documents_and_packing.md).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

SIZES = {
    "test": dict(d_model=32, num_layers=2, num_heads=2, seq_len=32, vocab_size=256,
                 batch_size=8, steps=20, learning_rate=3e-3, warmup_steps=2),
    # The 2-core CPU demo: ~4.5 minutes of training. Squared ReLU instead of GELU because XLA's
    # CPU backend spends ~40% of the step in GELU's backward; per step it learns as well.
    "S": dict(d_model=128, num_layers=4, num_heads=4, seq_len=128, vocab_size=256,
              batch_size=8, steps=2400, learning_rate=3e-3, warmup_steps=100, mlp="relu2"),
    # Fastest measured on one H100 (docs/performance.md, "Best settings per size"): these defaults,
    # with fused QKV and the cublas XLA flags through auto on a GPU; batch 64 fits 80 GB.
    # The GPU comparison size (configs/sweeps/lm_gpu.py): ~30M parameters with an 8,192-token
    # vocabulary (a BPE tokenizer of the corpus), 512 tokens of context.
    "M": dict(d_model=512, num_layers=8, num_heads=8, seq_len=512, vocab_size=8192,
              batch_size=16, steps=900, learning_rate=2e-3, warmup_steps=50),
    "124M": dict(d_model=768, num_layers=12, num_heads=12, seq_len=1024, vocab_size=50304,
                 batch_size=64, steps=20000, learning_rate=6e-4, warmup_steps=700),
    "350M": dict(d_model=1024, num_layers=24, num_heads=16, seq_len=1024, vocab_size=50304,
                 batch_size=64, steps=20000, learning_rate=3e-4, warmup_steps=700),
}


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, attn="mha", size="S", data="austen")
  size = common.size_row(SIZES, arg.size, "LM")

  config = ConfigDict()
  config.task = "lm"
  config.seed = 0
  config.plugins = arg.plugins  # eval.py imports them again before rebuilding the model
  config.model = common.backbone_config(size, arg.attn, causal=True, name="lm",
                                        vocab_size=size["vocab_size"], tie_embeddings=True)
  config.data = ConfigDict(dict(
      name=arg.data,
      data_dir="",  # "": $TFDS_DATA_DIR or ~/tensorflow_datasets
      # byte | spm:PATH.model | hf:PATH.json | tiktoken:gpt2 | tiktoken:PATH.tiktoken
      # (arch_zoo/data/tokenizers.py; docs/data/tokenizers.md).
      tokenizer="byte",
      # The size's model.vocab_size. While model.vocab_size is this, it grows to fit a larger
      # tokenizer (rounded up to a multiple of 128); any other value is yours and must fit it.
      default_vocab_size=size["vocab_size"],
      seq_len=size["seq_len"],
      text_key="text",
      train_split="train",
      eval_split="validation",
      val_fraction=0.05,  # text:GLOB only
      doc_separator="",  # text:GLOB only: "" = one document per file; else split files on it
      # concat: a stream crossing documents (fastest kernels, no padding); pack: documents packed
      # into rows with segment ids and restarting positions; none: one document piece per row.
      packing="concat",
      # pack only: at most this many documents share a row. train.py sizes cuDNN's packed layout
      # by the rows themselves (model.max_segments: the most a row holds, plus its padding).
      max_documents_per_row=32,
      # grain's loader (arch_zoo/data/loader.py): worker processes and prefetching threads that
      # make the batches (0 and 0: the training thread does). Neither changes a batch.
      workers=0,
      threads=0,
  ))
  config.optim = common.optim_config(size)
  config.train = common.train_config(size)
  config.eval = ConfigDict(dict(
      batch_size=size["batch_size"] * 4,
      # `eval.py --suite recall|all`: passkey retrieval in validation-corpus filler. Lengths
      # (tokens, answer included; "": 1/4, 1/2 and 1 x data.seq_len) may exceed seq_len to test
      # extrapolation; depths are fractions of the filler before the passkey.
      passkey=ConfigDict(dict(lengths="", depths="0,0.25,0.5,0.75,1", trials=20)),
  ))
  config.mesh, config.sharding = common.mesh_config("dp")
  if arg.size == "test":
    config.train.update(log_every=5, eval_every=10, eval_batches=2, checkpoint_every=10)
    # The final validation reads its whole split: 5% of Austen's is 28 batches instead of 455,
    # which keeps the train-and-resume tests quick.
    config.data.eval_split = "validation[:5%]"
  if arg.size == "S":
    config.train.update(log_every=100, eval_every=1000, checkpoint_every=1000)
  config.lock()
  return config
