"""Image-classification data: TFDS image datasets, an index-based sampler, preprocessing.

Any TFDS dataset with an image and a class label works: the offline default
``fashion_mnist_debian`` (see :mod:`arch_zoo.data.builders.fashion_mnist_debian`) or a prepared
catalog dataset (``tfds:cifar10``, ``tfds:imagenet2012``...) in ``data.data_dir``. Splits are read
with ``tfds.data_source`` (array_record, random access, no TensorFlow); TFDS split slicing works
(``train[:55000]``).

The sampler is a pure function of (seed, sample index): global sample ``i`` is example
``permutation_e[i mod N]`` of epoch ``e = i // N``, each epoch a permutation seeded by
``(seed, e)``. Augmentation is seeded by ``(seed, i)``, so each sample's crop and flip are fixed
whatever the process count or batch size, and differ between epochs. The sampler's position is the
number of samples consumed, which the checkpoint stores: a resumed run reads exactly the batches
(pixels included) that the uninterrupted run would have read.

Preprocessing, per image: grayscale to RGB if the model wants 3 channels; training crop
(``none``: the evaluation transform; ``pad``: zero-pad by ``crop_padding`` pixels and take a random
``image_size`` crop, the CIFAR recipe; ``random_resized``: the Inception crop of a random area
fraction in [``crop_min_area``, 1] and aspect ratio in [3/4, 4/3], resized); optional horizontal
flip; evaluation: resize the shorter side to ``image_size / eval_crop_fraction`` and take the
central ``image_size`` square (images already at ``image_size`` are left alone); finally
``(pixels / 255 - mean) / std`` per channel, in float32.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from PIL import Image

from arch_zoo.data import batching, default_data_dir, loader, require_prepared
from arch_zoo.registry import check_choice

CROPS = ("none", "pad", "random_resized")
CACHE_MODES = ("auto", "memory", "none")
# "auto" keeps a split in memory (decoded uint8) when its images have a fixed shape and it holds
# at most this many bytes: Fashion-MNIST (47 MB) and CIFAR (150 MB) are; ImageNet is not.
AUTO_CACHE_BYTES = 2 << 30
# Seeds the augmentation stream apart from the sampler's epoch permutations.
AUGMENT_STREAM = 0x617567
# Uniform draws per training sample: a flip, a pad-crop offset pair, and 10 tries of the Inception
# crop (area, aspect ratio, top, left) each.
FLIP_DRAW, PAD_DRAWS, RESIZED_CROP_DRAWS = 0, slice(1, 3), slice(3, 43)
NUM_DRAWS = 43
RESIZED_CROP_TRIES = 10


def dataset_name(name: str) -> str:
  """``tfds:cifar10`` -> ``cifar10``; the offline defaults are TFDS names already."""
  return name[len("tfds:"):] if name.startswith("tfds:") else name


class EpochSampler:
  """Global sample index -> example index; every epoch visits each example once, seeded order."""

  def __init__(self, num_examples: int, seed: int):
    if num_examples < 1:
      raise ValueError("The training split is empty.")
    self.num_examples, self.seed = num_examples, seed
    self._epoch_cache: tuple[int, np.ndarray] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    cache = self._epoch_cache  # one read: grain's threads may replace it meanwhile
    if cache is None or cache[0] != epoch:
      order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      cache = self._epoch_cache = (epoch, order)
    return cache[1]

  def examples(self, indices: np.ndarray) -> np.ndarray:
    out = np.empty(len(indices), dtype=np.int64)
    epochs = indices // self.num_examples
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._order(int(epoch))[indices[sel] % self.num_examples]
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser (Steele et al. 2014): a bijective mix of uint64 counters."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def augmentation_draws(seed: int, sample_indices: np.ndarray,
                       count: int = NUM_DRAWS) -> np.ndarray:
  """Uniform floats in [0, 1), ``[len(sample_indices), count]``: a pure function of the seed, the
  global sample index and the draw's position, computed for a whole batch at once (counter-based,
  like JAX's own random numbers). Seeding one ``np.random.Generator`` per image cost more than
  the rest of a small image's augmentation."""
  golden = np.uint64(0x9E3779B97F4A7C15)
  key = _splitmix64(np.array([seed % (1 << 64)], np.uint64) * golden + np.uint64(AUGMENT_STREAM))
  counters = (np.asarray(sample_indices, np.uint64)[:, None] * np.uint64(count)
              + np.arange(count, dtype=np.uint64)[None, :])
  bits = _splitmix64(_splitmix64(counters + key) ^ key)
  return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # the top 53 bits


def _offset(draw: float, choices: int) -> int:
  """A uniform draw in [0, 1) -> an integer in [0, choices)."""
  return min(int(draw * choices), choices - 1)


