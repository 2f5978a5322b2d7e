"""Lightning / TNL linear attention: the oracles of spec section 3.8.

Every form of the causal operator (block-wise, recurrent, Triton kernel in interpret mode) is
checked against the dense masked definition; the bidirectional forms against dense references;
decay schedules against their published formulas; the module end to end (decoding, errors,
training through train.py with resume).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention, sharding
from arch_zoo.attention import lightning
from arch_zoo.attention.ops import linear as lk, linear_pallas
from arch_zoo.attention.base import Context, DecodeSlots

# The backbone and train.py need ml_collections, which the GPU image lacks: imported inside the
# two tests that use them, so that the GPU machine can collect this file and run its gpu test.

# Per-head decay rates covering no decay, slow, medium and near-local heads.
SLOPES = jnp.array([0.0, 0.01, 0.3, 2.0])

# Jitted once per shape: op-by-op dispatch costs the 2-core CI about 3x more.
reference = jax.jit(lk.causal_reference)
blockwise = jax.jit(lk.causal_blockwise, static_argnames=("block_size", "return_state"))
recurrent = jax.jit(lk.causal_recurrent)
dispatch = jax.jit(lk.apply,
                   static_argnames=("causal", "impl", "block_size", "bidirectional_form"))


def qkv(b=2, t=37, h=4, d=16, e=None, seed=0, scale=0.1):
  """q, k, v ~ N(0, 0.1^2), as the official tests draw them (unnormalised outputs stay small)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  e = e or d
  return (scale * jax.random.normal(keys[0], (b, t, h, d)),
          scale * jax.random.normal(keys[1], (b, t, h, d)),
          scale * jax.random.normal(keys[2], (b, t, h, e)))


