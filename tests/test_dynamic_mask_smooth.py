"""``block_smooth``: flash-sparse-attention's majority vote of DMA's mask within key blocks, an
option of ``dynamic_mask`` that changes the selected set (``ops.dynamic_mask.smooth_blocks``).

The materialised mask against a loop over queries written from the rule (sort the allowed keys,
keep the best ``w``, vote per block); the Pallas kernels in the interpreter against the float32
reference on that mask, outputs and every gradient (causal and bidirectional, lengths that are
not multiples of the tiles, GQA 1, 2 and 4, blocks shorter than, equal to and longer than the
query tile, packed rows); the list kernel on the blocks' intervals; the dense limit; strict
causality of the layer; refusals. Decoding equals the forward in ``tests/test_decode.py`` (case
``dynamic_mask_block_smooth``), the analysis weights equal the kernel in ``tests/test_heads.py``;
the ``gpu`` test compiles the kernels.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo.attention.base import Context
from arch_zoo.attention.ops import dynamic_mask as dmk
from arch_zoo.attention.ops import dynamic_mask_pallas as dmp
from arch_zoo.attention.ops import softmax
from tests.helpers import build_attention, build_lm, lm_config, random_tokens
from tests.test_dynamic_mask_pallas import assert_close, triton_module_for_h100, value_and_grads

INTERPRET = dmp.KernelConfig(block_q=32, block_k=16, interpret=True)


def inputs(b=1, t=70, h=4, g=2, d=16, seed=0):
  """Random q, k, v and bias; scores that drift along the sequence (a random walk), so that a
  query's best keys gather in runs and blocks win the vote as well as lose it."""
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k = jax.random.normal(keys[1], (b, t, g, d))
  v = jax.random.normal(keys[2], (b, t, g, d))
  score = jnp.cumsum(jax.random.normal(keys[3], (b, t, g)), axis=1)
  return q, k, v, jax.random.normal(keys[4], (b, t, g)), score


def oracle_mask(score, keep_window, block, causal, segment_ids=None):
  """The rule, one query at a time in numpy: the ``w`` best allowed keys (higher score first,
  ties to the later key), then, for a query that sees more than ``w`` keys, the allowed keys of
  each block (``block`` keys from the row's position 0, whatever the documents) where it keeps
  more than ``block / 2``. Allowed: causal, and the query's document (``segment_ids``)."""
  score = np.asarray(score, np.float64)
  b, t, g = score.shape
  docs = np.zeros((b, t), int) if segment_ids is None else np.asarray(segment_ids)
  mask = np.zeros((b, g, t, t), bool)
  for bi in range(b):
    for gi in range(g):
      for i in range(t):
        allowed = [j for j in range(i + 1 if causal else t) if docs[bi, j] == docs[bi, i]]
        best = sorted(allowed, key=lambda j: (-score[bi, j, gi], -j))[:keep_window]
        kept = np.zeros(t, bool)
        kept[best] = True
        if len(allowed) > keep_window:
          votes = np.zeros(t, bool)
          for first in range(0, t, block):
            if 2 * kept[first:first + block].sum() > block:
              votes[first:first + block] = True
          kept = votes & np.isin(np.arange(t), allowed)
        mask[bi, gi, i] = kept
  return mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("keep_window,block", [(6, 4), (6, 3), (10, 8), (3, 2)])
def test_the_mask_is_the_rule_written_as_a_loop(causal, keep_window, block):
  _, _, _, _, score = inputs(b=2, t=29, g=2, seed=block)
  got = dmk.selection_mask(score, keep_window, causal=causal, block_smooth=block)
  want = oracle_mask(score, keep_window, block, causal)
  np.testing.assert_array_equal(np.asarray(got), want)
  exact = oracle_mask(score, keep_window, 1, causal)  # one-key blocks: the exact mask
  np.testing.assert_array_equal(np.asarray(dmk.selection_mask(score, keep_window, causal=causal)),
                                exact)
  assert want.any() and (want != exact).any()  # the vote keeps keys and changes the mask