# ---------------------------------------------------------------- per-image transforms (uint8 HWC)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize (antialiased when shrinking, as PIL does)."""
  if image.shape[:2] == (height, width):
    return image
  channels = image.shape[2]
  pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out[:, :, None] if channels == 1 else out


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
  """Resizes the shorter side to ``size / crop_fraction``, then takes the central square."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  short = round(size / crop_fraction)
  scale = short / min(h, w)
  image = resize(image, max(short, round(h * scale)), max(short, round(w * scale)))
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def pad_and_random_crop(image: np.ndarray, padding: int, draws: np.ndarray) -> np.ndarray:
  """Zero-pads by ``padding`` pixels on each side and takes a crop of the original size at the
  offsets given by two uniform ``draws``."""
  h, w, c = image.shape
  padded = np.zeros((h + 2 * padding, w + 2 * padding, c), image.dtype)
  padded[padding:padding + h, padding:padding + w] = image
  top, left = (_offset(d, 2 * padding + 1) for d in draws[:2])
  return padded[top:top + h, left:left + w]


def random_resized_crop(image: np.ndarray, size: int, min_area: float,
                        draws: np.ndarray) -> np.ndarray:
  """The Inception crop (Szegedy et al. 2015): a random box of area fraction in [min_area, 1] and
  aspect ratio in [3/4, 4/3] (log-uniform), resized to ``size``; after 10 misses, the centre.
  Each try uses four uniform ``draws``: area, ratio, top, left."""
  h, w = image.shape[:2]
  for area_u, ratio_u, top_u, left_u in draws[:4 * RESIZED_CROP_TRIES].reshape(-1, 4):
    area = h * w * (min_area + (1.0 - min_area) * area_u)
    ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * ratio_u)
    crop_w, crop_h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    if 0 < crop_w <= w and 0 < crop_h <= h:
      top, left = _offset(top_u, h - crop_h + 1), _offset(left_u, w - crop_w + 1)
      return resize(image[top:top + crop_h, left:left + crop_w], size, size)
  return center_crop(image, size)


# ---------------------------------------------------------------- splits


class ImageSplit:
  """Random access to one split's (image, label) pairs, decoded in memory or read on demand."""

  def __init__(self, name: str, split: str, data_dir: str, image_key: str, label_key: str,
               image_shape: tuple, cache: str):
    import tensorflow_datasets as tfds

    # TFDS's ArrayRecord-backed random-access source, the kind grain reads.
    self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    self.image_key, self.label_key = image_key, label_key
    self.images: np.ndarray | None = None
    self.labels: np.ndarray | None = None
    example = self.source[0]
    for key in (image_key, label_key):
      if key not in example:
        raise ValueError(f"{name}:{split} has no feature {key!r}; its features are "
                         f"{sorted(example)}. Set data.image_key / data.label_key.")
    fixed = all(d is not None for d in image_shape)
    if cache == "memory" and not fixed:
      raise ValueError(f"data.cache='memory' needs images of one shape; {name} has {image_shape}. "
                       "Use data.cache='auto' or 'none'.")
    if cache == "memory" or (cache == "auto" and fixed and
                             len(self.source) * math.prod(image_shape) <= AUTO_CACHE_BYTES):
      records = self.source.__getitems__(list(range(len(self.source))))
      self.images = np.stack([r[image_key] for r in records])
      self.labels = np.array([r[label_key] for r in records], np.int32)

  def __len__(self) -> int:
    return len(self.source)

  def get(self, index: int) -> tuple[np.ndarray, np.int32]:
    """Example ``index``: its image (uint8 HWC, as stored) and label."""
    if self.images is not None:
      return self.images[index], self.labels[index]
    record = self.source[int(index)]
    return record[self.image_key], np.int32(record[self.label_key])