def assert_close(actual, expected, tol=1e-5):
  """Largest error relative to the largest reference value (outputs near zero carry no scale)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = np.abs(expected).max()
  assert scale > 0
  error = np.abs(actual - expected).max() / scale
  assert error <= tol, f"relative error {error:.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------
# Causal operator.
# ---------------------------------------------------------------------------------------------


def test_reference_matches_the_definition_loop():
  """The dense reference against a float64 double loop over (t, u): o_t = sum lam^(t-u) q.k v."""
  q, k, v = qkv(b=1, t=9, h=4, d=4)
  qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
  expected = np.zeros_like(vn)
  for h, s in enumerate(np.asarray(SLOPES, np.float64)):
    for t in range(9):
      for u in range(t + 1):
        expected[0, t, h] += math.exp(-s * (t - u)) * (qn[0, t, h] @ kn[0, u, h]) * vn[0, u, h]
  assert_close(reference(q, k, v, SLOPES), expected, 1e-6)


@pytest.mark.parametrize("t,block,d", [(256, 64, 32), (513, 64, 16), (100, 16, 32), (100, 32, 16),
                                       (37, 128, 16)])
def test_blockwise_equals_naive(t, block, d):
  q, k, v = qkv(t=t, d=d)
  assert_close(blockwise(q, k, v, SLOPES, block_size=block),
               reference(q, k, v, SLOPES))


def test_block_size_invariance():
  q, k, v = qkv(t=128, d=32)
  outputs = [blockwise(q, k, v, SLOPES, block_size=c) for c in (16, 32, 64, 128)]
  for out in outputs[1:]:
    assert_close(out, outputs[0])


def test_recurrent_equals_parallel():
  q, k, v = qkv(t=50)
  assert_close(recurrent(q, k, v, SLOPES), reference(q, k, v, SLOPES))


def test_decay_one_is_plain_causal_linear_attention():
  """lam = 1: o_t = q_t^T sum_{u<=t} k_u v_u^T, written as a cumulative sum of outer products."""
  q, k, v = qkv(t=70)
  states = jnp.cumsum(jnp.einsum("bthd,bthe->bthde", k, v), axis=1)
  expected = jnp.einsum("bthd,bthde->bthe", q, states)
  zero = jnp.zeros(4)
  assert_close(blockwise(q, k, v, zero, block_size=16), expected)
  assert_close(reference(q, k, v, zero), expected)


def test_final_state_and_prefill_then_decode():
  """The returned state is sum_u lam^(T-1-u) k_u v_u^T (T not a multiple of the block), and
  decoding token by token from it reproduces the full forward."""
  q, k, v = qkv(t=45)
  prefix = 29
  out, state = blockwise(q[:, :prefix], k[:, :prefix], v[:, :prefix], SLOPES,
                                   block_size=8, return_state=True)
  age = prefix - 1 - jnp.arange(prefix)
  weights = jnp.exp(-SLOPES[None, :] * age[:, None])  # [T, H]
  expected_state = jnp.einsum("th,bthd,bthe->bhde", weights, k[:, :prefix], v[:, :prefix])
  assert_close(state, expected_state)
  decoded = []
  for t in range(prefix, 45):
    o, state = lk.recurrent_step(state, q[:, t], k[:, t], v[:, t], SLOPES)
    decoded.append(o)
  full = reference(q, k, v, SLOPES)
  assert_close(out, full[:, :prefix])
  assert_close(jnp.stack(decoded, axis=1), full[:, prefix:])


def test_blockwise_gradients_equal_naive_gradients():
  q, k, v = qkv(t=75, d=16)
  cotangent = jax.random.normal(jax.random.key(7), v.shape)

  def grads(fn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, SLOPES) * cotangent),
                            (0, 1, 2)))(q, k, v)

  blocks = grads(lambda *a: lk.causal_blockwise(*a, block_size=16))
  naive = grads(lk.causal_reference)
  for got, want in zip(blocks, naive):
    assert_close(got, want)


@pytest.mark.parametrize("fn", [lambda *a: blockwise(*a, block_size=8), recurrent, reference],
                         ids=["blockwise", "recurrent", "reference"])
def test_kernels_are_causal(fn):
  q, k, v = qkv(t=40)
  t = 21
  bumped = [x.at[:, t:].add(1.0) for x in (q, k, v)]
  before, after = fn(q, k, v, SLOPES), fn(*bumped, SLOPES)
  np.testing.assert_array_equal(np.asarray(before[:, :t]), np.asarray(after[:, :t]))
  assert not np.allclose(before[:, t:], after[:, t:])


# ---------------------------------------------------------------------------------------------
# Bidirectional forms.
# ---------------------------------------------------------------------------------------------


def test_no_decay_bidirectional_equals_left_product():
  """Q (K^T V) == (Q K^T) V."""
  q, k, v = qkv(t=33)
  dense = jnp.einsum("bthd,buhd,buhe->bthe", q, k, v)
  assert_close(lk.bidirectional_no_decay(q, k, v), dense)
  for impl in ("xla", "reference"):
    assert_close(dispatch(q, k, v, SLOPES, causal=False, impl=impl), dense)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_symmetric_decay_equals_dense(impl):
  """Causal + anti-causal - diagonal == ((Q K^T) * lam^|t-u|) V, built here from scratch."""
  q, k, v = qkv(t=41)
  distance = jnp.abs(jnp.arange(41)[:, None] - jnp.arange(41)[None, :])
  weights = jnp.exp(-SLOPES[:, None, None] * distance)
  dense = jnp.einsum("bthd,buhd,htu,buhe->bthe", q, k, weights, v)
  out = dispatch(q, k, v, SLOPES, causal=False, impl=impl, block_size=16,
                 bidirectional_form="symmetric_decay")
  assert_close(out, dense)


# ---------------------------------------------------------------------------------------------
# Triton kernel, run by the Pallas interpreter on CPU (and compiled on a GPU when present).
# ---------------------------------------------------------------------------------------------

# 32-token segments, whose start states are summed from two 16-token pieces each.
INTERPRET = linear_pallas.KernelConfig(interpret=True, segment_len=32, block_e=16, state_len=16)


@pytest.mark.parametrize("t,e", [(80, 32), (64, 16)])  # 3 segments with a padded tail; 2 exact
def test_pallas_kernel_matches_naive_in_interpret_mode(t, e):
  q, k, v = qkv(b=1, t=t, h=4, d=16, e=e)
  out = linear_pallas.lightning_attention(q, k, v, SLOPES, chunk_size=16, config=INTERPRET)
  assert out.shape == v.shape
  assert_close(out, reference(q, k, v, SLOPES))


def test_pallas_gradients_match_naive_in_interpret_mode():
  """The custom VJP (causal dQ, anti-causal dK and dV on the same kernel) against autodiff of
  the dense definition."""
  q, k, v = qkv(b=1, t=80, h=4, d=16, e=32)
  cotangent = jax.random.normal(jax.random.key(3), v.shape)

  def grads(fn):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), (0, 1, 2))(q, k, v)

  pallas = grads(lambda q, k, v: linear_pallas.lightning_attention(
      q, k, v, SLOPES, chunk_size=16, config=INTERPRET))
  naive = grads(lambda q, k, v: lk.causal_reference(q, k, v, SLOPES))
  for got, want in zip(pallas, naive):
    assert_close(got, want)


@pytest.mark.parametrize("state_len", [16, 32])  # two pieces per segment, one piece
@pytest.mark.parametrize("reverse", [False, True])
def test_start_states_sum_every_earlier_token_with_its_decay(state_len, reverse):
  """Segment s starts from sum over u before it (after it: reverse) of lam^distance k_u v_u^T,
  the distance counted to the token next to the segment."""
  segment_len, t = 32, 96
  _, k, v = qkv(b=1, t=t, h=4, d=16, e=16)
  cfg = dataclasses.replace(INTERPRET, chunk_size=16, state_len=state_len)
  got = linear_pallas.start_states(k, v, SLOPES, segment_len=segment_len, reverse=reverse,
                                   cfg=cfg)
  assert got.shape == (1, 4, t // segment_len, 16, 16)
  for s in range(t // segment_len):
    start, end = s * segment_len, (s + 1) * segment_len
    u = np.arange(end, t) if reverse else np.arange(start)
    distance = (u - end) if reverse else (start - 1 - u)
    decay = np.exp(-np.asarray(SLOPES)[None, :] * distance[:, None])  # [U, H]
    want = np.einsum("uh,uhd,uhe->hde", decay, np.asarray(k)[0, u], np.asarray(v)[0, u])
    np.testing.assert_allclose(got[0, :, s], want, atol=1e-6)


def test_pallas_runs_per_shard_of_batch_and_heads_under_a_mesh():
  """Under a data x tensor mesh the kernel is shard_mapped (each device: its batch rows, its
  heads and their slopes), and still equals the reference."""
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  q, k, v = qkv(b=4, t=48, h=4, d=16)
  fn = jax.jit(lk.per_shard(functools.partial(linear_pallas.lightning_attention, chunk_size=16,
                                              config=INTERPRET)))
  with sharding.use(mesh, sharding.rules_for("fsdp_tp")):
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, SLOPES))
    out = fn(q, k, v, SLOPES)
  assert_close(out, reference(q, k, v, SLOPES))


def test_segment_plan_covers_the_sequence_with_little_padding():
  cfg = linear_pallas.KernelConfig(chunk_size=64, segment_len=1024)
  for t in (64, 1000, 1024, 2100, 32768):
    segment_len, count = linear_pallas._segment_plan(t, cfg)
    assert segment_len % 64 == 0 and segment_len <= 1024
    assert t <= segment_len * count < t + 64 * count


def test_auto_segment_plan_splits_only_until_the_grid_is_full():
  cfg = linear_pallas.KernelConfig(chunk_size=64, segment_len=0, min_programs=256)
  assert linear_pallas._segment_plan(2048, cfg, parallel_programs=1024) == (2048, 1)
  assert linear_pallas._segment_plan(32768, cfg, parallel_programs=64) == (8192, 4)
  for t, programs in ((100, 1), (1000, 3), (32768, 7), (4097, 200)):
    segment_len, count = linear_pallas._segment_plan(t, cfg, programs)
    assert segment_len % 64 == 0 and t <= segment_len * count < t + 64 * count
    assert count * programs >= 256 or segment_len == 64


def test_pallas_impl_refuses_cpu_with_reason():
  q, k, v = qkv()
  with pytest.raises(ValueError, match="impl='pallas' cannot run here"):
    lk.apply(q, k, v, SLOPES, causal=True, impl="pallas")


def test_pipeline_stages_fit_the_shared_memory_of_every_compiled_shape():
  """Each pipeline stage buffers one chunk of every load: the tilings compiled on an H100 keep
  their stages (float32 and bf16 at head_dim 64, bf16 at 128, and float32 at 64 with packed
  rows' int32 reach: 192, 96, 160 and 193 KiB), and bf16 at head_dim 256, which asked Triton for
  288 KiB of a block's 227, drops to what fits."""
  def stage_bytes(head_dim, itemsize, chunk=64, block_e=64, documents=False):
    return chunk * ((2 * head_dim + block_e) * itemsize + (4 if documents else 0))

  for head_dim, itemsize in ((64, 4), (64, 2), (128, 2)):
    assert linear_pallas.pipeline_stages(4, stage_bytes(head_dim, itemsize)) == 4
  assert linear_pallas.pipeline_stages(4, stage_bytes(64, 4, documents=True)) == 4
  stages = linear_pallas.pipeline_stages(4, stage_bytes(256, 2))
  assert stages * stage_bytes(256, 2) <= linear_pallas.PIPELINE_SHARED_BYTES < 227 * 1024
  assert stages == 2
  assert linear_pallas.pipeline_stages(4, stage_bytes(256, 4)) == 1  # float32: no pipelining
  assert linear_pallas.pipeline_stages(4, 10 ** 9) == 1  # never zero stages


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_kernel_on_gpu_matches_reference(dtype, head_dim):
  """Compiled Triton kernel, forward and gradients, at a multi-segment length. float32 is held to
  1e-4; bf16 to twice the error of the XLA block form run in bf16 on the same inputs. Head dim
  256 (Zoology's d_model 512 over 2 heads) runs with fewer pipeline stages."""
  q, k, v = (x.astype(dtype) for x in qkv(b=2, t=3000, h=4, d=head_dim, seed=1))
  slopes = jnp.asarray(lightning.decay_slopes("official_alibi", 4, 0, 2), jnp.float32)
  cotangent = jax.random.normal(jax.random.key(2), v.shape).astype(dtype)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]

  def value_and_grads(fn, args):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, slopes), *args)
    return (out, *vjp(cotangent.astype(out.dtype)))

  expected = value_and_grads(lk.causal_reference, f32)
  pallas = jax.jit(lambda *a: value_and_grads(
      lambda q, k, v, s: lk.apply(q, k, v, s, causal=True, impl="pallas"), a))(
          q, k, v)
  if dtype == jnp.float32:
    for got, want in zip(pallas, expected):
      assert_close(got, want, 1e-4)
    return
  xla = jax.jit(lambda *a: value_and_grads(
      lambda q, k, v, s: lk.apply(q, k, v, s, causal=True, impl="xla"), a))(q, k, v)
  for got, base, want in zip(pallas, xla, expected):
    want = np.asarray(want, np.float64)
    err = np.abs(np.asarray(got, np.float64) - want).max()
    base_err = np.abs(np.asarray(base, np.float64) - want).max()
    assert err <= 2 * base_err + 1e-3 * np.abs(want).max(), (err, base_err)


