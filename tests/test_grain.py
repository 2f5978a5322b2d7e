"""The grain input pipeline (arch_zoo/data/loader.py) and the Hugging Face source (arch_zoo/data/hf.py).

The oracle for a batch is the pure sampler read directly, a whole batch at once: the sampler maps
the batch's global sample indices to stream windows, packed rows or (example, augmentation)
pairs, and the rows are cut from the tokens or images with vectorised indexing. The loader must
give the same batches, index for index, whatever its threads, worker processes, start sample or
process count, and a run resumed from a checkpoint must train bit-exactly as an uninterrupted one.
"""

import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")  # the GPU image has no TFDS; the data layer needs it

import train
from arch_zoo.data import images, loader, text
from configs import lm, vit
from tests.helpers import train_losses
from tests.test_images import data_config as image_config, make_data, tiny_fashion  # noqa: F401
from tests.test_packing_data import DOCS, corpus, data_config  # noqa: F401


def sampler_batch(d: text.LanguageModelingData, indices: np.ndarray) -> dict[str, np.ndarray]:
  """The oracle: the batch of global samples ``indices``, straight from the sampler."""
  if d.packing == "concat":
    starts = d.sampler.starts(indices)
    windows = d.train.tokens[starts[:, None] + np.arange(d.seq_len + 1)].astype(np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:],
            "weights": np.ones((len(indices), d.seq_len), np.float32)}
  return text.rows_batch(d.train.with_leading_eod(), d.train_rows, d.sampler.rows(indices),
                         segments=d.packing == "pack")


def assert_batches_equal(got, expected):
  assert set(got) == set(expected)
  for key in expected:
    assert got[key].dtype == expected[key].dtype, key
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def take(iterator, count):
  batches = [next(iterator) for _ in range(count)]
  loader.close(iterator)
  return batches


def epoch_length(d):
  return d.train_rows.num_rows if d.train_rows is not None else d.sampler.windows_per_epoch


# ---------------------------------------------------------------------------- text


@pytest.mark.parametrize("packing", ["concat", "pack", "none"])
def test_text_batches_are_the_samplers_index_for_index(corpus, packing):
  d = text.LanguageModelingData(data_config("text:" + corpus, packing=packing), seed=3)
  batch, first = 5, epoch_length(d) - 7  # the batches cross into the second epoch
  for threads in (0, 3):
    got = take(loader.train_batches(d, first, batch, threads=threads), 4)
    for k, b in enumerate(got):
      assert_batches_equal(b, sampler_batch(d, first + k * batch + np.arange(batch)))


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_processes_read_their_rows_of_each_global_batch(corpus, packing):
  cfg = data_config("text:" + corpus, packing=packing)
  parts = [text.LanguageModelingData(cfg, 1, i, 2) for i in range(2)]
  whole = text.LanguageModelingData(cfg, 1)
  for k, (a, b) in enumerate(zip(*(take(loader.train_batches(p, 11, 6, threads=2), 3)
                                    for p in parts))):
    expected = sampler_batch(whole, 11 + 6 * k + np.arange(6))
    assert_batches_equal({key: np.concatenate([a[key], b[key]]) for key in a}, expected)


def test_worker_processes_give_the_same_batches(corpus):
  d = text.LanguageModelingData(data_config("text:" + corpus, packing="pack"), seed=2)
  got = take(loader.train_batches(d, 9, 4, workers=2), 5)  # each worker makes every 2nd batch
  for k, b in enumerate(got):
    assert_batches_equal(b, sampler_batch(d, 9 + 4 * k + np.arange(4)))


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_eval_batches_through_grain_with_threads(corpus, packing):
  cfg = data_config("text:" + corpus, packing=packing)
  d = text.LanguageModelingData(cfg, seed=0)
  plain = list(d.eval_batches(3))
  cfg.threads = 2
  threaded = list(text.LanguageModelingData(cfg, seed=0).eval_batches(3))
  assert len(plain) == len(threaded) == d.num_eval_batches(3)
  for a, b in zip(plain, threaded):
    assert_batches_equal(b, a)
  assert len(list(d.eval_batches(3, max_batches=2))) == 2


def test_negative_workers_fail_clearly(corpus):
  d = text.LanguageModelingData(data_config("text:" + corpus), seed=0)
  with pytest.raises(ValueError, match="data.workers=-1 must be >= 0"):
    loader.train_batches(d, 0, 2, workers=-1)


# ---------------------------------------------------------------------------- images


