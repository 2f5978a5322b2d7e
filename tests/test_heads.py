"""Head diagnostics: every family's attention weights against its own kernels, and every metric
of arch_zoo.analysis against hand-built heads whose answer is known by construction."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention
from arch_zoo.attention.lightning import LightningAttention
from arch_zoo.attention.masa import SharedDictionaryAttention
from tests.helpers import build_attention

DIMS = dict(d_model=32, num_heads=4)
LENGTH = 24

# (family, options, modes): configurations that exercise each family's own structure: GQA,
# a selection narrower than the sequence, several clusters and local blocks, every decay form.
CASES = [
    ("mha", dict(num_kv_heads=2), (True, False)),
    ("moh", dict(num_shared_heads=1, top_k=2), (True, False)),
    ("masa", dict(shared="qkvo"), (True, False)),
    ("masa", dict(shared="qkv"), (True,)),
    ("dynamic_mask", dict(keep_window_size=6, chunk_size=8, a_init=0.5), (True, False)),
    ("dynamic_mask", dict(keep_window_size=6, block_smooth=4, a_init=0.5), (True, False)),
    ("routing", dict(num_clusters=3, local_window=8), (True, False)),
    ("lightning", dict(), (True, False)),
    ("lightning", dict(bidirectional_form="symmetric_decay", block_size=8), (False,)),
]


class Capture(nnx.Module):
  """Stands in for an output projection and records what it is given."""

  def __init__(self, seen: list):
    self.seen = seen

  def __call__(self, o):
    self.seen.append(o)
    return o


def pre_projection_output(attn, x, ctx, monkeypatch) -> jax.Array:
  """The family's own output before its output projection, ``[B, T, H * Dv]``: its kernels run
  as in training (``impl=auto``), with the projection replaced by a recorder."""
  seen: list = []
  if isinstance(attn, LightningAttention):  # o goes through the norm and gate before `out`
    monkeypatch.setattr(LightningAttention, "_output", lambda self, x, o: seen.append(o))
  elif isinstance(attn, SharedDictionaryAttention) and attn.out is None:
    monkeypatch.setattr(SharedDictionaryAttention, "_output", lambda self, o, w: seen.append(o))
  else:
    attn.out = Capture(seen)
  attn(x, ctx)
  monkeypatch.undo()
  (o,) = seen
  return o.reshape(*o.shape[:2], -1)


@pytest.mark.parametrize("name,options,modes", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}"
                              for c in CASES])
def test_weights_times_values_is_the_output(name, options, modes, monkeypatch):
  attn, shared = build_attention(name, **DIMS, **options)
  x = jax.random.normal(jax.random.key(1), (2, LENGTH, DIMS["d_model"]))
  for causal in modes:
    ctx = attention.Context.for_inputs(2, LENGTH, causal=causal, shared=shared)
    got = attn.attention_weights(x, ctx)
    assert got.weights.shape == (2, DIMS["num_heads"], LENGTH, LENGTH)
    want = pre_projection_output(attn, x, ctx, monkeypatch)
    np.testing.assert_allclose(np.asarray(got.output().reshape(want.shape)), np.asarray(want),
                               atol=1e-5, rtol=1e-5)
    weights = np.asarray(got.weights)
    if got.normalised:
      rows = weights.sum(-1)
      # A query may read nothing: in bidirectional balanced routing a token that no cluster
      # window holds, with dynamic_mask's block_smooth one whose every key block lost the vote.
      may_be_empty = (name == "routing" and not causal) or bool(options.get("block_smooth"))
      empty = may_be_empty & np.isclose(rows, 0.0, atol=1e-6)
      np.testing.assert_allclose(rows[~empty], 1.0, atol=1e-5)
      assert (weights >= 0).all()
    if causal:  # nothing above the diagonal
      assert np.abs(np.triu(weights, k=1)).max() == 0.0
    probs = np.asarray(got.probabilities())
    assert np.all(probs >= 0) and np.all(probs.sum(-1) <= 1 + 1e-5)


def test_packed_sequences_stay_in_their_segment(monkeypatch):
  attn, _ = build_attention("mha", **DIMS)
  x = jax.random.normal(jax.random.key(2), (1, LENGTH, DIMS["d_model"]))
  segments = jnp.asarray([[0] * 10 + [1] * 14])
  ctx = attention.Context.for_inputs(1, LENGTH, segment_ids=segments, causal=True)
  got = attn.attention_weights(x, ctx)
  np.testing.assert_allclose(np.asarray(got.weights[0, :, 10:, :10]), 0.0, atol=0)
  want = pre_projection_output(attn, x, ctx, monkeypatch)
  np.testing.assert_allclose(np.asarray(got.output().reshape(want.shape)), np.asarray(want),
                             atol=1e-5, rtol=1e-5)


def test_moh_weights_carry_its_gates():
  attn, _ = build_attention("moh", **DIMS, num_shared_heads=1, top_k=1)
  x = jax.random.normal(jax.random.key(3), (2, LENGTH, DIMS["d_model"]))
  got = attn.attention_weights(x, attention.Context.for_inputs(2, LENGTH, causal=True))
  gates = np.asarray(got.gates)
  # One shared head always on, one of the three routed heads chosen per token.
  assert (gates[..., 0] > 0).all()
  np.testing.assert_array_equal((gates[..., 1:] > 0).sum(-1), 1)
  np.testing.assert_array_equal(np.asarray(got.extras["routed_mask"]), gates[..., 1:] > 0)


def test_every_family_has_weights_or_says_why():
  for name in attention.names():
    fam = attention.family(name)
    assert fam.weights is True or (isinstance(fam.weights, str) and fam.weights), name
  assert set(attention.names_with_weights()) >= {"mha", "moh", "masa", "dynamic_mask",
                                                  "routing", "lightning"}


def test_plugin_family_shows_its_window(monkeypatch):
  from arch_zoo import plugins
  plugins.load("tests/families/sliding_window.py")  # as test_family_plugin.py loads it
  attn, _ = build_attention("sliding_window", **DIMS, window=5)
  x = jax.random.normal(jax.random.key(4), (1, LENGTH, DIMS["d_model"]))
  ctx = attention.Context.for_inputs(1, LENGTH, causal=True)
  got = attn.attention_weights(x, ctx)
  offset = np.arange(LENGTH)[:, None] - np.arange(LENGTH)[None, :]
  assert np.abs(np.asarray(got.weights)[..., offset >= 5]).max() == 0.0
  want = pre_projection_output(attn, x, ctx, monkeypatch)
  np.testing.assert_allclose(np.asarray(got.output().reshape(want.shape)), np.asarray(want),
                             atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ planted heads
#
# A two-layer, two-head language model whose weights are set by hand (RoPE base 1e6, so that the
# low-frequency pairs barely rotate over a short sequence and carry content, while the
# high-frequency pairs carry position). Residual dimensions: 0..7 the token (one-hot), 8 a
# constant, 16..23 the previous token (written by head (0, 0)).
#
# * head (0, 0), previous token: constant query and key, the key rotated one position ahead, so
#   that q . R_(s - t) k = a^2 sum_i cos((s - t + 1) theta_i) peaks at s = t - 1; its values copy
#   the token into dimensions 16..23.
# * head (0, 1), sink: a constant query against a key that only token 0 (the first token of every
#   test sequence, and nowhere else) has; its values are zero.
# * head (1, 0), induction: query = the current token, key = the previous token of each position
#   (dimensions 16..23): query t finds the position right after the earlier occurrence of its own
#   token. Its values are zero, so its output projection sees nothing.
# * head (1, 1): all zero, so it attends uniformly over the keys it may see.

VOCAB, WIDTH, HEAD_DIM = 8, 64, 32
POSITION_PAIRS = (0, 1, 2, 3)  # high-frequency RoPE pairs: where position lives
CONTENT_DIMS = (12, 13, 14, 15, 28, 29, 30, 31)  # low-frequency pairs (both halves)


def planted_model():
  from tests.helpers import build_lm, lm_config
  config = lm_config("mha", vocab_size=VOCAB, d_model=WIDTH, num_layers=2, num_heads=2,
                     rope_base=1e6, tie_embeddings=True)
  model = build_lm(config)
  theta = 1e6 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
  embedding = np.zeros((VOCAB, WIDTH), np.float32)
  embedding[np.arange(VOCAB), np.arange(VOCAB)] = 1.0
  embedding[:, 8] = 1.0
  model.embed.embedding[...] = jnp.asarray(embedding)
  zeros = lambda var: jnp.zeros_like(var[...])  # noqa: E731
  for block in model.stack.blocks:
    for dense in (block.attn.qkv.query, block.attn.qkv.key, block.attn.qkv.value, block.attn.out,
                  block.mlp.down):
      dense.kernel[...] = zeros(dense.kernel)
  query, key, value, out = (np.zeros((WIDTH, WIDTH), np.float32) for _ in range(4))
  a = 12.0
  for i in POSITION_PAIRS:  # head 0: previous token
    query[8, i] = a
    key[8, i], key[8, i + HEAD_DIM // 2] = a * np.cos(theta[i]), a * np.sin(theta[i])
  query[8, HEAD_DIM + 15] = key[0, HEAD_DIM + 15] = 40.0  # head 1: the first token
  for j in range(VOCAB):
    value[j, j] = 1.0
    out[j, 16 + j] = 4.0
  layer0 = model.stack.blocks[0].attn
  layer0.qkv.query.kernel[...], layer0.qkv.key.kernel[...] = jnp.asarray(query), jnp.asarray(key)
  layer0.qkv.value.kernel[...], layer0.out.kernel[...] = jnp.asarray(value), jnp.asarray(out)
  query, key = np.zeros((WIDTH, WIDTH), np.float32), np.zeros((WIDTH, WIDTH), np.float32)
  for j, dim in enumerate(CONTENT_DIMS):  # layer 1, head 0: induction
    query[j, dim] = key[16 + j, dim] = 30.0
  layer1 = model.stack.blocks[1].attn
  layer1.qkv.query.kernel[...], layer1.qkv.key.kernel[...] = jnp.asarray(query), jnp.asarray(key)
  return model


def repeated_tokens(batch: int, seed: int = 0) -> tuple[np.ndarray, int]:
  """Token 0, then a permutation of tokens 1..7, then the same permutation: ``(tokens, period)``."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch):
    perm = rng.permutation(np.arange(1, VOCAB))
    rows.append(np.concatenate([[0], perm, perm]))
  return np.asarray(rows, np.int32), VOCAB - 1