# ---------------------------------------------------------------------------------------------
# Decay schedules and normalisation.
# ---------------------------------------------------------------------------------------------


def test_official_schedule_is_alibi_with_layer_factor():
  assert lightning.decay_slopes("official_alibi", 8, 0, 12) == pytest.approx(
      [2.0 ** -(h + 1) * (1 + 1e-5) for h in range(8)])
  # Not a power of two: the 8-head list, then the 16-head list 2^(-(i+1)/2) at even i.
  twelve = [2.0 ** -(h + 1) for h in range(8)] + [2.0 ** -((i + 1) / 2) for i in (0, 2, 4, 6)]
  assert lightning.decay_slopes("official_alibi", 12, 0, 12) == pytest.approx(
      [s * (1 + 1e-5) for s in twelve])
  last = lightning.decay_slopes("official_alibi", 8, 11, 12)
  assert last == pytest.approx([2.0 ** -(h + 1) * 1e-5 for h in range(8)])


def test_paper_schedule_is_linear_in_head_and_layer():
  for layer in (0, 3):
    assert lightning.decay_slopes("paper_linear", 8, layer, 4) == pytest.approx(
        [8 * h / 8 * (1 - layer / 4) for h in range(8)])
  assert lightning.decay_slopes("none", 3, 0, 2) == (0.0, 0.0, 0.0)
  table = lightning.decay_table("paper_linear", 4, 2)
  assert table[0][0] == 1.0 and all(0 < lam <= 1 for row in table for lam in row)


