"""MQAR generator and the retrieval evaluators."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eval as eval_lib
import train
from arch_zoo import attention
from arch_zoo.data import synthetic
from arch_zoo.data.tokenizers import ByteTokenizer
from arch_zoo.evaluators import passkey
from configs import lm, recall
from tests.helpers import train_losses


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
  synthetic.generate.cache_clear()  # generate afresh, not from the cache
  b = synthetic.generate(0, "train", slc, 50, 128)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], synthetic.generate(1, "train", slc, 50, 128)[0])
  assert not np.array_equal(a[0], synthetic.generate(0, "test", slc, 50, 128)[0])


def test_training_batches_walk_each_epochs_own_shuffle_across_the_boundary():
  """Sample ``i`` of the stream is example ``permutation_e[i mod n]`` of epoch ``e = i // n``, the
  permutation drawn from (seed, epoch): a batch that straddles two epochs takes its rows from
  both, and every example comes once per epoch."""
  config = recall.get_config("size=test,task=mqar")
  data = synthetic.MQARData(config.data, seed=3)
  n = len(data.train[0])
  batch = data.train_batch(n - 5, 8)
  want = np.concatenate([np.random.default_rng([3, 0]).permutation(n)[n - 5:],
                         np.random.default_rng([3, 1]).permutation(n)[:3]])
  np.testing.assert_array_equal(batch["inputs"], data.train[0][want])
  epoch = np.concatenate([data.train_batch(start, 64)["inputs"] for start in range(0, n, 64)])
  assert len(epoch) == n
  assert sorted(map(bytes, epoch)) == sorted(map(bytes, data.train[0]))


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


# ---------------------------------------------------------------- through train.py and eval.py


def mqar_config(**train_overrides):
  config = recall.get_config("attn=mha,size=test,task=mqar")
  config.train.update(progress=False, **train_overrides)
  return config


def test_mqar_resume_is_exact_and_eval_suite_all_scores_every_slice(tmp_path):
  full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
  full = train.train_and_evaluate(mqar_config(steps=8, log_every=1), full_dir)
  assert train.train_and_evaluate(mqar_config(steps=8, log_every=1, stop_at_step=4),
                                  split_dir) == {"step": 4}
  resumed = train.train_and_evaluate(mqar_config(steps=8, log_every=1), split_dir)
  assert train_losses(full_dir) == train_losses(split_dir)  # bitwise, every step
  assert resumed["loss"] == full["loss"] and resumed["accuracy"] == full["accuracy"]
  config = mqar_config()
  assert full["answers"] == config.data.test_examples * 4  # the (32, 4) slice's test set

  record = eval_lib.evaluate_run(split_dir, suite="all")
  assert (record["step"], record["task"], record["suite"]) == (8, "mqar", "all")
  mqar = record["results"]["mqar"]
  test_slices = synthetic.parse_slices(config.data.test_slices)
  assert [(s["seq_len"], s["num_kv_pairs"]) for s in mqar["slices"]] == [
      (s.seq_len, s.num_kv_pairs) for s in test_slices]
  assert all(s["examples"] == config.data.test_examples for s in mqar["slices"])
  trained = [s for s in mqar["slices"] if s["trained"]]
  assert len(trained) == 1 and mqar["accuracy"] == trained[0]["accuracy"]
  # The in-distribution slice is the training loop's validation set: the same accuracy.
  np.testing.assert_allclose(mqar["accuracy"], full["accuracy"], rtol=1e-6)
  assert json.load(open(os.path.join(split_dir, "eval_results.json"))) == record

  # Another step: the earlier results move aside instead of being overwritten.
  older = eval_lib.evaluate_run(split_dir, step=4, suite="recall")
  assert older["step"] == 4
  kept = json.load(open(os.path.join(split_dir, "eval_results_step8.json")))
  assert kept == record


def test_tiny_mha_learns_4_pair_mqar_well_above_chance(tmp_path):
  """In the CI budget (150 steps) the model gets to answering with one of the values in its
  context (accuracy up to 1/4); matching the key needs thousands of steps (the GPU headline)."""
  config = mqar_config(eval_every=0, checkpoint_every=0)
  final = train.train_and_evaluate(config, str(tmp_path))
  chance = 1 / (config.data.vocab_size - config.data.vocab_size // 2)  # a uniform value guess
  assert final["accuracy"] > 3 * chance, final
  losses = train_losses(str(tmp_path))
  assert losses[max(losses)] < np.log(1 / chance) - 0.4, losses  # below a uniform value guess


def test_lm_eval_suites_merge_and_passkey_writes_its_heat_map(austen_data_dir, tmp_path):
  config = lm.get_config("attn=mha,size=test")
  config.data.data_dir = austen_data_dir
  config.train.update(progress=False, steps=10)
  train.train_and_evaluate(config, str(tmp_path))
  options = {"lengths": [150, 200], "depths": [0.0, 1.0], "trials": 2}  # beyond seq_len 32: RoPE
  record = eval_lib.evaluate_run(str(tmp_path), max_batches=1, suite="all",
                                 passkey_options=options)
  assert set(record["results"]) == {"perplexity", "passkey"} and record["suite"] == "all"
  key = record["results"]["passkey"]
  assert [(c["length"], c["depth"]) for c in key["grid"]] == [(150, 0.0), (150, 1.0),
                                                             (200, 0.0), (200, 1.0)]
  assert 0.0 <= key["accuracy"] <= 1.0 and key["train_seq_len"] == 32
  assert open(tmp_path / key["heatmap"], "rb").read(4) == b"\x89PNG"
  # The default suite replaces perplexity (two batches now) and keeps the passkey results.
  again = eval_lib.evaluate_run(str(tmp_path), max_batches=2)
  assert again["suite"] == "default" and again["results"]["passkey"] == key
  assert again["results"]["perplexity"]["tokens"] > record["results"]["perplexity"]["tokens"]
  assert json.load(open(tmp_path / "eval_results.json")) == again


def test_mqar_path_imports_without_tensorflow_datasets():
  """The GPU image has no tensorflow_datasets: training and scoring MQAR must not need it."""
  code = """
