r"""The offline smoke test of the comparison machinery on the 2-core CPU machine: every registered
attention family (the six built-in ones) on the small LM (Jane Austen, bytes), on MQAR and on the
small ViT (Fashion-MNIST), 3 seeds each (the protocol's minimum for a 95% interval), plus the paper
claims it can check at this scale. Families come from the registry (``mha`` first, the baseline),
so a family added to arch_zoo joins the sweep; one loaded as a plugin before this file
(``arch_zoo.plugins``) joins too, its ``plugins=`` in every member's config argument.

    python compare.py --sweep configs/sweeps/quick.py --workdir runs/quick --out docs/results
    python compare.py --sweep configs/sweeps/quick.py --workdir runs/quick --groups mqar

**It shows that the machinery works, not which attention is better**: the LM and ViT groups train
a few hundred steps at one learning rate, far from convergence, so their tables rank how fast each
attention starts to learn, not the papers' claims. The MQAR group is the exception that shows a
real effect on a CPU: ``configs/recall.py``'s size ``cpu`` is small enough that softmax attention
solves recall within minutes, where the fixed-state family does not within the same 800 steps
(docs/results/recall_cpu_2026-12-06.md).
Evidence at the papers' scale is the GPU sweeps' (docs/comparisons.md).

The step counts come from CPU timings of one member per task (docs/comparisons.md has the
measurements); every group trains a variant's seeds together (``batch_members``: one vmapped
program, which on a CPU saves start-up and compilation).

Shared choices, identical for every family of a group:

* 3 layers instead of the configs' 4 (LM and ViT; MQAR has 2): faster, and MASA's default of
  S = L/3 atoms is then exactly one third of the layers, the setting of its claim.
* The sparse families get windows smaller than the sequence, so that they are sparse at all at
  these lengths (their defaults, 2048 and 256, exceed every sequence here and would make them dense
  softmax attention): dynamic_mask keeps ``keep_window_size`` = T/4 keys per query and routing's
  local heads see blocks of ``local_window`` = T/4 (its routing heads use C = 4 clusters, so
  windows of T/4 too). For the ViT (16 patches) and MQAR (16 tokens) both are 8 (T/2).
* MoH uses its default split: half the heads shared, enough routed heads for 75% of all heads to be
  active per token (4 heads: 2 shared + 1 of 2 routed).
* No matching (``match="none"``): MASA's claim is about using fewer attention parameters, so
  matching would hide it; every table shows params, attention params, FLOPs per token and state
  size instead. ``configs/sweeps/lm_iso_params.py`` is the same LM comparison at matched parameters.
"""

from arch_zoo import attention, plugins
from configs import recall

MQAR_CPU_STEPS = recall.SIZES["cpu"]["steps"]

LM_STEPS = 300
VIT_STEPS = 200
SEEDS = [0, 1, 2]
# MQAR at size ``cpu`` trains the size's own steps, learning rate and batch (configs/recall.py),
# validating 10 times on the way (the validation curves).
MQAR_EVALS = 10


def families(causal: bool) -> list[str]:
  """Every registered family that runs in this mode, the baseline ``mha`` first."""
  return sorted(attention.names_supporting(causal), key=lambda name: name != "mha")


def config_arg(arg: str) -> str:
  """``arg`` plus the plugins this process loaded, for members run as subprocesses."""
  loaded = plugins.loaded()
  return f"{arg},plugins={loaded}" if loaded else arg


