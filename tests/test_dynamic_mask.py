"""Dynamic Mask Attention: the oracles of spec section 5.7 against an independent naive reference,
the sparse kernels against the dense one (outputs and gradients), and training with resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train
from arch_zoo import attention
from arch_zoo.attention import dynamic_mask as dm
from arch_zoo.attention.ops import dynamic_mask as dmk
from arch_zoo.attention.ops import softmax
from arch_zoo.attention.base import Context
from configs import lm
from tests.helpers import train_losses

TOL = dict(atol=1e-5, rtol=1e-5)
# Jitted: op-by-op dispatch of the chunk loop is what makes eager tests slow on CPU.
dma = jax.jit(dmk.apply,
              static_argnames=("causal", "keep_window", "impl", "tie_break", "chunk_size"))


def naive_dma(q, k, v, bias, score, keep_window, causal, tie_break="recent"):
  """The definition, one query at a time in float64: sort the allowed keys by (score, position),
  keep the first w when the key length exceeds w, softmax over the kept logits plus bias."""
  q, k, v, bias, score = (np.asarray(a, np.float64) for a in (q, k, v, bias, score))
  b, t, h, d = q.shape
  groups = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      g = hi // groups
      for ti in range(t):
        allowed = [j for j in range(t) if j <= ti or not causal]
        if t > keep_window:
          tie = (lambda j: j) if tie_break == "recent" else (lambda j: -j)
          allowed = sorted(allowed, key=lambda j: (score[bi, j, g], tie(j)),
                           reverse=True)[:keep_window]
        logits = np.full(t, -np.inf)
        for j in allowed:
          logits[j] = q[bi, ti, hi] @ k[bi, j, g] / np.sqrt(d) + bias[bi, j, g]
        p = np.exp(logits - logits.max())
        out[bi, ti, hi] = p / p.sum() @ v[bi, :, g]
  return out


def inputs(b=2, t=37, h=4, g=2, d=8, seed=0, ties=False):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k = jax.random.normal(keys[1], (b, t, g, d))
  v = jax.random.normal(keys[2], (b, t, g, d))
  score = jax.random.normal(keys[3], (b, t, g))
  if ties:  # few distinct values: many ties, decided by position
    score = jnp.round(score)
  return q, k, v, jax.random.normal(keys[4], (b, t, g)), score


# --------------------------------------------------------------------------- kernels vs definition

@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tie_break", ["recent", "earliest"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_kernels_match_naive_definition(impl, causal, tie_break, ties, chunk_size):
  # T = 37 is not a multiple of the 16-query chunk, and fits one chunk of 64 (nothing carried);
  # w = 8 < T, so the mask is active.
  q, k, v, bias, score = inputs(ties=ties)
  out = dma(q, k, v, bias, score, causal=causal, keep_window=8, impl=impl,
                                  tie_break=tie_break, chunk_size=chunk_size)
  np.testing.assert_allclose(out, naive_dma(q, k, v, bias, score, 8, causal, tie_break), **TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_dense_limit_is_attention_plus_key_bias(causal):
  """w >= S: every allowed key is kept (oracle 1): all impls equal the naive dense+bias form."""
  q, k, v, bias, score = inputs(t=12)
  expected = naive_dma(q, k, v, bias, score, 12, causal)
  for impl in ("auto", "reference", "xla"):  # those that run on the CPU
    out = dma(q, k, v, bias, score, causal=causal, keep_window=12,
                                    impl=impl, chunk_size=5)
    np.testing.assert_allclose(out, expected, **TOL, err_msg=impl)


def test_tied_scores_keep_a_sliding_window_of_recent_keys():
  """At A = 0 every score ties; with tie_break=recent each query keeps its w latest keys."""
  q, k, v, bias, _ = inputs(t=40)
  window = jnp.arange(40)[None, :] > jnp.arange(40)[:, None] - 6
  expected = jax.jit(lambda q, k, v, bias: softmax.apply(
      q, k, v, causal=True, impl="xla", mask=window[None, None], bias=dmk.group_bias(bias, 4)))(
          q, k, v, bias)
  for impl in ("reference", "xla"):
    out = dma(q, k, v, bias, jnp.zeros_like(bias), causal=True,
                                    keep_window=6, impl=impl, chunk_size=16)
    np.testing.assert_allclose(out, expected, **TOL, err_msg=impl)


def test_fold_key_bias_equals_bias_input():
  """The cuDNN route's algebra, checked on CPU with the reference kernel: output and gradients."""
  q, k, v, bias, _ = inputs(t=9)

  def folded(q, k, v, bias):
    q2, k2, v2 = dmk.fold_key_bias(q, k, v, bias)
    return softmax.apply(q2, k2, v2, causal=True, impl="xla", scale=8 ** -0.5)[..., :8]

  def direct(q, k, v, bias):
    return softmax.apply(q, k, v, causal=True, impl="xla", bias=dmk.group_bias(bias, 4))

  np.testing.assert_allclose(jax.jit(folded)(q, k, v, bias), jax.jit(direct)(q, k, v, bias), **TOL)
  grads = lambda f: jax.jit(jax.grad(  # noqa: E731
      lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  for a, b in zip(grads(folded), grads(direct)):
    np.testing.assert_allclose(a, b, **TOL)


# --------------------------------------------------------------------------- mask invariants

@pytest.mark.parametrize("causal", [True, False])
def test_mask_keeps_exactly_the_w_best_allowed_keys(causal):
  _, _, _, _, score = inputs(t=30)
  w = 7
  mask = np.asarray(jax.jit(dmk.selection_mask, static_argnums=1, static_argnames="causal")(
      score, w, causal=causal))  # [B, G, T, S]
  score_bgs = np.asarray(score).transpose(0, 2, 1)
  allowed = np.tril(np.ones((30, 30), bool)) if causal else np.ones((30, 30), bool)
  for b in range(2):
    for g in range(2):
      for i in range(30):
        row, ok = mask[b, g, i], allowed[i]
        assert row.sum() == min(w, ok.sum())
        assert not (row & ~ok).any()
        if (ok & ~row).any():  # every kept key beats every allowed key left out
          assert score_bgs[b, g][row].min() > score_bgs[b, g][ok & ~row].max()
  if not causal:  # oracle 9: one key set for all queries
    assert (mask == mask[:, :, :1]).all()


def test_exp_and_log_scores_select_the_same_mask():
  _, _, _, _, score = inputs(t=30)
  score = 0.5 * score  # exp stays well inside float32 range, as the exp-form bias does
  np.testing.assert_array_equal(dmk.selection_mask(score, 7, causal=True),
                                dmk.selection_mask(jnp.exp(score), 7, causal=True))


def test_mask_of_query_i_depends_only_on_keys_up_to_i():
  _, _, _, _, score = inputs(t=30)
  changed = score.at[:, 15:].set(10.0 + score[:, 15:])  # later keys now beat every earlier one
  a = dmk.selection_mask(score, 5, causal=True)
  b = dmk.selection_mask(changed, 5, causal=True)
  np.testing.assert_array_equal(a[:, :, :15], b[:, :, :15])
  assert not np.array_equal(a[:, :, 15:], b[:, :, 15:])


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_per_head_constant_shift_of_log_bias_changes_nothing(impl):
  """Oracle 5: adding c_g to the score and log-form bias of group g keeps mask and output."""
  q, k, v, bias, score = inputs()
  shift = jnp.array([3.0, -2.0])
  run = lambda bias, score: dma(  # noqa: E731
      q, k, v, bias, score, causal=True, keep_window=8, impl=impl, chunk_size=16)
  np.testing.assert_allclose(run(bias, score), run(bias + shift, score + shift), **TOL)


def test_grouped_heads_equal_repeated_keys_values_and_scores():
  """Oracle 6: a group's query heads share its mask and bias."""
  q, k, v, bias, score = inputs()
  rep = lambda x: jnp.repeat(x, 2, axis=2)  # noqa: E731
  for impl in ("reference", "xla"):
    grouped = dma(q, k, v, bias, score, causal=True, keep_window=8,
                                        impl=impl, chunk_size=16)
    repeated = dma(q, rep(k), rep(v), rep(bias), rep(score), causal=True,
                                         keep_window=8, impl=impl, chunk_size=16)
    np.testing.assert_allclose(grouped, repeated, **TOL)


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_sparse_gradients_match_reference(causal, chunk_size):
  q, k, v, bias, score = inputs()
  cot = jax.random.normal(jax.random.key(9), q.shape)

  def loss(impl):
    def f(q, k, v, bias):
      return jnp.sum(cot * dma(q, k, v, bias, score, causal=causal, keep_window=8,
                               impl=impl, chunk_size=chunk_size))
    return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(q, k, v, bias)

  sparse = loss("xla")
  for name, a, b in zip(["q", "k", "v", "bias"], sparse, loss("reference")):
    np.testing.assert_allclose(a, b, **TOL, err_msg=f"d{name}")
  assert np.abs(sparse[3]).sum() > 0


def test_bias_gradient_is_ds_summed_over_group_heads_and_queries():
  """Oracle 8, by hand: dL/dbias[g, j] = sum over the group's heads and all queries of
  dS = P * (dP - rowsum(dO * O)), computed in numpy from the reference mask."""
  q, k, v, bias, score = inputs(b=1, t=20)
  w, d = 6, 8
  cot = np.asarray(jax.random.normal(jax.random.key(3), q.shape), np.float64)
  grad = jax.jit(jax.grad(lambda bias: jnp.sum(cot * dma(
      q, k, v, bias, score, causal=True, keep_window=w, impl="reference"))))(bias)
  mask = np.repeat(np.asarray(dmk.selection_mask(score, w, causal=True)), 2, axis=1)[0]  # [H,T,S]
  qn, kn, vn = (np.asarray(x, np.float64)[0] for x in (q, jnp.repeat(k, 2, 2),
                                                       jnp.repeat(v, 2, 2)))
  bn = np.repeat(np.asarray(bias, np.float64)[0].T, 2, axis=0)  # [H, S]
  logits = np.einsum("thd,shd->hts", qn, kn) / np.sqrt(d) + bn[:, None, :]
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("hts,shd->thd", p, vn)
  d_p = np.einsum("thd,shd->hts", cot[0], vn)
  d_s = p * (d_p - np.einsum("thd,thd->ht", cot[0], o)[..., None])
  expected = d_s.sum(axis=1).reshape(2, 2, 20).sum(axis=1).T  # heads of a group, queries
  np.testing.assert_allclose(grad[0], expected, atol=1e-5, rtol=1e-4)


def build_dma(seed=0, **options):
  return attention.build("dynamic_mask", rngs=nnx.Rngs(seed), d_model=32, num_heads=4,
                         num_kv_heads=2, **options)


def jitted(module):
  """``module(x, ctx)[0]`` as one compiled function."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda x, ctx: nnx.merge(graphdef, state)(x, ctx)[0])


def test_gradients_reach_dt_and_a():
  x = jax.random.normal(jax.random.key(1), (2, 24, 32))
  ctx = Context.for_inputs(2, 24)

  def grads(attn):
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)

    def loss(params):
      y, _ = nnx.merge(graphdef, params, rest)(x, ctx)
      return jnp.sum(jnp.sin(y))

    return jax.jit(jax.grad(loss))(params)

  for form in dm.BIAS_FORMS:
    sparse = grads(build_dma(keep_window_size=6, a_init=0.5, bias_form=form, impl="xla",
                             chunk_size=8))
    assert np.abs(sparse["A"][...]).min() > 0
    assert np.abs(sparse["dt_proj"]["kernel"][...]).min() > 0
    if form == "exp":  # the paper's form: every parameter gradient equals the reference's
      dense = grads(build_dma(keep_window_size=6, a_init=0.5, bias_form=form, impl="reference"))
      for a, b in zip(jax.tree.leaves(sparse), jax.tree.leaves(dense)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  # HF's init A = 0: A learns at once, W_dt only after A moves (spec 5.4).
  at_zero = grads(build_dma(keep_window_size=6))
  assert np.abs(at_zero["A"][...]).min() > 0
  np.testing.assert_array_equal(at_zero["dt_proj"]["kernel"][...], 0.0)


# --------------------------------------------------------------------------- the module

@pytest.mark.parametrize("bias_form", dm.BIAS_FORMS)
@pytest.mark.parametrize("causal", [True, False])
def test_wide_window_and_zero_bias_equal_mha(bias_form, causal):
  """keep_window >= T and A = 0 (log form: bias 0; exp form: bias 1, softmax-invariant) gives
  exactly mha with the same weights."""
  dynamic = build_dma(bias_form=bias_form, keep_window_size=64)
  mha = attention.build("mha", rngs=nnx.Rngs(1), d_model=32, num_heads=4, num_kv_heads=2,
                        qk_norm=True)
  for name in ("query", "key", "value"):
    getattr(mha.qkv, name).kernel[...] = getattr(dynamic.qkv, name).kernel[...]
  mha.out.kernel[...] = dynamic.out.kernel[...]
  x = jax.random.normal(jax.random.key(2), (2, 16, 32))
  ctx = Context.for_inputs(2, 16, causal=causal)
  np.testing.assert_allclose(jitted(dynamic)(x, ctx), jitted(mha)(x, ctx), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_module_is_strictly_causal_with_an_active_mask(impl):
  attn = jitted(build_dma(keep_window_size=4, a_init=1.0, impl=impl, chunk_size=8))
  x = jax.random.normal(jax.random.key(4), (2, 24, 32))
  ctx = Context.for_inputs(2, 24)
  t = 11
  y = attn(x, ctx)
  y2 = attn(x.at[:, t:].add(1.0), ctx)
  np.testing.assert_array_equal(y[:, :t], y2[:, :t])
  assert not np.allclose(y[:, t:], y2[:, t:])
  grad = jax.jit(jax.grad(lambda x: attn(x, ctx)[:, :t].sum()))(x)
  np.testing.assert_array_equal(grad[:, t:], 0.0)


def test_segments_fall_back_to_the_reference_and_sparse_refuses_them():
  attn = jitted(build_dma(keep_window_size=3, a_init=1.0))
  x = jax.random.normal(jax.random.key(6), (1, 10, 32))
  segments = jnp.array([[0] * 6 + [1] * 4], jnp.int32)
  positions = jnp.array([list(range(6)) + list(range(4))], jnp.int32)
  packed = attn(x, Context(positions=positions, segment_ids=segments))
  first = attn(x[:, :6], Context.for_inputs(1, 6))
  second = attn(x[:, 6:], Context.for_inputs(1, 4))
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), **TOL)
  sparse = jitted(build_dma(keep_window_size=3, impl="xla"))
  with pytest.raises(ValueError, match="does not support segment_ids"):
    sparse(x, Context(positions=positions, segment_ids=segments))


def test_bad_options_list_the_choices():
  with pytest.raises(ValueError, match="Valid: exp, log"):
    build_dma(bias_form="linear")
  with pytest.raises(ValueError, match="Valid: auto, reference, xla, cudnn"):
    build_dma(impl="flash")
  with pytest.raises(ValueError, match="keep_window_size must be a positive"):
    build_dma(keep_window_size=0)


def test_flops_follow_the_kept_keys():
  dims = attention.Dims(d_model=64, num_heads=4)
  opts = attention.make_options("dynamic_mask", keep_window_size=128)
  flops = dm.DynamicMaskAttention.flops_per_token
  mha = attention.family("mha").module.flops_per_token
  extra = 2 * 4 * 16 * 4  # the dt projection
  mha_opts = attention.make_options("mha")
  assert flops(dims, opts, 128, True) == mha(dims, mha_opts, 128, True) + extra
  # Beyond w the attention term stops growing with T: near 4 * w * H * D per token.
  long = flops(dims, opts, 1 << 20, True) - mha(dims, mha_opts, 0, True) - extra
  assert long == pytest.approx(4 * 128 * 64, rel=1e-3)


def test_sparse_path_holds_no_seq_by_seq_buffer():
  """Acceptance 3 on CPU: compiled fwd+bwd memory of the sparse kernel stays far below one
  [H, T, T] float32 tensor, which the dense reference needs several of."""
  b, t, h, g, d = 1, 2048, 2, 1, 16
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, t, g, d), jnp.float32)
  s = jax.ShapeDtypeStruct((b, t, g), jnp.float32)

  def temp_bytes(impl):
    def loss(q, k, v, bias, score):
      return dma(q, k, v, bias, score, causal=True, keep_window=128,
                                       impl=impl, chunk_size=128).sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, kv, kv, s, s).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  one_square = h * t * t * 4
  assert temp_bytes("xla") < one_square / 4
  assert temp_bytes("reference") > one_square


# --------------------------------------------------------------------------- training

def train_config(data_dir, **train_overrides):
  config = lm.get_config("attn=dynamic_mask,size=test")
  config.model.attention.keep_window_size = 8  # < seq_len 32: the sparse kernel trains
  config.model.attention.chunk_size = 16
  config.data.data_dir = data_dir
  config.train.update(progress=False, **train_overrides)
  return config


def test_trains_through_train_py_and_resumes_exactly(austen_data_dir, tmp_path):
  full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
  full = train.train_and_evaluate(train_config(austen_data_dir), full_dir)
  assert train.train_and_evaluate(train_config(austen_data_dir, stop_at_step=10),
                                  split_dir) == {"step": 10}
  resumed = train.train_and_evaluate(train_config(austen_data_dir), split_dir)
  losses = train_losses(full_dir)
  assert losses == train_losses(split_dir)  # bitwise, every logged step
  assert resumed["loss"] == full["loss"]
  assert losses[20] < losses[5]


@pytest.mark.gpu
@pytest.mark.parametrize("t", [256, 512])  # dense limit (cuDNN, folded bias) and sparse kernel
# auto's kernel; XLA's chunks of 128 queries, and one chunk of them all (nothing carried)
@pytest.mark.parametrize("impl,chunk_size", [("auto", 128), ("xla", 128), ("xla", 1024)])
def test_gpu_paths_match_the_float32_reference_in_bf16(t, impl, chunk_size):
  q, k, v, bias, score = inputs(b=2, t=t, h=8, g=4, d=64)
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  ref = dma(*(x.astype(jnp.float32) for x in bf16), bias, score, causal=True, keep_window=256,
            impl="reference")
  out = dma(*bf16, bias, score, causal=True, keep_window=256, impl=impl, chunk_size=chunk_size)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2)