class ImageClassificationData:
  """Batches for the ``classification`` task: ``inputs`` float32 ``[B, H, W, C]``, ``targets``
  int32 ``[B]`` and ``weights`` float32 ``[B]`` (0 for the padding rows of the last eval batch)."""

  task = "classification"
  unit = "img"  # throughput unit: images per second
  units_per_example = 1

  def __init__(self, cfg, model_cfg, seed: int, process_index: int = 0, process_count: int = 1):
    import tensorflow_datasets as tfds

    check_choice("data.augment.crop", cfg.augment.crop, CROPS)
    check_choice("data.cache", cfg.cache, CACHE_MODES)
    self.cfg, self.seed = cfg, seed
    self.process_index, self.process_count = process_index, process_count
    self.name = dataset_name(cfg.name)
    self.data_dir = cfg.data_dir or default_data_dir()
    require_prepared(self.name, self.data_dir)
    info = tfds.builder(self.name, data_dir=self.data_dir).info
    self.num_classes = info.features[cfg.label_key].num_classes
    self.image_shape = info.features[cfg.image_key].shape
    self.source_channels = self.image_shape[-1]
    self.image_size, self.channels = model_cfg.image_size, model_cfg.num_channels
    self._check_model(model_cfg)
    self.mean = np.broadcast_to(np.asarray(cfg.mean, np.float32), (self.channels,))
    self.std = np.broadcast_to(np.asarray(cfg.std, np.float32), (self.channels,))
    self._splits: dict[str, ImageSplit] = {}
    self._sampler: EpochSampler | None = None

  @property
  def train(self) -> ImageSplit:
    return self.split(self.cfg.train_split)  # read on first use: eval.py never needs it

  @property
  def sampler(self) -> EpochSampler:
    if self._sampler is None:
      self._sampler = EpochSampler(len(self.train), self.seed)
    return self._sampler

  def _check_model(self, model_cfg) -> None:
    if model_cfg.num_classes != self.num_classes:
      raise ValueError(f"model.num_classes={model_cfg.num_classes} but {self.name} has "
                       f"{self.num_classes} classes: pass --config.model.num_classes="
                       f"{self.num_classes}.")
    if self.channels != self.source_channels and (self.source_channels, self.channels) != (1, 3):
      raise ValueError(f"model.num_channels={self.channels} but {self.name}'s images have "
                       f"{self.source_channels}: pass --config.model.num_channels="
                       f"{self.source_channels} (grayscale images are repeated to RGB when the "
                       "model asks for 3 channels, nothing else is converted).")

  def split(self, split: str) -> ImageSplit:
    if split not in self._splits:
      self._splits[split] = ImageSplit(self.name, split, self.data_dir, self.cfg.image_key,
                                       self.cfg.label_key, self.image_shape, self.cfg.cache)
    return self._splits[split]

  def local_rows(self, global_batch: int) -> slice:
    return batching.local_rows(global_batch, self.process_index, self.process_count)

  # ---------------------------------------------------------------- preprocessing

  def _to_channels(self, image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
      image = image[:, :, None]
    if image.shape[2] == 1 and self.channels == 3:
      image = np.repeat(image, 3, axis=2)
    return image

  def eval_transform(self, image: np.ndarray) -> np.ndarray:
    return center_crop(self._to_channels(image), self.image_size, self.cfg.eval_crop_fraction)

  def train_transform(self, image: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """``draws``: this sample's :func:`augmentation_draws`, so the result is a pure function of
    (seed, global sample index)."""
    aug = self.cfg.augment
    image = self._to_channels(image)
    if aug.crop == "random_resized":
      image = random_resized_crop(image, self.image_size, aug.crop_min_area,
                                  draws[RESIZED_CROP_DRAWS])
    else:
      image = self.eval_transform(image)
      if aug.crop == "pad":
        image = pad_and_random_crop(image, aug.crop_padding, draws[PAD_DRAWS])
    if aug.flip and draws[FLIP_DRAW] < 0.5:
      image = image[:, ::-1]
    return image

  def normalize(self, image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) / 255.0 - self.mean) / self.std

  # ---------------------------------------------------------------- batches

  def train_example(self, index: int) -> dict[str, np.ndarray]:
    """Global training sample ``index``: a pure function of (seed, ``index``)."""
    image, label = self.train.get(self.sampler.examples(np.array([index], np.int64))[0])
    draws = augmentation_draws(self.seed, np.array([index], np.int64))[0]
    return {"inputs": self.normalize(self.train_transform(image, draws)),
            "targets": np.int32(label), "weights": np.float32(1.0)}

  def train_batch(self, first_sample: int, global_batch: int) -> dict[str, np.ndarray]:
    """This process's rows of global samples ``[first_sample, first_sample + global_batch)``."""
    return loader.train_batch(self, first_sample, global_batch)

  def num_eval_batches(self, global_batch: int, split: str | None = None) -> int:
    return math.ceil(len(self.split(split or self.cfg.eval_split)) / global_batch)

  def eval_batches(self, global_batch: int, max_batches: int | None = None,
                   split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every example of ``split`` (default ``data.eval_split``) once, in order; the last batch is
    padded with zero-weight rows so that every batch has the same shape (one compilation)."""
    source = self.split(split or self.cfg.eval_split)
    dataset = loader.eval_dataset(EvalExample(self, source), len(source), global_batch,
                                  self.process_index, self.process_count)
    return loader.eval_batches(dataset, max_batches, loader.loader_options(self.cfg)["threads"])


class EvalExample:
  """Row ``r`` of an evaluation split; past its end, example 0 with weight 0 (padding)."""

  def __init__(self, data: ImageClassificationData, source: ImageSplit):
    self.data, self.source = data, source

  def __call__(self, row: int) -> dict[str, np.ndarray]:
    valid = row < len(self.source)
    image, label = self.source.get(row if valid else 0)
    return {"inputs": self.data.normalize(self.data.eval_transform(image)),
            "targets": np.int32(label), "weights": np.float32(valid)}