def quiet(steps: int, log_every: int, eval_every: int = 0) -> dict:
  """Training settings of a short run: loss every ``log_every`` steps (the curves), one checkpoint
  half-way (a killed sweep resumes from it) and one at the end, validation every ``eval_every``
  steps (0: only the final one)."""
  return {"train.steps": steps, "train.log_every": log_every, "train.eval_every": eval_every,
          "train.checkpoint_every": steps // 2, "train.keep_checkpoints": 1}


def get_sweep():
  return [
      dict(name="lm", config="configs/lm.py", arg=config_arg("size=S"), variants=families(True),
           seeds=SEEDS, batch_members=True,
           overrides={"model.num_layers": 3, **quiet(LM_STEPS, 20)},
           attention_overrides={"dynamic_mask": {"model.attention.keep_window_size": 32},
                                "routing": {"model.attention.local_window": 32}},
           # eval.py's default suite on an LM is the perplexity train.py already measured over
           # the whole validation split at the last step: skip the duplicate.
           suite=None),
      dict(name="mqar", config="configs/recall.py", arg=config_arg("size=cpu,task=mqar"),
           variants=families(True), seeds=SEEDS, batch_members=True,
           overrides=quiet(MQAR_CPU_STEPS, 50, MQAR_CPU_STEPS // MQAR_EVALS),
           attention_overrides={"dynamic_mask": {"model.attention.keep_window_size": 8},
                                "routing": {"model.attention.local_window": 8}},
           suite="default"),
      dict(name="vit", config="configs/vit.py", arg=config_arg("size=S"), variants=families(False),
           seeds=SEEDS, batch_members=True,
           # The sweep's own optimiser settings, not the CPU demo recipe of size S, and the model
           # and input choices of the runs in docs/results (size S's defaults then: sin-cos
           # position embedding, float32, GELU, layer norm, plain patches, no flips).
           overrides={"model.num_layers": 3, "model.posemb": "sincos2d",
                      "model.dtype": "auto", "model.mlp": "gelu", "model.norm": "layernorm",
                      "model.tokenizer": "patch", "data.augment.flip": False,
                      "optim.learning_rate": 2e-3,
                      "optim.warmup_steps": 100, "optim.min_lr_ratio": 0.1,
                      "train.xla_flags": "", **quiet(VIT_STEPS, 20)},
           attention_overrides={"dynamic_mask": {"model.attention.keep_window_size": 8},
                                "routing": {"model.attention.local_window": 8}},
           suite=None),
  ]


def get_claims():
  return [
      dict(title="MoH: 75% of the heads vs MHA",
           paper="MoH with 75% of the heads active per token matches or beats MHA (LLMs from "
                 "scratch, 6-task average: LLM-S 44.6 vs 43.9, LLM-B 47.8 vs 47.4).",
           group="lm", variant="moh", baseline="mha", metrics=["bits_per_byte", "perplexity"]),
      dict(title="MoH on images",
           paper="MoH-ViT at 75% of the heads matches its baseline on ImageNet-1k (MoH-ViT-B "
                 "84.9 vs 84.8 top-1; MoH-ViT-S 84.6 vs 84.7).",
           group="vit", variant="moh", baseline="mha", metrics=["top1"]),
      dict(title="MASA: S = L/3 atoms vs MHA",
           paper="Building every layer's Q/K/V/O from S = L/3 shared matrix atoms (1/3 of the "
                 "attention parameters) keeps or improves quality (110M: WikiText PPL 72.82 vs "
                 "76.11 for the vanilla Transformer).",
           group="lm", variant="masa", baseline="mha", metrics=["bits_per_byte", "perplexity"]),
      dict(title="MASA on images", paper="MASA-ViT (CIFAR-100, S = 4, QKVO) beats its vanilla "
           "baseline with fewer parameters (41.75 vs 39.40 at 12 layers, width 64).",
           group="vit", variant="masa", baseline="mha", metrics=["top1"]),
      dict(title="Lightning vs MHA: perplexity",
           paper="TransNormerLLM (lightning attention) reaches lower perplexity than a softmax "
                 "Transformer (Wikitext-103, ~45M: test PPL 24.03 vs 24.78) with a fixed-size "
                 "state.",
           group="lm", variant="lightning", baseline="mha",
           metrics=["bits_per_byte", "perplexity"]),
      dict(title="Lightning vs MHA: recall (MQAR)",
           paper="(No recall claim by the paper; Zoology finds that fixed-state models recall "
                 "worse than attention at equal width.)",
           group="mqar", variant="lightning", baseline="mha", metrics=["mqar_accuracy"]),
      dict(title="Dynamic Mask Attention vs MHA",
           paper="DMA has lower perplexity than MHA at every size from 80M to 1.7B (SmolLM "
                 "corpus, scaling figure).",
           group="lm", variant="dynamic_mask", baseline="mha", metrics=["bits_per_byte"]),
      dict(title="Dynamic Mask Attention vs MHA: recall",
           paper="The DMA paper reports better MQAR recall than MHA.",
           group="mqar", variant="dynamic_mask", baseline="mha", metrics=["mqar_accuracy"]),
      dict(title="Routing Transformer vs MHA",
           paper="The Routing Transformer reaches lower perplexity than the paper's baseline "
                 "(Wikitext-103: 15.8 vs 18.3 PPL) at O(n^1.5 d) attention cost.",
           group="lm", variant="routing", baseline="mha", metrics=["bits_per_byte"]),
      dict(title="Routing Transformer vs MHA: recall",
           paper="(Not claimed by the paper; measured for completeness.)",
           group="mqar", variant="routing", baseline="mha", metrics=["mqar_accuracy"]),
  ]