import sys
sys.modules["tensorflow_datasets"] = None  # any import of it now fails
import eval, train
from arch_zoo import data
from benchmarks import mqar_headline
from configs import recall
data.build(recall.get_config("attn=mha,size=test")).train_batch(0, 4)
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------- passkey by generation


def oracle_generate(prompts):
  """Greedy decoding by a model that reads the passkey out of its prompt."""
  tok = ByteTokenizer()
  keys = [re.search(r"pass key is (\d{5})\.", tok.decode(p)).group(1) for p in prompts]
  return np.array([tok.encode(k) for k in keys], np.int32)


def test_passkey_reports_generated_scores_next_to_teacher_forced():
  tok = ByteTokenizer()
  kwargs = dict(filler=filler_tokens(), encode=tok.encode, decode=tok.decode,
                lengths=[200, 300], depths=[0.0, 1.0], trials=10)
  both = passkey.evaluate(passkey.argmax_of(oracle_predict), generate=oracle_generate, **kwargs)
  assert both["accuracy_generated"] == 1.0 and both["digit_accuracy_generated"] == 1.0
  assert all(c["accuracy_generated"] == 1.0 for c in both["grid"])

  # A decoder that always answers the passkey with its first digit wrong: exact 0, digits 4/5;
  # the teacher-forced score (the oracle's forward) stays 1.
  def wrong_first_digit(prompts):
    answers = oracle_generate(prompts)
    answers[:, 0] = ord("0") + (answers[:, 0] - ord("0") + 1) % 10
    return answers

  off = passkey.evaluate(passkey.argmax_of(oracle_predict), generate=wrong_first_digit, **kwargs)
  assert off["accuracy"] == 1.0 and off["accuracy_generated"] == 0.0
  np.testing.assert_allclose(off["digit_accuracy_generated"], 0.8)
  assert "accuracy_generated" not in passkey.evaluate(passkey.argmax_of(oracle_predict),
                                                      **kwargs)
  lines = passkey.summary(off)
  assert any("generated: exact 0.0000 | digits 0.8000" in line for line in lines)
  assert any("teacher-forced: exact 1.0000 | digits 1.0000" in line for line in lines)


