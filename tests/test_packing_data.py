"""Documents and packing: boundaries, restarting positions, loss weights, every validation target
once, determinism, the padding fraction, the corpora's documents, a packed LM forward equal to its
documents run one by one, and exact resume with packing.

The oracle for rows is built from the texts alone: document ``d`` read as ``EOD d EOD`` gives the
(input, target) pairs ``(EOD, d_0), (d_0, d_1), ..., (d_last, EOD)``, cut every ``seq_len`` pairs
from its start; one epoch of rows (and the validation batches) must hold exactly these pieces."""

import json
import os

import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

pytest.importorskip("tensorflow_datasets")  # the GPU image has no TFDS; the data layer needs it

import train
from arch_zoo import data as data_lib
from arch_zoo import models
from arch_zoo.data import text
from arch_zoo.data.tokenizers import ByteTokenizer
from configs import lm
from tests.helpers import train_losses

EOD = 0  # the byte tokenizer's end-of-document token


def data_config(name, seq_len=8, packing="pack", val_fraction=0.1, separator=""):
  return ConfigDict(dict(name=name, data_dir="", tokenizer="byte", seq_len=seq_len,
                         text_key="text", train_split="train", eval_split="validation",
                         val_fraction=val_fraction, doc_separator=separator, packing=packing))


def oracle_pieces(texts, seq_len):
  """The (inputs, targets) byte strings of every piece, from the texts alone."""
  out = []
  for t in texts:
    unit = bytes([EOD]) + t.encode() + bytes([EOD])
    for a in range(0, len(unit) - 1, seq_len):
      b = min(a + seq_len, len(unit) - 1)
      out.append((unit[a:b], unit[a + 1:b + 1]))
  return sorted(out)


def row_pieces(batch, packed=True):
  """The pieces in a batch's rows, checking each row's layout on the way."""
  out = []
  for r in range(batch["inputs"].shape[0]):
    weights = batch["weights"][r]
    if not packed:
      n = int(weights.sum())
      assert (weights[:n] == 1).all() and (weights[n:] == 0).all()  # padding only at the end
      if n:
        out.append((bytes(batch["inputs"][r, :n].tolist()),
                    bytes(batch["targets"][r, :n].tolist())))
      continue
    segments, positions = batch["segment_ids"][r], batch["positions"][r]
    np.testing.assert_array_equal(weights, (segments > 0).astype(np.float32))  # loss off padding
    assert (positions[segments == 0] == 0).all()
    ids = segments[segments > 0]
    steps = np.diff(ids)  # segments numbered 1, 2, ... along the row
    assert ((steps == 0) | (steps == 1)).all() and (ids.size == 0 or ids[0] == 1)
    real = np.flatnonzero(segments > 0)
    assert real.size == 0 or real[-1] == real.size - 1  # padding follows the pieces
    for s in np.unique(ids):
      where = np.flatnonzero(segments == s)
      assert (np.diff(where) == 1).all()  # one contiguous run per segment
      np.testing.assert_array_equal(positions[where], np.arange(len(where)))  # restart at 0
      out.append((bytes(batch["inputs"][r, where].tolist()),
                  bytes(batch["targets"][r, where].tolist())))
  return out


DOCS = ["It is a truth universally acknowledged", "Emma", "x", "In the beginning God created",
        "Call me", "abcdefghijklmnopq", "A chapter of twenty-three", "ok"]


@pytest.fixture
def corpus(tmp_path):
  """One file per document; the last, long file holds the validation part."""
  for i, doc in enumerate(DOCS):
    (tmp_path / f"{i:02d}.txt").write_text(doc)
  (tmp_path / "99.txt").write_text("Persuasion " * 40)
  return str(tmp_path / "*.txt")


def split_texts(pattern):
  return text.read_text_files(pattern, 0.1)


# ---------------------------------------------------------------------------- documents


def test_documents_end_with_eod_and_count_one_byte_each():
  docs = text.Documents.from_texts(["ab", "cde", "é"], ByteTokenizer())
  assert docs.tokens.tobytes() == b"ab\0cde\0\xc3\xa9\0"
  np.testing.assert_array_equal(docs.ends, [2, 6, 9])
  assert docs.num_bytes == 2 + 3 + 2 + 3


def test_text_files_are_documents_and_the_cut_holds_out_the_end(corpus):
  train_docs, val_docs = split_texts(corpus)
  assert train_docs[:len(DOCS)] == DOCS  # one document per file, in path order
  assert "".join(train_docs[len(DOCS):] + val_docs) == "Persuasion " * 40
  total = sum(map(len, DOCS)) + len("Persuasion " * 40)
  assert len("".join(val_docs)) == total - int(total * 0.9)