def test_srms_norm_has_unit_rms_and_is_scale_invariant():
  x = jax.random.normal(jax.random.key(0), (3, 5, 64)) * 7.0
  y = lightning.srms_norm(x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y ** 2, axis=-1)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(lightning.srms_norm(x * 123.0), y, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------

DIMS = dict(d_model=32, num_heads=4, layer_index=1, num_layers=3)


def build(**options):
  return attention.build("lightning", rngs=nnx.Rngs(0), **DIMS, **options)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("schedule", ["official_alibi", "paper_linear"])
def test_module_impls_agree(causal, schedule):
  x = jax.random.normal(jax.random.key(1), (2, 30, 32))
  ctx = Context.for_inputs(2, 30, causal=causal)
  outputs = {}
  for impl in ("xla", "reference"):
    attn = build(impl=impl, block_size=8, decay_schedule=schedule,
                 bidirectional_form="symmetric_decay")
    outputs[impl] = attn(x, ctx)[0]
  assert outputs["xla"].shape == x.shape
  np.testing.assert_allclose(outputs["xla"], outputs["reference"], rtol=1e-4, atol=1e-5)


def test_module_prefill_then_decode_equals_forward():
  attn = build(block_size=8)
  x = jax.random.normal(jax.random.key(2), (2, 20, 32))
  full, _ = attn(x, Context.for_inputs(2, 20))
  def at(first):
    return Context.for_inputs(2, 1, slots=DecodeSlots(jnp.int32(first), jnp.zeros(2, jnp.int32)))

  out, state = attn.prefill(x[:, :13], at(0), attn.init_state(2, 20))
  steps = []
  for t in range(13, 20):
    y, state = attn.decode_step(x[:, t:t + 1], at(t), state)
    steps.append(y)
  np.testing.assert_allclose(out, full[:, :13], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full[:, 13:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("feature_map", list(lightning.FEATURE_MAPS))
def test_feature_maps_and_gate_options_run(feature_map):
  for gate in (True, False):
    attn = build(feature_map=feature_map, output_gate=gate)
    y, aux = attn(jnp.ones((1, 9, 32)), Context.for_inputs(1, 9))
    assert y.shape == (1, 9, 32) and aux == {} and bool(jnp.all(jnp.isfinite(y)))
    assert (attn.gate is None) == (not gate)


@pytest.mark.parametrize("option,value,valid", [
    ("decay_schedule", "alibi", "official_alibi, paper_linear, none"),
    ("feature_map", "gelu", "swish, elu1, relu, identity"),
    ("bidirectional_form", "lightnet", "no_decay, symmetric_decay"),
    ("impl", "triton", "auto, reference, xla, pallas"),
])
def test_bad_option_values_list_the_choices(option, value, valid):
  with pytest.raises(ValueError, match=f"Valid: {valid}"):
    build(**{option: value})


def test_flops_do_not_grow_with_sequence_length():
  fam = attention.family("lightning")
  dims, options = attention.Dims(d_model=768, num_heads=12), attention.make_options("lightning")
  assert fam.module.flops_per_token(dims, options, 2048, True) == \
      fam.module.flops_per_token(dims, options, 32768, True)


def test_bidirectional_stack_mixes_every_position():
  """In a bidirectional backbone (the ViT's use) the first output depends on the last input."""
  from arch_zoo.models.block import Stack
  from tests.helpers import lm_config

  config = lm_config("lightning")
  stack = Stack(config.model, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 12, config.model.d_model))
  ctx = Context.for_inputs(1, 12, causal=False)
  before, _ = stack(x, ctx)
  after, _ = stack(x.at[:, -1].add(1.0), ctx)
  assert not np.allclose(before[:, 0], after[:, 0])


def test_lm_trains_and_resumes_exactly_through_train_py(austen_data_dir, tmp_path):
  import train
  from tests.helpers import lm_config, train_losses

  def config(**overrides):
    cfg = lm_config("lightning")
    cfg.data.data_dir = austen_data_dir
    cfg.train.update(progress=False, steps=30, log_every=5, eval_every=0, checkpoint_every=15,
                     **overrides)
    return cfg

  full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
  final = train.train_and_evaluate(config(), full_dir)
  assert train.train_and_evaluate(config(stop_at_step=15), split_dir) == {"step": 15}
  resumed = train.train_and_evaluate(config(), split_dir)

  assert train_losses(full_dir) == train_losses(split_dir)
  assert resumed["loss"] == final["loss"]
  assert train_losses(full_dir)[30] < train_losses(full_dir)[5] - 0.5


# ------------------------------------------------------------------ the decoding step's kernel


def decode_inputs(b=2, h=3, d=32, e=64, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k = (0.3 * jax.random.normal(key, (b, h, d)) for key in keys[:2])
  v = jax.random.normal(keys[2], (b, h, e))
  state = jax.random.normal(keys[3], (b, h, d, e))
  return state, q, k, v, jnp.geomspace(0.05, 1.5, h)  # spans fast and slow decays


def test_decode_kernel_steps_equal_the_float64_recurrence():
  """The one-kernel decoding step (interpreted), chained over 5 tokens with its state carried,
  against the recurrence written out in float64 numpy; value columns in two blocks."""
  state, q, k, v, slopes = decode_inputs()
  lam = np.exp(-np.asarray(slopes, np.float64))[None, :, None, None]
  expected_state = np.asarray(state, np.float64)
  for step in range(5):
    qs, ks, vs = (x * (1 + 0.1 * step) for x in (q, k, v))
    out, state = linear_pallas.recurrent_step(state, qs, ks, vs, slopes, block_e=32,
                                              interpret=True)
    expected_state = lam * expected_state + np.einsum("bhd,bhe->bhde", np.asarray(ks, np.float64),
                                                      np.asarray(vs, np.float64))
    expected = np.einsum("bhd,bhde->bhe", np.asarray(qs, np.float64), expected_state)
    np.testing.assert_allclose(np.asarray(state), expected_state, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_decode_kernel_is_chosen_only_by_name_and_says_what_it_cannot_do():
  state, q, k, v, slopes = decode_inputs()
  with pytest.raises(ValueError, match="impl='pallas' cannot run here: the backend is 'cpu'"):
    lk.recurrent_step(state, q, k, v, slopes, impl="pallas")
  odd = decode_inputs(d=48)
  assert "head_dim 48 is not a power of two" in linear_pallas.recurrent_step_unsupported_reason(
      odd[1], odd[3], interpret=True)
  out, _ = lk.recurrent_step(state, q, k, v, slopes)  # auto: the xla form on any backend
  assert out.shape == v.shape


@pytest.mark.gpu
def test_decode_kernel_on_gpu_equals_the_xla_step():
  """Compiled, float32 and bf16 inputs: the kernel against the xla form (both keep the state in
  float32; the kernel has no matmul, so no TF32 rounding)."""
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    state, q, k, v, slopes = decode_inputs(b=4, h=12, d=64, e=64)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    with jax.default_matmul_precision("highest"):
      want = jax.jit(functools.partial(lk.recurrent_step, impl="xla"))(state, q, k, v, slopes)
    got = jax.jit(functools.partial(lk.recurrent_step, impl="pallas"))(state, q, k, v, slopes)
    for a, b in zip(got, want):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["causal", "symmetric_decay"])
def test_context_parallel_states_equal_the_whole_sequence(mode):
  """The sequence split over a 4-way context mesh axis: each shard's own pass plus the states
  passed from earlier shards (an all_gather of [B, H, D, E] states, no gathered keys) equals the
  operator on the whole sequence, outputs and gradients; shards of 6 tokens, no multiple of the
  block size (16)."""
  q, k, v = qkv(t=24, d=8)
  causal = mode == "causal"

  def fn(q, k, v):
    return lk.apply(q, k, v, SLOPES, causal=causal, impl="xla", block_size=16,
                    bidirectional_form="no_decay" if causal else mode)

  def loss(q, k, v):
    return jnp.sum(fn(q, k, v) ** 2)

  want_out, want_grads = fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  mesh = sharding.make_mesh({"data": 2, "context": 4})
  rules = sharding.rules_for("dp")
  with sharding.use(mesh, rules):
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
    out = jax.jit(fn)(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  assert "all_gather" in jaxpr and "shard_map" in jaxpr  # states are passed, not keys gathered
  assert_close(out, want_out)
  for got, want in zip(grads, want_grads):
    assert_close(got, want)