def image_oracle(d: images.ImageClassificationData, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Sampler -> examples of the in-memory split, augmentation draws of the whole batch at once."""
  examples = d.sampler.examples(indices)
  draws = images.augmentation_draws(d.seed, indices)
  pixels = np.stack([d.train_transform(d.train.images[e], w) for e, w in zip(examples, draws)])
  return {"inputs": (pixels.astype(np.float32) / 255.0 - d.mean) / d.std,
          "targets": d.train.labels[examples].astype(np.int32),
          "weights": np.ones(len(indices), np.float32)}


def test_image_batches_are_the_samplers_index_for_index(tiny_fashion):  # noqa: F811
  d = make_data(image_config(tiny_fashion, crop="pad", flip=True), seed=4)
  first, batch = 33, 8  # 40 examples: the second batch crosses an epoch
  for threads in (0, 2):
    for k, b in enumerate(take(loader.train_batches(d, first, batch, threads=threads), 3)):
      assert_batches_equal(b, image_oracle(d, first + k * batch + np.arange(batch)))


# ---------------------------------------------------------------------------- resume


def test_resume_is_exact_with_other_workers_and_threads(austen_data_dir, tmp_path):
  """Packed rows: 20 steps straight with the training thread making every batch, against 10
  steps with 2 prefetching threads and 10 more, resumed, with 2 worker processes."""
  def config(workers=0, threads=0, **train_overrides):
    c = lm.get_config("attn=mha,size=test")
    c.data.data_dir, c.data.packing = austen_data_dir, "pack"
    c.data.workers, c.data.threads = workers, threads
    c.train.update(progress=False, steps=20, eval_every=0, **train_overrides)
    return c

  full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
  full = train.train_and_evaluate(config(), full_dir)
  assert train.train_and_evaluate(config(threads=2, stop_at_step=10), split_dir) == {"step": 10}
  resumed = train.train_and_evaluate(config(workers=2), split_dir)
  assert train_losses(full_dir) == train_losses(split_dir)  # bitwise, every logged step
  assert resumed["loss"] == full["loss"]
  starts = json.load(open(os.path.join(split_dir, "run_info.json")))["starts"]
  assert starts[-1]["changed"]["data.workers"] == {"before": 0, "now": 2}


# ---------------------------------------------------------------------------- hf:


HF_DOCS = [f"Document {i}. " + " ".join(["The quick brown fox", "jumps over", "the lazy dog",
                                          "again and again"][: i % 4 + 1]) * (i % 5 + 3)
           for i in range(80)]


@pytest.fixture
def offline_hf(monkeypatch):
  datasets = pytest.importorskip("datasets")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  return datasets


@pytest.fixture
def hf_jsonl(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(HF_DOCS)))
  return str(path)


@pytest.fixture
def hf_saved(tmp_path, offline_hf):
  path = str(tmp_path / "saved")
  rows = [{"body": t} for t in HF_DOCS]
  offline_hf.DatasetDict(train=offline_hf.Dataset.from_list(rows[:70]),
                         validation=offline_hf.Dataset.from_list(rows[70:])).save_to_disk(path)
  return path


def hf_config(name, **data_overrides):
  c = lm.get_config("attn=mha,size=test")
  c.data.name = "hf:" + name
  c.data.update(data_overrides)
  c.train.update(progress=False, steps=6, log_every=3, eval_every=0, checkpoint_every=0)
  return c


def test_hf_jsonl_one_document_per_example_and_a_held_out_tenth(offline_hf, hf_jsonl):
  cfg = hf_config(hf_jsonl, val_fraction=0.1).data
  train_docs, val_docs = text.source_texts(cfg.name, cfg, "")
  # One split (a file loads as `train`): the last tenth of the characters is held out, as for
  # text:GLOB, whose cut this is.
  assert (train_docs, val_docs) == text.hold_out(HF_DOCS, 0.1, "")
  assert "".join(train_docs + val_docs) == "".join(HF_DOCS)
  total = sum(map(len, HF_DOCS))
  assert len("".join(val_docs)) == total - int(total * 0.9)


def test_hf_save_to_disk_splits_and_text_key(offline_hf, hf_saved):
  cfg = hf_config(hf_saved, text_key="body", eval_split="validation[:50%]").data
  train_docs, val_docs = text.source_texts(cfg.name, cfg, "")
  assert train_docs == HF_DOCS[:70] and val_docs == HF_DOCS[70:75]


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_hf_trains_and_evaluates(offline_hf, hf_jsonl, hf_saved, tmp_path, packing):
  name, overrides = ((hf_jsonl, {}) if packing == "concat" else
                     (hf_saved, dict(text_key="body", eval_split="validation")))
  c = hf_config(name, packing=packing, seq_len=32, **overrides)
  final = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert final["step"] == 6 and np.isfinite(final["loss"])
  losses = train_losses(str(tmp_path / "run"))
  assert sorted(losses) == [3, 6] and all(np.isfinite(list(losses.values())))
  facts = json.load(open(tmp_path / "run" / "run_info.json"))["data"]
  assert facts["packing"] == packing
  if packing == "pack":
    assert (facts["train_documents"], facts["validation_documents"]) == (70, 10)


def test_hf_bad_input_fails_clearly(offline_hf, hf_saved, tmp_path):
  def read(name, **overrides):
    cfg = hf_config(name, **overrides).data
    return text.source_texts(cfg.name, cfg, "")

  with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['body'\]\. "
                                       r"Set data.text_key"):
    read(hf_saved)
  with pytest.raises(ValueError, match=r"no split 'test' \(its splits: train, validation"):
    read(hf_saved, text_key="body", eval_split="test")
  with pytest.raises(FileNotFoundError, match="no such file or directory"):
    read(str(tmp_path / "missing.jsonl"))
  (tmp_path / "blank.jsonl").write_text('{"text": " "}\n{"text": ""}\n')
  with pytest.raises(ValueError, match="holds no text"):
    read(str(tmp_path / "blank.jsonl"))


def test_hf_without_datasets_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
  cfg = hf_config(str(tmp_path)).data
  with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
    text.source_texts(cfg.name, cfg, "")
