r"""Vision Transformer image classification, any attention family that runs bidirectionally.

    python train.py --config configs/vit.py:attn=mha,size=S --workdir runs/vit_mha_S
    python eval.py --workdir runs/vit_mha_S
    python train.py --config configs/vit.py:attn=mha,size=B/16,data=tfds:imagenet2012 \
        --workdir runs/vit_b16 --config.data.data_dir=/data/tfds --config.data.workers=32

Arguments (``get_config("attn=NAME,size=SIZE,data=DATA")``):

* ``attn``: a registered attention name whose family supports bidirectional use
  (``attention.names_supporting(causal=False)``); any other fails here, with the reason.
* ``size``: ``test`` (unit tests), ``S`` (the 2-core CPU demo on Fashion-MNIST), or the standard
  ``Ti/16``, ``S/16``, ``B/16`` at 224x224 for accelerators (widths, depths, heads and MLP sizes
  from the ViT paper's Table 1 and DeiT's Table 1; training recipe from big_vision's
  ``vit_s16_i1k`` / "Better plain ViT baselines for ImageNet-1k", Beyer et al. 2022: batch 1024,
  AdamW lr 1e-3, 10k warm-up steps, cosine, 90 epochs, GAP head, 2-D sin-cos position embedding,
  Inception crop and flip; their RandAugment and mixup are not implemented here).
* ``data``: ``fashion_mnist_debian`` (default for ``test`` and ``S``: offline, 60k/10k) or
  ``tfds:NAME``, a prepared catalog image dataset in ``data.data_dir`` (default for the /16
  sizes: ``tfds:imagenet2012``). Known names get their classes, channels, splits and
  normalisation below; for others set ``--config.model.num_classes`` (the data layer says so).

Fashion-MNIST has no validation split: ``data.eval_split`` (periodic and final validation) is the
test split, as in the published Fashion-MNIST baselines. To select hyper-parameters without
touching it, hold out part of the training split, e.g.
``--config.data.train_split='train[:55000]' --config.data.eval_split='train[55000:]'``;
``eval.py`` always reports ``data.test_split``.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs import common

# Fashion-MNIST's pixel mean and std over its 60k training images (docs/vit.md has the command that
# computes them from the prepared dataset).
FASHION_MNIST = dict(num_classes=10, num_channels=1, mean=(0.2860,), std=(0.3530,),
                     train_split="train", eval_split="test", test_split="test",
                     eval_crop_fraction=1.0)
# Catalog datasets: normalisation to [-1, 1] (big_vision's value_range(-1, 1)).
DATASETS = {
    "fashion_mnist_debian": FASHION_MNIST,
    "tfds:fashion_mnist": FASHION_MNIST,
    "tfds:mnist": dict(FASHION_MNIST, mean=(0.5,), std=(0.5,)),
    "tfds:cifar10": dict(num_classes=10, num_channels=3, mean=(0.5,), std=(0.5,),
                         train_split="train", eval_split="test", test_split="test",
                         eval_crop_fraction=1.0),
    "tfds:cifar100": dict(num_classes=100, num_channels=3, mean=(0.5,), std=(0.5,),
                          train_split="train", eval_split="test", test_split="test",
                          eval_crop_fraction=1.0),
    # ImageNet's held-out "validation" split is the test set everyone reports.
    "tfds:imagenet2012": dict(num_classes=1000, num_channels=3, mean=(0.5,), std=(0.5,),
                              train_split="train", eval_split="validation",
                              test_split="validation", eval_crop_fraction=0.875),
}
UNKNOWN_DATASET = dict(num_classes=0, num_channels=3, mean=(0.5,), std=(0.5,),
                       train_split="train", eval_split="test", test_split="test",
                       eval_crop_fraction=0.875)

# The /16 sizes: ViT paper Table 1 (B), DeiT Table 1 (Ti, S).
_STANDARD = dict(image_size=224, patch_size=16, num_layers=12, pool="gap", posemb="sincos2d",
                 norm="layernorm",
                 batch_size=1024, steps=112_590,  # 90 epochs of ImageNet-1k's 1,281,167 images
                 learning_rate=1e-3, warmup_steps=10_000, crop="random_resized", flip=True,
                 data="tfds:imagenet2012")
SIZES = {
    "test": dict(image_size=28, patch_size=7, d_model=32, num_layers=2, num_heads=2, d_ff=64,
                 pool="gap", posemb="learned", mlp="gelu", norm="layernorm", batch_size=32,
                 steps=20, learning_rate=1e-2, warmup_steps=2, crop="pad", flip=True,
                 data="fashion_mnist_debian"),
    # The 2-core CPU demo. cpu2 (arch_zoo/perf.py) splits the CPU into two devices so each core
    # trains half of every batch; one device uses about one core however many threads it has.
    # bf16 matmuls, squared ReLU and RMSNorm make each step 1.8x as fast on a CPU with
    # bf16 instructions (AVX512-BF16/AMX; elsewhere pass --config.model.dtype=float32), and the
    # time buys more steps with random flips. Shifted Patch Tokenization, learned position
    # embedding and lr 5e-3 were chosen on a held-out tenth of the training split (README,
    # "Vision Transformer").
    "S": dict(image_size=28, patch_size=7, tokenizer="shifted_patch", d_model=64, num_layers=4,
              num_heads=4, d_ff=256, pool="gap", posemb="learned", mlp="relu2", norm="rmsnorm",
              dtype="bfloat16", batch_size=128, steps=8000, learning_rate=5e-3,
              warmup_steps=200, min_lr_ratio=0.0, crop="none", flip=True,
              data="fashion_mnist_debian", xla_flags="cpu2"),
    "Ti/16": dict(_STANDARD, d_model=192, num_heads=3, d_ff=768, mlp="gelu"),
    "S/16": dict(_STANDARD, d_model=384, num_heads=6, d_ff=1536, mlp="gelu"),
    "B/16": dict(_STANDARD, d_model=768, num_heads=12, d_ff=3072, mlp="gelu"),
}


def get_config(arg: str | None = None) -> ConfigDict:
  arg = common.parse_arg(arg, attn="mha", size="S", data="")
  size = common.size_row(SIZES, arg.size, "ViT")
  data_name = arg.data or size["data"]
  dataset = DATASETS.get(data_name, UNKNOWN_DATASET)
  if not (data_name in DATASETS or data_name.startswith("tfds:")):
    raise ValueError(f"Unknown image dataset {data_name!r}; valid: fashion_mnist_debian or "
                     "tfds:NAME (a prepared TFDS image dataset).")

  config = ConfigDict()
  config.task = "classification"
  config.seed = 0
  config.plugins = arg.plugins  # eval.py imports them again before rebuilding the model
  config.model = common.backbone_config(
      size, arg.attn, causal=False,
      # Patches carry their position in the position embedding, not RoPE over a raster order:
      # every family's layers (a hybrid's too) leave RoPE off.
      attention_overrides=dict(rope=False),
      name="vit",
      image_size=size["image_size"],
      patch_size=size["patch_size"],
      tokenizer=size.get("tokenizer", "patch"),  # patch | shifted_patch (SPT, Lee et al. 2021)
      num_channels=dataset["num_channels"],
      num_classes=dataset["num_classes"],
      pool=size["pool"],  # cls (class token) | gap (global average of the final tokens)
      posemb=size["posemb"],  # learned | sincos2d | none
  )
  config.data = ConfigDict(dict(
      name=data_name,
      data_dir="",  # "": $TFDS_DATA_DIR or ~/tensorflow_datasets
      train_split=dataset["train_split"],
      eval_split=dataset["eval_split"],  # periodic and final validation in train.py
      test_split=dataset["test_split"],  # what eval.py reports
      image_key="image",
      label_key="label",
      mean=dataset["mean"],  # per channel (one value: every channel), on pixels in [0, 1]
      std=dataset["std"],
      eval_crop_fraction=dataset["eval_crop_fraction"],  # eval: resize to size/f, centre crop
      cache="auto",  # auto | memory | none: keep decoded splits in memory (auto: if <= 2 GiB)
      # grain's loader (arch_zoo/data/loader.py): worker processes that decode and augment
      # images, and threads that prefetch rows (0 and 0: the training thread makes each batch).
      # Neither changes a batch.
      workers=0,
      threads=0,
      augment=ConfigDict(dict(
          crop=size["crop"],  # none | pad | random_resized
          crop_padding=2,  # pad: pixels of zero padding around the image before the crop
          crop_min_area=0.08,  # random_resized: smallest crop area fraction (Inception: 8%)
          flip=size["flip"],  # random horizontal flip
      )),
  ))
  config.optim = common.optim_config(size, b2=0.999)
  config.train = common.train_config(size)
  config.eval = ConfigDict(dict(batch_size=min(size["batch_size"] * 4, 1024)))
  config.mesh, config.sharding = common.mesh_config("dp")
  if arg.size == "test":
    config.train.update(log_every=5, eval_every=10, eval_batches=2, checkpoint_every=10)
  if arg.size == "S":
    config.train.update(log_every=100, eval_every=0, checkpoint_every=500)
  if arg.size in ("Ti/16", "S/16", "B/16"):
    config.train.update(log_every=100, eval_every=5000, eval_batches=50, checkpoint_every=5000)
  config.lock()
  return config