@pytest.fixture(scope="module")
def planted():
  from arch_zoo import analysis
  return analysis.Analysis.of(planted_model())


def argmax_head(scores: np.ndarray) -> tuple[int, int]:
  return tuple(int(i) for i in np.unravel_index(np.argmax(scores), scores.shape))


def test_planted_previous_token_head_scores_highest(planted):
  from arch_zoo.analysis import metrics
  tokens, _ = repeated_tokens(4)
  scores = planted.per_head(tokens, metrics.previous_token)
  assert argmax_head(scores) == (0, 0), scores
  assert scores[0, 0] > 0.99


def test_planted_induction_circuit_scores_highest(planted):
  from arch_zoo.analysis import metrics
  tokens, period = repeated_tokens(4)
  scores = planted.per_head(tokens, lambda p: metrics.induction(p, period, start=1))
  assert argmax_head(scores) == (1, 0), scores
  assert scores[1, 0] > 0.9


def test_planted_sink_head_has_share_one(planted):
  from arch_zoo.analysis import metrics
  tokens, _ = repeated_tokens(4)
  share = planted.per_head(tokens, metrics.sink_share)
  assert argmax_head(share) == (0, 1)
  np.testing.assert_allclose(share[0, 1], 1.0, atol=1e-5)


def test_uniform_head_entropy_is_log_keys(planted):
  from arch_zoo.analysis import metrics
  tokens, _ = repeated_tokens(4)
  mean, spread = planted.per_head(tokens, metrics.entropy)
  keys = np.arange(1, tokens.shape[1] + 1)  # a causal query t sees t + 1 keys
  np.testing.assert_allclose(mean[1, 1], np.mean(np.log(keys)), rtol=1e-5)
  np.testing.assert_allclose(spread[1, 1], np.std(np.log(keys)), rtol=1e-4)
  maps = planted.attention_maps(tokens)
  rows = np.asarray(metrics.row_entropy(maps[1].weights[:, 1]))
  np.testing.assert_allclose(rows, np.broadcast_to(np.log(keys), rows.shape), rtol=1e-5)