def test_doc_separator_splits_files(tmp_path):
  (tmp_path / "a.txt").write_text("one\n\ntwo\n\n\n\nthree " + "x" * 50)
  train_docs, _ = text.read_text_files(str(tmp_path / "a.txt"), 0.1, separator="\\n\\n")
  assert train_docs[:2] == ["one", "two"] and train_docs[2].startswith("three")


def test_austen_and_kjv_documents_are_chapters(austen_data_dir, kjv_data_dir):
  from arch_zoo.data.builders.austen.austen_dataset_builder import chapters
  assert chapters(["EMMA", "VOLUME I", "CHAPTER I", "Text.", "More.", "VOLUME II", "CHAPTER I",
                   "Later.", "Chapter 2", "End."]) == [
      "EMMA\nVOLUME I\nCHAPTER I\nText.\nMore.", "VOLUME II\nCHAPTER I\nLater.", "Chapter 2\nEnd."]
  cfg = data_config("austen+kjv", seq_len=128, packing="concat")
  cfg.data_dir = austen_data_dir
  austen_train, austen_val = text.source_texts("austen", cfg, austen_data_dir)
  kjv_train, kjv_val = text.source_texts("kjv", cfg, kjv_data_dir)
  assert (len(austen_train), len(austen_val)) == (245, 24)
  assert austen_val[0].startswith("Persuasion") and "Chapter 1\n" in austen_val[0]
  assert all(c.split("\n")[0].lower().startswith(("chapter", "volume"))
             for c in austen_val[1:])
  # 1,189 chapters in all, 42 of Job and 28 of Acts held out.
  assert (len(kjv_train), len(kjv_val)) == (1189 - 70, 70)
  assert kjv_train[0].startswith("Genesis 1\n1 In the beginning God created the heaven and the "
                                 "earth.\n2 And the earth was without form, and void;")
  assert kjv_train[-1].endswith("21 The grace of our Lord Jesus Christ be with you all. Amen.")
  assert kjv_val[0].startswith("Job 1\n1 There was a man in the land of Uz")
  assert kjv_val[-1].startswith("Acts 28\n") and not any(c.startswith("Job ") for c in kjv_train)
  assert sum(c.count("\n") for c in kjv_train + kjv_val) == 31102  # the KJV's verses
  mixed = text.LanguageModelingData(cfg, seed=0)
  assert (len(mixed.train), len(mixed.validation)) == (245 + 1119, 24 + 70)


def test_offline_datasets_record_their_builders_versions():
  import importlib
  for name, spec in data_lib.DATASETS.items():
    builder = importlib.import_module(f"arch_zoo.data.builders.{name}").Builder
    assert str(builder.VERSION) == spec.version, name


# ---------------------------------------------------------------------------- rows


@pytest.mark.parametrize("packing", ["pack", "none"])
def test_one_epoch_of_rows_holds_every_piece_once(corpus, packing):
  d = text.LanguageModelingData(data_config("text:" + corpus, packing=packing), seed=0)
  rows = d.train_rows.num_rows
  batch = d.train_batch(0, rows)
  got = sorted(row_pieces(batch, packed=packing == "pack"))
  assert got == oracle_pieces(split_texts(corpus)[0], 8)
  if packing == "none":
    assert set(batch) == {"inputs", "targets", "weights"}


def test_pack_shares_rows_and_none_does_not(corpus):
  packed = text.LanguageModelingData(data_config("text:" + corpus, packing="pack"), seed=0)
  single = text.LanguageModelingData(data_config("text:" + corpus, packing="none"), seed=0)
  pieces = len(oracle_pieces(split_texts(corpus)[0], 8))
  assert single.train_rows.num_rows == pieces
  assert packed.train_rows.num_rows < pieces
  batch = packed.train_batch(0, packed.train_rows.num_rows)
  assert batch["segment_ids"].max() >= 2  # some row holds several documents


@pytest.mark.parametrize("packing", ["concat", "pack", "none"])
def test_shapes_and_keys(corpus, packing):
  d = text.LanguageModelingData(data_config("text:" + corpus, packing=packing), seed=0)
  batch = d.train_batch(3, 4)
  keys = {"inputs", "targets", "weights"} | ({"segment_ids", "positions"}
                                              if packing == "pack" else set())
  assert set(batch) == keys
  for key, value in batch.items():
    assert value.shape == (4, 8), key
    assert value.dtype == (np.float32 if key == "weights" else np.int32), key