# Packed rows of 70: documents shorter and longer than w = 24, starting inside blocks of 16.
PACKED = np.array([[0] * 9 + [1] * 30 + [2] * 31, [3] * 45 + [4] * 25])


@pytest.mark.parametrize("keep_window,block", [(6, 4), (10, 8), (24, 16)])
def test_the_mask_of_packed_rows_is_the_rule_written_as_a_loop(keep_window, block):
  """Blocks follow the row, not the documents: a block cut by a document boundary votes, for
  each query, on the part in the query's document, against the full block length."""
  _, _, _, _, score = inputs(b=2, t=70, g=2, seed=block)
  segment_ids = jnp.asarray(PACKED, jnp.int32)
  got = dmk.selection_mask(score, keep_window, causal=True, segment_ids=segment_ids,
                           block_smooth=block)
  want = oracle_mask(score, keep_window, block, True, PACKED)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert want.any() and (want != oracle_mask(score, keep_window, 1, True, PACKED)).any()


def test_a_document_starting_late_in_a_block_is_followed_by_the_queries_keeping_it_all():
  """The block [16, 32) holds 9 keys of document 0 and 7 of document 1 (too few to win a vote);
  document 1's query 32 sees exactly w = 8 keys and so keeps them all without voting, 25 to 31
  among them, while the block's own best ranks belong to document 1: its vote rank is one of
  document 0's. Query 32 opens a query tile of 32, so the kernels list the block there only if
  its candidates reach that query (a threshold at the query that sees w keys would cut them)."""
  q, k, v, bias, _ = inputs(b=1, t=64, h=2, g=1, seed=5)
  segment_ids = jnp.asarray([[0] * 25 + [1] * 39], jnp.int32)
  walk = jnp.cumsum(jax.random.normal(jax.random.key(6), (1, 64, 1)), axis=1)
  score = jnp.where(segment_ids[..., None] == 0, walk - 100.0, walk + 100.0)
  cotangent = jax.random.normal(jax.random.key(7), q.shape)
  kernel, reference = kernel_and_reference(q, k, v, bias, score, cotangent, segment_ids,
                                           causal=True, keep_window=8, block=16)
  mask = dmk.selection_mask(score, 8, causal=True, segment_ids=segment_ids, block_smooth=16)
  assert np.asarray(mask)[0, 0, 32, 25:32].all()  # the case this test is about
  for name, got, want in zip(("out", "dq", "dk", "dv", "dbias"), kernel, reference):
    assert_close(got, want)


def test_a_query_that_keeps_nothing_outputs_zero():
  q, k, v, bias, score = inputs(t=40, g=1, h=2)
  mask = dmk.selection_mask(score, 4, causal=True, block_smooth=8)
  empty = ~np.asarray(mask).any(-1)[0, 0]
  assert empty.any() and not empty.all()
  out = dmk.reference(q, k, v, bias, score, causal=True, keep_window=4, block_smooth=8)
  assert np.all(np.asarray(out)[0, empty] == 0)
  assert np.all(np.abs(np.asarray(out)[0, ~empty]).sum(-1) > 0)


@functools.partial(jax.jit, static_argnames=("causal", "keep_window", "block", "config"))
def kernel_and_reference(q, k, v, bias, score, cotangent, segment_ids=None, *, causal,
                         keep_window, block, config=INTERPRET):
  options = dict(causal=causal, keep_window=keep_window, block_smooth=block,
                 segment_ids=segment_ids)
  kernel = value_and_grads(lambda q, k, v, b: dmp.dynamic_mask_attention(
      q, k, v, b, score, config=config, **options), q, k, v, bias, cotangent)
  reference = value_and_grads(lambda q, k, v, b: dmk.reference(q, k, v, b, score, **options),
                              q, k, v, bias, cotangent)
  return kernel, reference