def test_teacher_forcing_scores_each_digit_given_the_true_ones_before_it():
  """Greedy decoding continues from its own mistakes; teacher forcing feeds the true digits."""
  tok = ByteTokenizer()

  def copies_previous_token_or_1(tokens, index):  # predicts "1" after "1", else "2"
    return np.where(tokens[:, index] == ord("1"), ord("1"), ord("2"))

  prompts = np.stack([tok.encode("The pass key is ")] * 2).astype(np.int32)
  answers = np.stack([tok.encode("11111"), tok.encode("12121")]).astype(np.int32)
  forced = passkey.teacher_forced(copies_previous_token_or_1, prompts, answers)
  # After " " the model says "2"; after a true "1" it says "1", after a true "2", "2".
  assert [tok.decode(r) for r in forced] == ["21111", "21212"]


def test_lm_passkey_by_generation_equals_greedy_argmax_reruns(austen_data_dir, tmp_path):
  """eval.py's generated passkey answers are the greedy continuation of each prompt, recomputed
  here with one forward per digit over the unpadded sequence."""
  import jax.numpy as jnp

  from arch_zoo import generate
  config = lm.get_config("attn=lightning,size=test")
  config.data.data_dir = austen_data_dir
  config.train.update(progress=False, steps=4, eval_every=0, checkpoint_every=0)
  train.train_and_evaluate(config, str(tmp_path))
  options = {"lengths": [150], "depths": [0.5], "trials": 3}
  record = eval_lib.evaluate_run(str(tmp_path), suite="recall", passkey_options=options)
  key = record["results"]["passkey"]
  assert {"accuracy", "digit_accuracy", "accuracy_generated",
          "digit_accuracy_generated"} <= set(key)
  assert "generated: exact" in "\n".join(eval_lib.summary(record))

  run = generate.load_run(str(tmp_path))
  tok = ByteTokenizer()
  data_tokens = eval_lib.data_lib.build(run.config).validation.tokens
  rng = np.random.default_rng([run.config.seed, 150, 500])
  trials = [passkey.make_trial(data_tokens, 150 - passkey.DIGITS, 0.5, rng, tok.encode)
            for _ in range(3)]
  # One compiled forward over a fixed 150-slot buffer: the model is causal, so the zeros after
  # the tokens so far change nothing at the last of them.
  forward = jax.jit(lambda tokens: run.model(tokens)[0])
  exact, digits = [], []
  for prompt, answer in trials:
    sequence = prompt.tolist()
    for _ in range(passkey.DIGITS):
      buffer = np.zeros((1, 150), np.int32)
      buffer[0, :len(sequence)] = sequence
      logits = forward(jnp.asarray(buffer))
      sequence.append(int(np.asarray(logits)[0, len(sequence) - 1].argmax()))
    decoded = tok.decode(sequence[-passkey.DIGITS:])
    exact.append(decoded == answer)
    digits.append(sum(a == b for a, b in zip(decoded, answer)) / passkey.DIGITS)
  assert key["accuracy_generated"] == np.mean(exact)
  np.testing.assert_allclose(key["digit_accuracy_generated"], np.mean(digits))


@pytest.mark.parametrize("attn", attention.names_decoding())
def test_passkey_by_generation_runs_for_every_family(attn):
  """Greedy generation of the digits through the family's decode state gives the digits that the
  reference decoder (one plain forward pass per token) gives, and a score in [0, 1]."""
  from arch_zoo import generate
  from tests.helpers import build_lm, lm_config
  model = build_lm(lm_config(attn))
  filler = np.frombuffer(b"The sea was calm and the sky grey. " * 20, np.uint8).astype(np.int32)

  def encode(text):
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)

  def decode(ids):
    return bytes(int(i) % 256 for i in ids).decode("latin-1")

  def run(decoder):
    return lambda prompts: np.stack(generate.generate(
        model, list(prompts), passkey.DIGITS, temperature=0, decoder=decoder))

  def next_token(tokens, index):
    logits, _ = model(jnp.asarray(tokens))
    return np.asarray(jnp.argmax(logits[:, index], -1))

  args = (next_token, filler, encode, decode, [112], [0.5], 2)
  cached = passkey.evaluate(*args, generate=run("cached"))
  reference = passkey.evaluate(*args, generate=run("reference"))
  assert cached == reference
  assert 0.0 <= cached["accuracy_generated"] <= cached["digit_accuracy_generated"] <= 1.0