@pytest.mark.parametrize("packing", ["concat", "pack", "none"])
@pytest.mark.parametrize("global_batch", [1, 3])
def test_every_validation_target_counted_once(corpus, packing, global_batch):
  d = text.LanguageModelingData(data_config("text:" + corpus, packing=packing), seed=0)
  batches = list(d.eval_batches(global_batch))
  assert len(batches) == d.num_eval_batches(global_batch)
  val_texts = split_texts(corpus)[1]
  if packing == "concat":  # the stream, minus its first token, in order
    seen = [t for b in batches for row, w in zip(b["targets"], b["weights"])
            for t in row[w > 0].tolist()]
    stream = b"".join(v.encode() + b"\0" for v in val_texts)
    assert bytes(seen) == stream[1:]
    return
  got = sorted(p for b in batches for p in row_pieces(b, packed=packing == "pack"))
  assert got == oracle_pieces(val_texts, 8)
  weight = sum(float(b["weights"].sum()) for b in batches)
  assert weight == sum(len(v.encode()) + 1 for v in val_texts)  # every token and every EOD


def test_processes_partition_eval_and_train_rows(corpus):
  cfg = data_config("text:" + corpus, packing="pack")
  whole = text.LanguageModelingData(cfg, seed=0)
  parts = [text.LanguageModelingData(cfg, 0, i, 2) for i in range(2)]
  for key in ("inputs", "segment_ids", "positions", "weights"):
    np.testing.assert_array_equal(
        whole.train_batch(6, 4)[key], np.concatenate([p.train_batch(6, 4)[key] for p in parts]))
    for w, *p in zip(whole.eval_batches(4), *(q.eval_batches(4) for q in parts)):
      np.testing.assert_array_equal(w[key], np.concatenate([x[key] for x in p]))


def test_rows_are_pure_in_seed_and_index(corpus):
  cfg = data_config("text:" + corpus, packing="pack")
  a, b = (text.LanguageModelingData(cfg, seed=5) for _ in range(2))
  rows = a.train_rows.num_rows
  late = b.train_batch(3 * rows + 2, 5)  # another epoch first: no state carried between calls
  np.testing.assert_array_equal(a.train_batch(3 * rows + 2, 5)["inputs"], late["inputs"])
  window = a.train_batch(0, 3 * rows)
  for first in (0, rows - 2, 2 * rows + 1):
    part = b.train_batch(first, 4)
    for key in part:
      np.testing.assert_array_equal(part[key], window[key][first:first + 4])
  for epoch in range(3):  # each epoch visits every row once, in its own order
    order = a.sampler.rows(np.arange(epoch * rows, (epoch + 1) * rows))
    assert sorted(order) == list(range(rows))
  first_epoch = a.sampler.rows(np.arange(rows))
  assert not np.array_equal(first_epoch, a.sampler.rows(np.arange(rows, 2 * rows)))
  other = text.LanguageModelingData(cfg, seed=6)
  assert not np.array_equal(other.sampler.rows(np.arange(rows)), first_epoch)


def test_padding_fraction_of_a_hand_built_set():
  # Documents of 10, 5, 4, 2, 1 and 3 bytes read as 11, 6, 5, 3, 2 and 4 pairs; at 8 pairs a row
  # the pieces are 8+3, 6, 5, 3, 2, 4. Best fit, longest first: [8], [6, 2], [5, 3], [4, 3]:
  # 4 rows (the fewest that hold 31 pairs), 1 slot of padding in 32.
  docs = text.Documents.from_texts(["a" * 10, "b" * 5, "c" * 4, "d" * 2, "e", "f" * 3],
                                   ByteTokenizer())
  packed = text.make_rows(docs, 8, "pack")
  assert packed.num_rows == 4 and packed.padding_fraction == 1 / 32
  per_row = [sorted(packed.length[packed.row_ptr[r]:packed.row_ptr[r + 1]].tolist())
             for r in range(4)]
  assert sorted(per_row) == [[2, 6], [3, 4], [3, 5], [8]]
  single = text.make_rows(docs, 8, "none")
  assert single.num_rows == 7 and single.padding_fraction == 1 - 31 / 56


def test_facts_report_the_padding(corpus):
  d = text.LanguageModelingData(data_config("text:" + corpus, packing="pack"), seed=0)
  facts = d.facts()
  batch = d.train_batch(0, d.train_rows.num_rows)  # one epoch: every row once
  assert facts["padding_fraction"] == pytest.approx(1 - batch["weights"].mean(), abs=1e-6)
  assert facts["train_documents"] == len(split_texts(corpus)[0])


# ---------------------------------------------------------------------------- bad input