CASES = [  # (t, heads, kv_heads, keep_window, causal, block)
    (70, 4, 2, 24, True, 16),  # a padded tail; blocks shorter than the query tile
    (70, 4, 4, 24, True, 32),  # GQA 1; blocks as long as the query tile
    (70, 4, 1, 24, True, 64),  # GQA 4; blocks longer than the query tile (they straddle it)
    (100, 2, 1, 40, True, 16),
    (70, 4, 2, 24, False, 16),  # bidirectional: every query keeps the same blocks
    (45, 4, 1, 20, False, 32),
]


@pytest.mark.parametrize("t,heads,kv_heads,keep_window,causal,block", CASES)
def test_kernel_equals_the_reference_output_and_gradients(t, heads, kv_heads, keep_window, causal,
                                                          block):
  q, k, v, bias, score = inputs(b=2, t=t, h=heads, g=kv_heads, seed=t + block)
  cotangent = jax.random.normal(jax.random.key(7), q.shape)
  mask = dmk.selection_mask(score, keep_window, causal=causal, block_smooth=block)
  assert 0 < float(jnp.mean(mask)) < 0.5  # blocks are kept and dropped
  kernel, reference = kernel_and_reference(q, k, v, bias, score, cotangent, causal=causal,
                                           keep_window=keep_window, block=block)
  for name, got, want in zip(("out", "dq", "dk", "dv", "dbias"), kernel, reference):
    assert got.shape == want.shape, name
    assert_close(got, want)


@pytest.mark.parametrize("heads,kv_heads,block", [(4, 2, 16), (4, 1, 32), (4, 4, 64)])
def test_kernel_on_packed_rows_equals_the_reference_output_and_gradients(heads, kv_heads, block):
  """Packed documents (boundaries inside blocks, documents shorter and longer than w, a padded
  tail): each query votes on its own document's part of a block, and a part too small to win
  is still followed by the queries that keep it without voting."""
  q, k, v, bias, score = inputs(b=2, t=70, h=heads, g=kv_heads, seed=block)
  segment_ids = jnp.asarray(PACKED, jnp.int32)
  cotangent = jax.random.normal(jax.random.key(7), q.shape)
  kernel, reference = kernel_and_reference(q, k, v, bias, score, cotangent, segment_ids,
                                           causal=True, keep_window=24, block=block)
  for name, got, want in zip(("out", "dq", "dk", "dv", "dbias"), kernel, reference):
    assert got.shape == want.shape, name
    assert_close(got, want)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("block", [16, 64])
def test_the_list_kernel_holds_the_blocks_the_reference_lists_hold(block, packed):
  """The GPU's list kernel (interpreted) on the blocks' intervals: with blocks longer than the
  query tile it scans every key, since a block may start before the queries it meets. The
  lists fit their capacity, packed rows too."""
  cfg = dmp.smoothing_config(INTERPRET, block)
  _, _, _, _, score = inputs(b=2, t=150, g=2, seed=block)
  segment_ids = None
  if packed:  # documents of 20, 70, 60 and 7, 93, 50 (w = 40)
    segment_ids = jnp.asarray([[0] * 20 + [1] * 70 + [2] * 60, [3] * 7 + [4] * 93 + [5] * 50])
  plan = dmp.selection_plan(score, causal=True, keep_window=40, config=cfg, block_smooth=block,
                            segment_ids=segment_ids)
  capacity = plan["query_lists"].shape[-1] - 1
  got = dmp.query_lists_pallas(plan["start"], plan["end"], block_q=cfg.block_q,
                               capacity=capacity, causal=block <= cfg.block_q, interpret=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(plan["query_lists"]))
  counts = np.asarray(plan["query_lists"][..., 0])
  assert counts.max() <= capacity and np.all(counts % block == 0)  # whole blocks


