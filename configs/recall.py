r"""Multi-query associative recall (MQAR, Zoology) with the LM backbone, any attention family.

    python train.py --config configs/recall.py:attn=mha,size=d128,task=mqar --workdir runs/mqar
    python eval.py --workdir runs/mqar --suite recall

Sizes are Zoology's: 2 layers at widths 64/128/256/512 (``d64`` ... ``d512``), vocabulary 8192,
training on the slices (64, 4), (128, 8), (256, 16) and testing on those plus longer ones
(512, 32) and (1024, 64). ``test`` is for unit tests; ``cpu`` is the 2-core CPU setting where
``mha`` solves MQAR (100% in 800 steps, about 2 minutes) and the fixed-state ``lightning`` does
not within that budget (54%; the quick sweep's MQAR group); ``S`` is a longer CPU run at a larger
vocabulary that stays on the plateau (docs/recall.md).
Accuracy is reported per (sequence length, kv pairs) slice; only answers carry loss.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from arch_zoo.registry import check_choice
from configs import common

ZOOLOGY_TRAIN = "64:4,128:8,256:16"
ZOOLOGY_TEST = "64:4,128:8,256:16,512:32,1024:64"

SIZES = {
    # Unit tests. In 150 steps a 2-layer mha learns to answer with a value from its context
    # (~4x the 1/32 chance); matching the key takes thousands of steps (see docs/recall.md).
    "test": dict(d_model=32, num_layers=2, num_heads=2, vocab_size=64, train_slices="32:4",
                 test_slices="32:4,64:8", train_examples=4096, test_examples=64, batch_size=32,
                 steps=150, learning_rate=1e-2, warmup_steps=5),
    # A CPU run that shows recall (docs/results/recall_cpu_2026-12-06.md): 2 layers at width 64,
    # a vocabulary of 32 (keys 1-15, values 16-31), 4 pairs in 16 tokens, zeros between the
    # queries (Zoology's Figure 2 data). The batch of 256 is what matters: at batch 64 mha stayed
    # on its plateau (answering with some value of its context) for thousands of steps; with
    # 1,024 answers per step it leaves it within ~500 steps.
    "cpu": dict(d_model=64, num_layers=2, num_heads=2, vocab_size=32, train_slices="16:4",
                test_slices="16:4,32:8", train_examples=20_000, test_examples=500,
                batch_size=256, steps=800, learning_rate=3e-3, warmup_steps=50,
                random_non_queries=False),
    "S": dict(d_model=64, num_layers=2, num_heads=2, vocab_size=512, train_slices="64:4",
              test_slices="64:4,128:8", train_examples=20_000, test_examples=500, batch_size=64,
              steps=1500, learning_rate=3e-3, warmup_steps=100),
    **{f"d{width}": dict(d_model=width, num_layers=2, num_heads=2, vocab_size=8192,
                         train_slices=ZOOLOGY_TRAIN, test_slices=ZOOLOGY_TEST,
                         train_examples=100_000, test_examples=3_000, batch_size=256,
                         steps=6000, learning_rate=1e-3, warmup_steps=300)
       for width in (64, 128, 256, 512)},
}


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, attn="mha", size="d128", task="mqar")
  check_choice("recall task", arg.task, ("mqar",))
  size = common.size_row(SIZES, arg.size, "recall")

  config = ConfigDict()
  config.task = "mqar"
  config.seed = 0
  config.plugins = arg.plugins  # eval.py imports them again before rebuilding the model
  config.model = common.backbone_config(size, arg.attn, causal=True, name="lm",
                                        vocab_size=size["vocab_size"], tie_embeddings=True)
  config.data = ConfigDict(dict(
      name="mqar",
      seed=0,  # the datasets are pure functions of this seed (the model seed is config.seed)
      vocab_size=size["vocab_size"],
      train_slices=size["train_slices"],  # "SEQ_LEN:KV_PAIRS,..."
      test_slices=size["test_slices"],
      train_examples=size["train_examples"],  # per training slice, as Zoology's 100k
      test_examples=size["test_examples"],  # per test slice
      power_a=0.01,  # Zoology's power law over query distances
      # random tokens between queries (Zoology's default); False: 0s (its Figure 2, size cpu)
      random_non_queries=size.get("random_non_queries", True),
  ))
  config.optim = common.optim_config(size)
  # Only the answers carry loss: the head and the loss run there alone (the task settles auto
  # as the most answers of a training slice, after any --config.data.train_slices).
  config.train = common.train_config(size, log_every=50, eval_every=1000, eval_batches=4,
                                     checkpoint_every=1000, loss_positions="auto")
  config.eval = ConfigDict(dict(batch_size=size["batch_size"]))
  config.mesh, config.sharding = common.mesh_config("dp")
  if arg.size == "test":
    config.train.update(log_every=10, eval_every=0, checkpoint_every=30)
  config.lock()
  return config