def test_empty_document_sets_fail_clearly(tmp_path):
  (tmp_path / "a.txt").write_text("")
  (tmp_path / "b.txt").write_text("  \n\n")
  with pytest.raises(ValueError, match=r"text:.*\(2 files\) holds no text \(all 2 of its "
                                       r"documents are empty or blank\); point the glob"):
    text.LanguageModelingData(data_config("text:" + str(tmp_path / "*.txt")), seed=0)
  (tmp_path / "c.txt").write_text("words" + " " * 200)
  with pytest.raises(ValueError, match="validation part holds no text.*data.val_fraction"):
    text.LanguageModelingData(data_config("text:" + str(tmp_path / "c.txt"), val_fraction=0.5),
                              seed=0)
  with pytest.raises(ValueError, match="names an empty source"):
    text.LanguageModelingData(data_config(f"text:{tmp_path}/c.txt+"), seed=0)


def test_empty_tfds_split_fails_clearly(austen_data_dir):
  cfg = data_config("austen", packing="pack")
  cfg.data_dir, cfg.eval_split = austen_data_dir, "validation[:0]"
  with pytest.raises(ValueError, match="data=austen split 'validation\\[:0\\]' holds no text"):
    text.LanguageModelingData(cfg, seed=0)


def test_mostly_invalid_utf8_fails_clearly(tmp_path):
  (tmp_path / "a.bin").write_bytes(np.random.default_rng(1).bytes(2000))
  with pytest.raises(ValueError, match=r"a.bin: .* not valid UTF-8 .*Convert it to UTF-8"):
    text.LanguageModelingData(data_config("text:" + str(tmp_path / "a.bin")), seed=0)


def test_unknown_packing_lists_the_choices(corpus):
  with pytest.raises(ValueError, match="concat"):
    text.LanguageModelingData(data_config("text:" + corpus, packing="packed"), seed=0)


def test_old_prepared_version_says_what_to_run(tmp_path):
  os.makedirs(tmp_path / "austen" / "1.0.0")
  (tmp_path / "austen" / "1.0.0" / "dataset_info.json").write_text("{}")
  with pytest.raises(data_lib.DatasetMissingError,
                     match="(?s)prepared only in version 1.0.0, not 2.0.0.*prepare austen"):
    data_lib.require_prepared("austen", str(tmp_path))


# ---------------------------------------------------------------------------- the model


def test_packed_lm_forward_equals_each_document_alone(corpus):
  config = lm.get_config("attn=mha,size=test")
  model = models.build(config.model, rngs=nnx.Rngs(0))
  d = text.LanguageModelingData(data_config("text:" + corpus, seq_len=32, packing="pack"), seed=0)
  rows = d.train_rows.num_rows
  batch = d.train_batch(0, rows)  # one epoch: every row
  assert (batch["segment_ids"].max(axis=1) >= 2).any()  # rows with several documents
  packed_forward = nnx.jit(lambda m, x, p, s: m(x, positions=p, segment_ids=s)[0])
  plain_forward = nnx.jit(lambda m, x: m(x)[0])
  logits = packed_forward(model, batch["inputs"], batch["positions"], batch["segment_ids"])
  checked = 0
  for r in range(rows):
    for s in np.unique(batch["segment_ids"][r][batch["segment_ids"][r] > 0]):
      where = np.flatnonzero(batch["segment_ids"][r] == s)
      # Alone at the start of a row of the same length (one shape to run): the zeros after it
      # change nothing before them, the model being causal.
      alone = np.zeros((1, 32), np.int32)
      alone[0, :len(where)] = batch["inputs"][r, where]
      alone_logits = plain_forward(model, alone)
      np.testing.assert_allclose(np.asarray(logits[r, where]),
                                 np.asarray(alone_logits[0, :len(where)]), atol=1e-5, rtol=1e-5)
      checked += int(where[0] > 0)
  assert checked  # some segment starts mid-row


# ---------------------------------------------------------------------------- resume


def test_resume_is_exact_with_packing(austen_data_dir, tmp_path):
  def config(**train_overrides):
    c = lm.get_config("attn=mha,size=test")
    c.data.data_dir, c.data.packing = austen_data_dir, "pack"
    c.train.update(progress=False, **train_overrides)
    return c

  full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
  full = train.train_and_evaluate(config(), full_dir)
  assert train.train_and_evaluate(config(stop_at_step=10), split_dir) == {"step": 10}
  resumed = train.train_and_evaluate(config(), split_dir)
  assert train_losses(full_dir) == train_losses(split_dir)  # bitwise, every logged step
  assert resumed["loss"] == full["loss"]
  facts = json.load(open(os.path.join(full_dir, "run_info.json")))["data"]
  assert facts["packing"] == "pack" and 0 <= facts["padding_fraction"] < 0.01