def test_the_work_is_the_kept_blocks():
  """On i.i.d. scores almost no block wins (a query keeps a scattered w of its keys): the work
  is the queries that keep everything (the first w) and the blocks that meet each query tile,
  far below the exact kernels'. On scores that drift whole blocks win, and the work stays."""
  cfg = dmp.KernelConfig(block_q=32, block_k=16, interpret=True)
  walk = jnp.cumsum(jax.random.normal(jax.random.key(0), (1, 1024, 1)), axis=1)
  iid = jax.random.normal(jax.random.key(1), (1, 1024, 1))
  work = {name: dmp.work_fraction(score, causal=True, keep_window=128, config=cfg,
                                  block_smooth=32)["forward"]
          for name, score in (("walk", walk), ("iid", iid))}
  exact = dmp.work_fraction(iid, causal=True, keep_window=128, config=cfg)["forward"]
  assert float(work["iid"]) < float(work["walk"]) < 1
  assert float(work["iid"]) < 0.5 * float(exact)


def test_at_the_dense_limit_nothing_changes():
  """With the key length at most ``w`` there is no mask to vote on (as flash-sparse-attention
  builds none): the layer equals the exact one."""
  x = jax.random.normal(jax.random.key(0), (2, 16, 32))
  ctx = Context.for_inputs(2, 16)
  outs = []
  for block in (0, 4):
    attn, _ = build_attention("dynamic_mask", d_model=32, num_heads=4, keep_window_size=16,
                              a_init=0.5, block_smooth=block)
    outs.append(np.asarray(attn(x, ctx)[0]))
  np.testing.assert_array_equal(*outs)
  _, _, _, _, score = inputs(t=16)
  assert dmk.selection_mask(score, 16, causal=True, block_smooth=4) is None


def test_the_layer_is_strictly_causal():
  """Outputs before t do not move when tokens from t on change: a query's vote counts its own
  prefix only, and every block votes against its full length, a cut last block too."""
  config = lm_config("dynamic_mask", keep_window_size=6, block_smooth=4, a_init=1.0)
  model = build_lm(config)
  length, t = 30, 17
  tokens = random_tokens(2, length, config.model.vocab_size)
  perturbed = tokens.at[:, t:].set((tokens[:, t:] + 1) % config.model.vocab_size)
  before, _ = nnx.clone(model)(tokens)
  after, _ = nnx.clone(model)(perturbed)
  np.testing.assert_array_equal(np.asarray(before[:, :t]), np.asarray(after[:, :t]))
  shorter, _ = nnx.clone(model)(tokens[:, :t + 2])  # the last block cut at another place
  np.testing.assert_allclose(np.asarray(shorter[:, :t]), np.asarray(before[:, :t]), rtol=1e-5,
                             atol=1e-5)


def test_refusals_say_why():
  q, k, v, bias, score = inputs(t=40)
  with pytest.raises(ValueError, match="block_smooth"):
    dmk.apply(q, k, v, bias, score, causal=True, keep_window=8, impl="xla", block_smooth=4)
  assert dmk.supports("xla", q, k, causal=True, keep_window=64, block_smooth=4) is None
  assert "power of two" in dmp.unsupported_reason(q, k, interpret=True, block_smooth=24)
  segment_ids = jnp.zeros((1, 40), jnp.int32)
  assert dmp.unsupported_reason(q, k, interpret=True, block_smooth=16,
                                segment_ids=segment_ids) is None  # packed rows, causally
  with pytest.raises(ValueError, match="block_smooth"):
    build_attention("dynamic_mask", d_model=32, num_heads=4, block_smooth=-1)


