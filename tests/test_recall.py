"""MQAR generator and the retrieval evaluators."""

import json
import re

import numpy as np
import pytest

from arch_zoo.data import synthetic
from arch_zoo.data.tokenizers import ByteTokenizer
from arch_zoo.evaluators import passkey


def test_answers_are_right_by_construction():
  slc = synthetic.Slice(64, 6)
  inputs, targets, weights = synthetic.generate(3, "train", slc, 200, 256)
  context = 2 * slc.num_kv_pairs
  for x, y, w in zip(inputs, targets, weights):
    pairs = dict(zip(x[0:context:2].tolist(), x[1:context:2].tolist()))
    assert len(pairs) == slc.num_kv_pairs  # keys are distinct
    assert all(1 <= k < 128 for k in pairs) and all(128 <= v < 256 for v in pairs.values())
    asked = np.flatnonzero(w)
    assert len(asked) == slc.num_kv_pairs and asked.min() >= context
    assert sorted(x[asked].tolist()) == sorted(pairs)  # every key is queried once
    for pos in asked:
      assert y[pos] == pairs[int(x[pos])]


def test_generator_is_reproducible_per_seed_and_split():
  slc = synthetic.Slice(32, 4)
  a = synthetic.generate(0, "train", slc, 50, 128)
  b = synthetic.generate(0, "train", slc, 50, 128)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], synthetic.generate(1, "train", slc, 50, 128)[0])
  assert not np.array_equal(a[0], synthetic.generate(0, "test", slc, 50, 128)[0])


def test_queries_favour_short_distances():
  slc = synthetic.Slice(512, 8)
  _, _, weights = synthetic.generate(0, "test", slc, 500, 8192)
  positions = np.nonzero(weights)[1] - 2 * slc.num_kv_pairs
  assert np.median(positions) < (512 - 16) / 4  # power law: most queries come early


def test_bad_slices_fail_clearly():
  with pytest.raises(ValueError, match="too short"):
    synthetic.generate(0, "train", synthetic.Slice(16, 8), 4, 128)
  with pytest.raises(ValueError, match="SEQ_LEN:NUM_KV_PAIRS"):
    synthetic.parse_slices("64-4")


def filler_tokens():
  text = " ".join(f"word{i % 97}" for i in range(4000))
  return ByteTokenizer().encode(text)


def oracle_predict(tokens):
  """Reads the passkey out of the haystack and predicts its digits after the question."""
  tok = ByteTokenizer()
  logits = np.zeros(tokens.shape + (256,), np.float32)
  for b, row in enumerate(tokens):
    text = tok.decode(row)
    key = re.search(r"pass key is (\d{5})\.", text).group(1)
    start = text.rindex(passkey.QUESTION) + len(passkey.QUESTION)
    for i, digit in enumerate(key):
      logits[b, start + i - 1, ord(digit)] = 1.0
  return logits


def random_predict(tokens, rng=np.random.default_rng(0)):
  return rng.normal(size=tokens.shape + (256,)).astype(np.float32) * np.isin(
      np.arange(256), np.arange(48, 58)) * 10


def test_passkey_oracle_scores_100_and_random_scores_chance(tmp_path):
  tok = ByteTokenizer()
  kwargs = dict(filler=filler_tokens(), encode=tok.encode, decode=tok.decode,
                lengths=[200, 400], depths=[0.0, 0.5, 1.0], trials=20)
  perfect = passkey.evaluate(passkey.argmax_of(oracle_predict), **kwargs)
  assert perfect["accuracy"] == 1.0 and perfect["digit_accuracy"] == 1.0
  assert [(c["length"], c["depth"]) for c in perfect["grid"]] == [
      (n, d) for n in (200, 400) for d in (0.0, 0.5, 1.0)]
  chance = passkey.evaluate(passkey.argmax_of(random_predict), **kwargs)
  assert chance["accuracy"] < 0.05
  assert 0.03 < chance["digit_accuracy"] < 0.2  # one digit in ten
  json_path, png_path = passkey.write(perfect, str(tmp_path))
  assert open(png_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert json.load(open(json_path)) == perfect


def test_passkey_context_length_counts_the_answer():
  """At length == seq_len the model never reads past its training length."""
  tok = ByteTokenizer()
  widths = set()

  def next_token(tokens, index):
    widths.add(tokens.shape[1])
    return np.full(len(tokens), ord("0"))

  passkey.evaluate(next_token, filler_tokens(), tok.encode, tok.decode, [300], [0.5], trials=2)
  assert widths == {300}
  assert passkey.default_lengths(1024, tok.encode) == [256, 512, 1024]
  assert passkey.default_lengths(32, tok.encode) == [passkey.min_length(tok.encode)]


def test_passkey_needle_sits_at_the_requested_depth():
  tok = ByteTokenizer()
  rng = np.random.default_rng(0)
  prompt, key = passkey.make_trial(filler_tokens(), 1000, 0.25, rng, tok.encode)
  assert len(prompt) == 1000
  text = tok.decode(prompt)
  where = text.index(f"The pass key is {key}")
  assert abs(where / 1000 - 0.25) < 0.05