def test_head_with_zero_output_projection_has_ablation_importance_zero(planted):
  from arch_zoo.analysis import ablation
  tokens, _ = repeated_tokens(4)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones(tokens[:, 1:].shape, np.float32)}
  importance = ablation.head_importance(planted, [batch])
  # Head (1, 0) attends sharply but its values, hence what reaches the output projection, are
  # zero; head (1, 1) and head (0, 1) are zero too. Head (0, 0) feeds the logits.
  for layer, head in ((1, 0), (1, 1), (0, 1)):
    assert importance["delta_loss"][layer, head] == 0.0
  assert abs(importance["delta_loss"][0, 0]) > 1e-3


# ------------------------------------------------------------------------------ during training


def test_entropy_logging_leaves_training_unchanged(austen_data_dir, tmp_path):
  import train
  from arch_zoo import metrics as metrics_lib
  from configs import lm

  def run(every: int, workdir: str):
    config = lm.get_config("attn=mha,size=test")
    config.data.data_dir = austen_data_dir
    config.train.update(progress=False, steps=6, log_every=1, eval_every=0, checkpoint_every=0,
                        log_attention_entropy_every=every)
    train.train_and_evaluate(config, workdir)
    return metrics_lib.read_metrics(workdir)

  off = run(0, str(tmp_path / "off"))
  on = run(3, str(tmp_path / "on"))
  train_rows = lambda rows: [{k: v for k, v in r.items() if k.startswith("train/")  # noqa: E731
                              and k != "train/throughput"} for r in rows if "train/loss" in r]
  assert train_rows(off) == train_rows(on) and len(train_rows(off)) == 6
  assert not any(k.startswith("attention_entropy/") for r in off for k in r)
  logged = [r for r in on if any(k.startswith("attention_entropy/") for k in r)]
  assert [r["step"] for r in logged] == [3, 6]
  seq_len = lm.get_config("attn=mha,size=test").data.seq_len
  for row in logged:
    for layer in range(2):
      prefix = f"attention_entropy/l{layer:02d}"
      low, mean = row[f"{prefix}/min"], row[f"{prefix}/mean"]
      assert 0.0 <= low <= mean <= math.log(seq_len)