@pytest.mark.parametrize("block,packed", [(32, False), (64, False), (32, True)])
def test_the_kernels_lower_to_triton_without_a_gpu(monkeypatch, block, packed):
  """The kernels with the vote (contiguous key tiles read at a position loaded from the list)
  and the list kernel lower to Triton IR for an H100, packed rows too."""
  options = dict(block_smooth=block)
  if packed:  # documents of 130 and 170 tokens in the helper's rows of 300
    options["segment_ids"] = jnp.asarray([[0] * 130 + [1] * 170], jnp.int32)
  module = triton_module_for_h100(monkeypatch, **options)
  for kernel in ("dynamic_mask_forward", "dynamic_mask_dq", "dynamic_mask_dkv",
                 "dynamic_mask_query_lists"):
    assert f'name = "{kernel}"' in module, kernel


@pytest.mark.parametrize("block", [0, 16])
def test_the_benchmarks_pass_timer_runs_the_kernels_it_names(block):
  """``bench_dmask.kernel_passes`` (also the pass sweep's timer) calls the private passes
  directly: it must follow their signature, exact and with the vote (a change of it once
  broke the benchmark without breaking a test)."""
  from benchmarks import bench_dmask

  q, k, v, bias, score = inputs(t=64, h=2, g=1)
  cotangent = jax.random.normal(jax.random.key(7), q.shape)
  passes = bench_dmask.kernel_passes(q, k, v, bias, score, cotangent, 24, INTERPRET,
                                     block_smooth=block)
  assert set(passes) == {"forward", "dq", "dkv"} and all(t > 0 for t in passes.values())


@pytest.mark.gpu
@pytest.mark.parametrize("causal,packed", [(True, False), (False, False), (True, True)])
def test_compiled_kernel_in_bf16_is_within_xlas_own_bf16_error(causal, packed):
  """The compiled kernels in bf16 against the float32 reference, outputs and every gradient: at
  most twice the error of XLA's dense bf16 attention under the same mask (plus 1e-3 of the
  largest value), at a length that is not a multiple of the tiles, GQA 2, blocks of 32 and 64,
  packed rows (documents starting inside blocks) too."""
  t, w = 1500, 256
  q, k, v, bias, score = inputs(b=2, t=t, h=8, g=4, d=128, seed=3)
  segment_ids = None
  if packed:  # documents of 700, 500, 300 and 100, 1400 tokens
    segment_ids = jnp.asarray([[0] * 700 + [1] * 500 + [2] * 300, [3] * 100 + [4] * 1400])
  bias = jnp.exp(0.5 * jnp.tanh(bias))
  cotangent = jax.random.normal(jax.random.key(4), q.shape)
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  for block in (32, 64):
    options = dict(causal=causal, keep_window=w, block_smooth=block, segment_ids=segment_ids)
    mask = jnp.repeat(dmk.selection_mask(score, w, causal=causal, segment_ids=segment_ids,
                                         block_smooth=block), 2, axis=1)

    def xla_bf16(q, k, v, b, mask=mask):
      out = softmax.dense(q, k, v, causal=causal, scale=q.shape[-1] ** -0.5,
                          bias=dmk.group_bias(b, q.shape[2]).astype(q.dtype), mask=mask)
      return dmk.without_empty_rows(out, mask)

    expected = jax.jit(lambda *a: value_and_grads(
        lambda q, k, v, b: dmk.reference(q, k, v, b, score, **options), *a))(
            *(x.astype(jnp.float32) for x in bf16), bias, cotangent)
    kernel = jax.jit(lambda *a: value_and_grads(
        lambda q, k, v, b: dmk.apply(q, k, v, b, score, impl="pallas", **options), *a))(
            *bf16, bias, cotangent)
    xla = jax.jit(lambda *a: value_and_grads(xla_bf16, *a))(*bf16, bias, cotangent)
    for name, got, base, want in zip(("out", "dq", "dk", "dv", "dbias"), kernel, xla, expected):
      want = np.asarray(want, np.float64)
      err = np.abs(np.asarray(got, np.float64) - want).max()
      base_err = np.abs(np.asarray(base, np.float64) - want).max()
      assert err <= 2 * base_err + 1e-3 * np.abs(want).max(), (block, name, err, base_err)