@pytest.fixture(scope="session")
def kjv_data_dir():
  """The prepared King James Bible; `make test` prepares it before running pytest."""
  data_dir = data_lib.default_data_dir()
  if not data_lib.is_prepared("kjv", data_dir):
    pytest.fail("The kjv dataset is not prepared: run `make data` (or `python -m "
                "arch_zoo.data.prepare kjv`) before the tests.")
  return data_dir


def test_a_packed_row_holds_at_most_max_documents_per_row():
  lengths = np.array([1, 2, 1, 3, 1, 1, 2, 1, 1, 1, 5, 1])
  starts = np.cumsum(np.concatenate([[0], lengths[:-1]]))
  for cap in (1, 2, 3):
    rows = text.best_fit_decreasing(starts, lengths, seq_len=8, max_pieces=cap)
    counts = np.diff(rows.row_ptr)
    assert counts.max() <= cap and counts.sum() == len(lengths)
    assert sorted(rows.start.tolist()) == sorted(starts.tolist())  # every piece placed once
  uncapped = text.best_fit_decreasing(starts, lengths, seq_len=8)
  assert np.diff(uncapped.row_ptr).max() > 3


def test_packing_bounds_the_models_segments_for_cudnn():
  from arch_zoo import tasks
  config = lm.get_config("attn=mha,size=test")
  config.data.packing = "pack"
  config.data.max_documents_per_row = 7
  tasks.get("lm").resolve(config)
  assert config.model.max_segments == 8  # padding is a segment of its own
  config.data.packing = "concat"
  tasks.get("lm").resolve(config)
  assert config.model.max_segments == 0


def test_the_models_segment_bound_follows_the_packed_rows(corpus):
  """train.py's fit: ``model.max_segments`` = the most pieces of any train or validation row,
  counted from the rows themselves, plus one for padding; a saved larger bound is kept."""
  from arch_zoo import tasks
  config = lm.get_config("attn=mha,size=test")
  config.data = data_config("text:" + corpus, packing="pack")
  config.data.max_documents_per_row = 32
  tasks.get("lm").resolve(config)
  assert config.model.max_segments == 33  # before the data: the cap's bound
  data = text.LanguageModelingData(config.data, seed=0)
  most = 0
  for rows in (data.train_rows, data.validation_rows):
    batch = text.rows_batch(data._train_tokens if rows is data.train_rows
                            else data._validation_tokens, rows, np.arange(rows.num_rows),
                            segments=True)
    most = max(most, int(batch["segment_ids"].max()))  # pieces are numbered 1, 2, ... per row
  assert 1 < most < 32
  tasks.get("lm").fit_to_data(config, data, None)
  assert config.model.max_segments == most + 1
  tasks.get("lm").fit_to_data(config, data, {"model": {"max_segments": 33}})
  assert config.model.max_segments == 33
  config.data.packing = "concat"
  tasks.get("lm").fit_to_data(config, text.LanguageModelingData(config.data, seed=0), None)
  assert config.model.max_segments == 33  # concat has no segments: nothing to fit


def test_exported_text_reads_back_as_the_same_documents(tmp_path, austen_data_dir, kjv_data_dir):
  """`prepare text` (for machines without TFDS): text:GLOB with the record separator gives back
  every document of every split, in order."""
  from arch_zoo.data import prepare
  assert austen_data_dir == kjv_data_dir
  prepare.export_text("austen+kjv", str(tmp_path), austen_data_dir)
  for name in ("austen", "kjv"):
    for split in ("train", "validation"):
      want = list(text.read_tfds_texts(name, split, austen_data_dir, "text"))
      path = tmp_path / f"{name}_{split}.txt"
      assert path.read_text(encoding="utf-8").split(prepare.DOCUMENT_SEPARATOR) == want
      # As a run reads it: the separator as a config string, 10% held out (the cut may split
      # one document in two, which is then in both parts).
      got, held_out = text.read_text_files(str(path), 0.1, "\\x1e")
      assert got[:-1] == want[:len(got) - 1]
      assert held_out[1:] == want[len(want) - len(held_out) + 1:]
      assert "".join(got + held_out) == "".join(want)
  with pytest.raises(ValueError, match=r"names \['fashion'\]; give prepared text corpora"):
    prepare.export_text("austen+fashion", str(tmp_path / "other"), austen_data_dir)
  assert not (tmp_path / "other").exists()  # nothing written before the check