def test_compare_reads_head_metrics_into_columns():
  from arch_zoo.compare.analysis import normalize_eval_results, task_metrics
  saved = {"results": {"perplexity": {"loss": 1.5},
                       "heads": {"heads_needed_90_fraction": 0.625, "sink_share": 0.01,
                                 "retrieval_heads": 3, "retrieval_heads_per_layer": [0, 1, 2],
                                 "figures": ["heads/entropy.png"]}}}
  evaluated = normalize_eval_results(saved)
  columns = {m.key: m for m in task_metrics("lm", [evaluated])}
  assert columns["heads_needed_90_fraction"].value({}, evaluated) == 0.625
  assert columns["sink_share"].value({}, evaluated) == 0.01
  assert columns["retrieval_heads"].value({}, evaluated) == 3
  assert [columns[f"retrieval_heads_l{i:02d}"].value({}, evaluated) for i in range(3)] == [0, 1, 2]
  assert "streaming_heads" not in columns  # not measured: no column
  assert not any(k.startswith("retrieval") for k in
                 (m.key for m in task_metrics("lm", [normalize_eval_results(
                     {"results": {"perplexity": {"loss": 1.5}}})])))


def test_scanned_model_unstacks_to_the_same_maps():
  from arch_zoo import analysis
  from tests.helpers import build_lm, lm_config, random_tokens
  config = lm_config("mha", scan_layers=True)
  scanned = build_lm(config)
  graphdef, params, rest = nnx.split(scanned, nnx.Param, ...)
  unrolled = analysis.Analysis(*analysis.unstacked(graphdef, params, rest, config))
  tokens = random_tokens(2, 16, 256)
  logits, _ = unrolled.reduce(tokens, lambda layer, w, x: None)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(scanned(tokens)[0]), rtol=1e-5,
                             atol=1e-5)
  stacked_query = np.asarray(params["stack"]["blocks"]["attn"]["qkv"]["query"]["kernel"][...])
  maps = unrolled.attention_maps(tokens)
  assert len(maps) == config.model.num_layers
  for layer in range(config.model.num_layers):
    block = unrolled.model().stack.blocks[layer]
    np.testing.assert_array_equal(np.asarray(block.attn.qkv.query.kernel[...]),
                                  stacked_query[layer])


def test_retrieval_and_streaming_scores_on_hand_built_maps():
  from arch_zoo.analysis import metrics
  t = 32
  tokens = np.arange(t, dtype=np.int32)[None] % 10  # token at position s is s % 10
  needle = np.zeros((1, t), bool)
  needle[0, 8:12] = True
  queries = np.array([28, 29])  # the answer steps; the model outputs tokens 8 % 10 and 9 % 10
  predicted = np.array([[8, 9]])
  p = np.zeros((1, 3, t, t), np.float32)
  p[0, :, np.arange(t), np.arange(t)] = 1.0  # every head reads its own position by default
  p[0, 0, 28, 8], p[0, 0, 28, 28] = 1.0, 0.0  # head 0 copies both answer tokens from the needle
  p[0, 0, 29, 9], p[0, 0, 29, 29] = 1.0, 0.0
  p[0, 1, 28, 18], p[0, 1, 28, 28] = 1.0, 0.0  # head 1 reads an 8 outside the needle
  top = metrics.most_attended(jnp.asarray(p), queries)
  hits = np.asarray(metrics.copy_paste_hits(top, tokens, needle, predicted))
  np.testing.assert_allclose(hits, [1.0, 0.0, 0.0])

  # Streaming: head 0 reads one far token (outside sink + recent) from every query, head 1 the
  # token before each query, head 2 the first token.
  p = np.zeros((1, 3, t, t), np.float32)
  p[0, 0, np.arange(t), np.maximum(np.arange(t) - 10, 2)] = 1.0
  p[0, 1, np.arange(t), np.maximum(np.arange(t) - 1, 0)] = 1.0
  p[0, 2, :, 0] = 1.0
  values = jax.random.normal(jax.random.key(0), (1, t, 3, 8))
  w = attention.AttentionWeights(weights=jnp.asarray(p), values=values)
  deviation, mass = metrics.streaming_deviation(w, sink=2, recent=4)
  np.testing.assert_allclose(np.asarray(deviation), [1.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(mass), [0.0, 1.0, 1.0], atol=1e-6)
