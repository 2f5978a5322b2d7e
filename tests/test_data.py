"""Data: the R reader, the Austen builder's splits, the sampler and the validation windows."""

import numpy as np
import pytest
from ml_collections import ConfigDict

pytest.importorskip("tensorflow_datasets")  # the GPU image has no TFDS; the data layer needs it

from arch_zoo import data as data_lib
from arch_zoo.data import text
from arch_zoo.data.builders.austen.austen_dataset_builder import paragraphs


def data_config(name="austen", data_dir="", seq_len=16):
  return ConfigDict(dict(name=name, data_dir=data_dir, tokenizer="byte", seq_len=seq_len,
                         text_key="text", train_split="train", eval_split="validation",
                         val_fraction=0.1))


def test_paragraphs_reflow_wrapped_lines():
  lines = ["Chapter 1", "", "It is a truth", "universally acknowledged.", None, "", "End"]
  assert paragraphs(lines) == ["Chapter 1", "It is a truth universally acknowledged.", "End"]


def test_austen_splits_hold_out_persuasion(austen_data_dir):
  d = text.LanguageModelingData(data_config(data_dir=austen_data_dir), seed=0)
  val_text = d.tokenizer.decode(d.validation.tokens[:200])
  assert val_text.startswith("Persuasion")
  assert b"Kellynch" in d.validation.tokens.tobytes()
  assert b"Kellynch" not in d.train.tokens.tobytes()  # Persuasion's estate: validation only
  assert 3_000_000 < len(d.train.tokens) < 4_000_000
  assert d.bytes_per_token() == 1.0


def test_sampler_is_pure_in_seed_and_index():
  a = text.WindowSampler(10_000, 16, seed=3)
  b = text.WindowSampler(10_000, 16, seed=3)
  idx = np.arange(0, 5000, 7)
  np.testing.assert_array_equal(a.starts(idx), b.starts(idx[::-1])[::-1])
  assert not np.array_equal(a.starts(idx), text.WindowSampler(10_000, 16, seed=4).starts(idx))


def test_sampler_visits_every_window_once_per_epoch():
  sampler = text.WindowSampler(1000, 10, seed=0)
  starts = sampler.starts(np.arange(sampler.windows_per_epoch))
  shift = starts.min() % 10
  assert sorted((starts - shift) // 10) == list(range(sampler.windows_per_epoch))
  assert starts.max() + 11 <= 1000  # every window and its shifted target fit in the stream


def test_eval_batches_cover_every_target_exactly_once(tmp_path):
  (tmp_path / "a.txt").write_text("abcdefghij" * 30)
  d = text.LanguageModelingData(data_config(f"text:{tmp_path}/*.txt", seq_len=8), seed=0)
  stream = d.validation.tokens
  seen = []
  for batch in d.eval_batches(3):
    for row in range(3):
      n = int(batch["weights"][row].sum())
      seen.extend(batch["targets"][row, :n].tolist())
  assert seen == stream[1:].tolist()


def test_train_batch_targets_are_inputs_shifted(tmp_path):
  (tmp_path / "a.txt").write_text("".join(chr(65 + i % 26) for i in range(2000)))
  d = text.LanguageModelingData(data_config(f"text:{tmp_path}/*.txt", seq_len=8), seed=0)
  batch = d.train_batch(0, 4)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_process_rows_partition_the_global_batch(tmp_path):
  (tmp_path / "a.txt").write_text("xyz" * 1000)
  cfg = data_config(f"text:{tmp_path}/*.txt", seq_len=8)
  whole = text.LanguageModelingData(cfg, seed=0).train_batch(40, 8)["inputs"]
  parts = [text.LanguageModelingData(cfg, 0, i, 2).train_batch(40, 8)["inputs"] for i in range(2)]
  np.testing.assert_array_equal(whole, np.concatenate(parts))


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data_lib.DatasetMissingError, match="python -m arch_zoo.data.prepare austen"):
    text.LanguageModelingData(data_config(data_dir=str(tmp_path)), seed=0)


def test_missing_text_files_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="matches no files"):
    text.LanguageModelingData(data_config(f"text:{tmp_path}/*.md"), seed=0)
