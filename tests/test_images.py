"""Image data: the IDX reader and Fashion-MNIST builder, the index-based sampler, deterministic
augmentation, evaluation coverage, preprocessing, and clear errors."""

import gzip
import struct

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")  # the GPU image has no TFDS

from arch_zoo import data as data_lib  # noqa: E402
from arch_zoo.data import images  # noqa: E402
from arch_zoo.data.builders.fashion_mnist_debian import fashion_mnist_debian_dataset_builder as fm  # noqa: E402,E501
from configs import vit  # noqa: E402

NUM_TRAIN, NUM_TEST = 40, 13


def write_idx(path, array):
  header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def fake_pixels(n, offset):
  """Pixel (r, c) of image i is 1 + offset + i + 3c: never 0 (the padding value), identifies the
  example, and shows horizontal flips."""
  i, c = np.arange(n)[:, None, None], np.arange(28)[None, None, :]
  return np.broadcast_to(1 + offset + i + 3 * c, (n, 28, 28))


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory):
  """A 40/13-example dataset in the Debian package's layout, built by the real builder."""
  root = tmp_path_factory.mktemp("deb")
  folder = root / "usr/share/datasets/fashion-mnist"
  folder.mkdir(parents=True)
  for split, n, offset in (("train", NUM_TRAIN, 0), ("test", NUM_TEST, 100)):
    images_file, labels_file = fm.FILES[split]
    write_idx(folder / images_file, fake_pixels(n, offset))
    write_idx(folder / labels_file, np.arange(n) % 10)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = fm.Builder(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  return data_dir


def data_config(data_dir, **overrides):
  config = vit.get_config("attn=mha,size=test")
  config.data.data_dir = data_dir
  with config.unlocked():
    for key, value in overrides.items():
      target = config.data.augment if key in config.data.augment else config.data
      target[key] = value
  return config


def make_data(config, seed=0, process_index=0, process_count=1):
  return images.ImageClassificationData(config.data, config.model, seed, process_index,
                                        process_count)


def test_builder_reads_every_example_of_the_idx_files(tiny_fashion):
  train = tfds.data_source("fashion_mnist_debian", split="train", data_dir=tiny_fashion)
  test = tfds.data_source("fashion_mnist_debian", split="test", data_dir=tiny_fashion)
  assert (len(train), len(test)) == (NUM_TRAIN, NUM_TEST)
  for i in (0, 7, NUM_TEST - 1):
    assert test[i]["image"].shape == (28, 28, 1) and test[i]["image"].dtype == np.uint8
    assert int(test[i]["image"][0, 0, 0]) == 101 + i and test[i]["label"] == i % 10


def test_idx_reader_rejects_other_files(tmp_path):
  path = tmp_path / "x.gz"
  with gzip.open(path, "wb") as f:
    f.write(struct.pack(">HBBi", 0, 0x0D, 1, 2) + b"\0" * 8)  # float32, not unsigned bytes
  with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
    fm.read_idx(path)


def test_sampler_visits_every_example_once_per_epoch_in_a_seeded_order():
  sampler = images.EpochSampler(50, seed=3)
  first, second = sampler.examples(np.arange(50)), sampler.examples(np.arange(50, 100))
  assert sorted(first) == sorted(second) == list(range(50))
  assert not np.array_equal(first, second)
  again = images.EpochSampler(50, seed=3).examples(np.arange(99, -1, -1))[::-1]
  np.testing.assert_array_equal(np.concatenate([first, second]), again)


def test_train_batches_are_pure_in_seed_and_sample_index(tiny_fashion):
  config = data_config(tiny_fashion, crop="pad", crop_padding=3, flip=True)
  whole = make_data(config).train_batch(30, 16)  # crosses the epoch boundary at 40
  tail = make_data(config).train_batch(38, 8)
  np.testing.assert_array_equal(whole["inputs"][8:], tail["inputs"])
  np.testing.assert_array_equal(whole["targets"][8:], tail["targets"])
  parts = [make_data(config, 0, i, 2).train_batch(30, 16) for i in range(2)]
  np.testing.assert_array_equal(whole["inputs"], np.concatenate([p["inputs"] for p in parts]))
  other_seed = make_data(config, seed=1).train_batch(30, 16)
  assert not np.array_equal(whole["targets"], other_seed["targets"])


def test_augmentation_draws_are_uniform_and_pure_in_seed_and_sample_index():
  draws = images.augmentation_draws(7, np.arange(1000, 3000))
  assert draws.shape == (2000, images.NUM_DRAWS) and draws.dtype == np.float64
  assert 0.0 <= draws.min() and draws.max() < 1.0
  assert abs(draws.mean() - 0.5) < 0.005 and abs(draws.var() - 1 / 12) < 0.002
  assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.1  # draws of one sample
  assert abs(np.corrcoef(draws[:-1, 0], draws[1:, 0])[0, 1]) < 0.1  # neighbouring samples
  some = np.array([2999, 1000, 1500])  # any order, any batch: the same numbers per sample
  np.testing.assert_array_equal(images.augmentation_draws(7, some), draws[some - 1000])
  assert not np.allclose(images.augmentation_draws(8, some), draws[some - 1000])


def test_augmentation_crops_and_flips_the_right_pixels(tiny_fashion):
  padding = 4
  config = data_config(tiny_fashion, crop="pad", crop_padding=padding, flip=True, mean=(0.0,),
                       std=(1.0,))
  d = make_data(config)
  batch = d.train_batch(0, NUM_TRAIN)
  originals = fake_pixels(NUM_TRAIN, 0)[d.sampler.examples(np.arange(NUM_TRAIN))]
  moves = []
  for out, original in zip(np.rint(batch["inputs"][..., 0] * 255), originals):
    padded = np.pad(original, padding)
    # The output is one window of the zero-padded original, flipped or not: find which.
    found = []
    for top in range(2 * padding + 1):
      for left in range(2 * padding + 1):
        window = padded[top:top + 28, left:left + 28]
        for flip, candidate in ((False, window), (True, window[:, ::-1])):
          if np.array_equal(out, candidate):
            found.append((top, left, flip))
    assert len(found) == 1, found
    moves.append(found[0])
  tops, lefts, flips = zip(*moves)
  assert 0.2 < np.mean(flips) < 0.8  # about half are flipped
  assert len(set(zip(tops, lefts))) > 10  # the windows vary


def test_eval_batches_cover_every_example_once(tiny_fashion):
  d = make_data(data_config(tiny_fashion))
  seen = []
  for batch in d.eval_batches(5):
    assert batch["inputs"].shape == (5, 28, 28, 1)
    valid = batch["weights"] > 0
    seen.extend(batch["inputs"][valid, 0, 0, 0].tolist())
  pixels = (np.array(seen) * d.std[0] + d.mean[0]) * 255  # undo the normalisation
  np.testing.assert_allclose(pixels, 101 + np.arange(NUM_TEST), atol=1e-3)
  assert d.num_eval_batches(5) == 3


def test_normalisation_and_grayscale_to_rgb(tiny_fashion):
  config = data_config(tiny_fashion, mean=(0.25,), std=(0.5,))
  config.model.num_channels = 3
  batch = next(make_data(config).eval_batches(4))
  assert batch["inputs"].shape == (4, 28, 28, 3) and batch["inputs"].dtype == np.float32
  expected = ((101 + np.arange(4) + 3 * 5) / 255.0 - 0.25) / 0.5  # pixel (5, 5)
  np.testing.assert_allclose(batch["inputs"][:, 5, 5, :], np.repeat(expected[:, None], 3, 1),
                             rtol=1e-6)


def test_resize_paths_produce_the_model_size():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)
  assert images.center_crop(image, 32).shape == (32, 32, 3)
  assert images.center_crop(image, 32, crop_fraction=0.875).shape == (32, 32, 3)
  draws = images.augmentation_draws(0, np.arange(3))[:, images.RESIZED_CROP_DRAWS]
  for sample_draws in draws:
    assert images.random_resized_crop(image, 24, 0.08, sample_draws).shape == (24, 24, 3)
  flat = np.full((40, 40, 1), 77, np.uint8)  # resizing a constant image keeps its value
  np.testing.assert_array_equal(images.center_crop(flat, 16), 77)
  # An image already at the model's size is left untouched by the evaluation transform.
  np.testing.assert_array_equal(images.center_crop(image[:32, :32], 32), image[:32, :32])


def test_mismatched_model_fails_with_the_override_to_use(tiny_fashion):
  config = data_config(tiny_fashion)
  config.model.num_classes = 100
  with pytest.raises(ValueError, match="--config.model.num_classes=10"):
    make_data(config)
  config = data_config(tiny_fashion)
  config.data.augment.crop = "inception"
  with pytest.raises(ValueError, match="none, pad, random_resized"):
    make_data(config)


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data_lib.DatasetMissingError,
                     match="python -m arch_zoo.data.prepare fashion_mnist_debian"):
    make_data(data_config(str(tmp_path)))


def test_full_fashion_mnist_is_prepared_with_balanced_classes(fashion_mnist_data_dir):
  config = data_config(fashion_mnist_data_dir)
  config.data.train_split = "train"
  d = make_data(config)
  assert len(d.train) == 60_000 and len(d.split("test")) == 10_000
  np.testing.assert_array_equal(np.bincount(d.train.labels), [6000] * 10)
  pixels = d.train.images.astype(np.float64) / 255  # the config's normalisation constants
  np.testing.assert_allclose([pixels.mean(), pixels.std()], [vit.FASHION_MNIST["mean"][0],
                                                             vit.FASHION_MNIST["std"][0]],
                             atol=5e-5)
