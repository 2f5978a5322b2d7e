"""Context-parallel softmax attention (``ops.softmax.context_parallel``) on 8 fake CPU devices:
the sequence split over a ``context`` mesh axis gives the dense float32 oracle's outputs and
gradients, the causal work is balanced over the devices, and future key blocks are never read."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import sharding
from arch_zoo.attention import ops
from arch_zoo.attention.ops import softmax
from tests.helpers import build_lm, lm_config, random_tokens


def inputs(batch, length, heads, kv_heads, dim=8, packed=False, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, dim), jnp.float32)
  k = jax.random.normal(keys[1], (batch, length, kv_heads, dim), jnp.float32)
  v = jax.random.normal(keys[2], (batch, length, kv_heads, dim), jnp.float32)
  # Documents of random lengths, boundaries anywhere (inside shards and key blocks too).
  ids = (jnp.cumsum(jax.random.bernoulli(keys[3], 0.15, (batch, length)), axis=1, dtype=jnp.int32)
         if packed else None)
  return q, k, v, ids


def outputs_and_gradients(fn, q, k, v):
  def loss(q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))  # non-uniform cotangents

  return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def assert_close(got, want, tol=1e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol, rtol=tol)


def test_zigzag_gives_every_device_one_early_and_one_late_half_shard():
  """Both permutations are bijections of the devices; device d receives half-shards d and
  2N - 1 - d, whose causal prefixes (j + 1 key blocks for half-shard j) sum to 2N + 1 on every
  device."""
  for shards in range(1, 9):
    first, second = softmax.zigzag_permutations(shards)
    received = {d: [] for d in range(shards)}
    for offset, pairs in enumerate((first, second)):
      assert sorted(s for s, _ in pairs) == list(range(shards))
      assert sorted(d for _, d in pairs) == list(range(shards))
      for source, destination in pairs:
        received[destination].append(2 * source + offset)  # device s holds 2s and 2s + 1
    for device, halves in received.items():
      assert sorted(halves) == sorted([device, 2 * shards - 1 - device])
      assert sum(j + 1 for j in halves) == 2 * shards + 1


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_context_parallel_equals_reference(shards, causal, groups, packed):
  """A data x context mesh: outputs and gradients of q, k and v equal ``softmax.reference``'s in
  float32. Causal lengths are 2N half-shards of 5 tokens; non-causal ones N shards of 9 tokens,
  no multiple of 2N (only the causal order needs halves)."""
  length = 2 * shards * 5 if causal else shards * 9
  q, k, v, ids = inputs(4, length, 4, 4 // groups, packed=packed)

  def fn(q, k, v):
    return softmax.apply(q, k, v, causal=causal, impl="xla", segment_ids=ids)

  want_out, want_grads = outputs_and_gradients(
      lambda q, k, v: softmax.reference(q, k, v, causal=causal, segment_ids=ids), q, k, v)
  mesh = sharding.make_mesh({"data": 8 // shards, "context": shards})
  with sharding.use(mesh, sharding.rules_for("dp")):
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
    out, grads = outputs_and_gradients(fn, q, k, v)
  assert "shard_map" in jaxpr and "all_gather" in jaxpr
  assert ("ppermute" in jaxpr) == causal  # only the causal order moves the queries
  assert_close(out, want_out)
  for got, want in zip(grads, want_grads):
    assert_close(got, want)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_context_parallel_keeps_heads_split_over_tensor(kv_heads):
  """``fsdp_tp`` on a data x context x tensor mesh: query and key/value heads stay split over
  ``tensor`` inside the shard_map (GQA, 2 kv heads); with one kv head (MQA), which a 2-way tensor
  axis cannot split, the heads stay whole. Both equal the oracle."""
  q, k, v, ids = inputs(2, 16, 4, kv_heads, packed=True)

  def fn(q, k, v):
    return softmax.apply(q, k, v, causal=True, impl="auto", segment_ids=ids)

  want_out, want_grads = outputs_and_gradients(
      lambda q, k, v: softmax.reference(q, k, v, causal=True, segment_ids=ids), q, k, v)
  mesh = sharding.make_mesh({"data": 2, "context": 2, "tensor": 2})
  with sharding.use(mesh, sharding.rules_for("fsdp_tp")):
    jaxpr = jax.make_jaxpr(fn)(q, k, v)
    out, grads = outputs_and_gradients(fn, q, k, v)
  shard_map = next(e for e in jaxpr.eqns if e.primitive.name == "shard_map")
  specs = {tuple(x.aval.shape): spec for x, spec in zip(shard_map.invars,
                                                        shard_map.params["in_specs"])}
  assert specs[k.shape][2] == specs[q.shape][2] == ("tensor" if kv_heads == 2 else None)
  assert_close(out, want_out)
  for got, want in zip(grads, want_grads):
    assert_close(got, want)


@pytest.mark.parametrize("rows, bound", [(24, 8), (10, 4), (5, 3)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_context_parallel_with_several_blocks_per_chunk_equals_reference(rows, bound, causal,
                                                                         packed):
  """Query chunks (half-shards causal, shards not) of ``rows`` tokens cut into blocks of at most
  ``bound``: 24 into three blocks of 8; 10 into three of 4, the last padded by 2; 5 into two of
  3, padded by 1, where the keys (20 or 10 tokens) are padded to whole blocks too. Outputs and
  gradients of q, k and v equal ``softmax.reference``'s in float32 on a 4 x 2 data x context
  mesh, GQA 2, with and without packed rows."""
  shards = 2
  length = (2 * shards if causal else shards) * rows
  q, k, v, ids = inputs(4, length, 4, 2, packed=packed, seed=1)

  def fn(q, k, v):
    return softmax.context_parallel(q, k, v, axis="context", causal=causal,
                                    scale=q.shape[-1] ** -0.5, segment_ids=ids, block=bound)

  want_out, want_grads = outputs_and_gradients(
      lambda q, k, v: softmax.reference(q, k, v, causal=causal, segment_ids=ids), q, k, v)
  mesh = sharding.make_mesh({"data": 8 // shards, "context": shards})
  with sharding.use(mesh, sharding.rules_for("dp")):
    out, grads = outputs_and_gradients(fn, q, k, v)
  assert_close(out, want_out)
  for got, want in zip(grads, want_grads):
    assert_close(got, want)


def test_block_size_cuts_a_chunk_into_the_fewest_equal_blocks():
  """For every chunk of 1..99 tokens and bound 1..19: the block is at most the bound, the fewest
  blocks of at most the bound (ceil(rows / bound)) cover the chunk, and they pad it by fewer
  tokens than there are blocks; a bound the chunk fits in gives one block of the whole chunk."""
  for rows in range(1, 100):
    for bound in range(1, 20):
      block = softmax.block_size(rows, bound)
      blocks = -(-rows // block)
      assert block <= bound and blocks == -(-rows // bound)
      assert 0 <= blocks * block - rows < blocks
    assert softmax.block_size(rows, 512) == rows


@pytest.mark.parametrize("block", [0, -4, 2.5])
def test_a_bad_block_bound_says_what_to_give(block):
  q, k, v, _ = inputs(2, 16, 4, 2)
  mesh = sharding.make_mesh({"data": 4, "context": 2})
  with sharding.use(mesh, sharding.rules_for("dp")), pytest.raises(ValueError,
                                                                   match="positive number"):
    softmax.context_parallel(q, k, v, axis="context", causal=True, scale=1.0, block=block)


def test_context_parallel_in_bfloat16_is_as_close_to_the_oracle_as_the_dense_form():
  """bf16 inputs (the GPU's compute dtype; statistics stay float32): outputs and gradients are
  no further from the float32 oracle than twice the dense ``xla`` form's error on one device."""
  q, k, v, ids = inputs(4, 64, 4, 2, packed=True)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

  def fn(impl):
    return lambda q, k, v: softmax.apply(q, k, v, causal=True, impl=impl, segment_ids=ids)

  want = outputs_and_gradients(fn("reference"), q, k, v)
  dense = outputs_and_gradients(fn("xla"), q, k, v)
  mesh = sharding.make_mesh({"data": 2, "context": 4})
  with sharding.use(mesh, sharding.rules_for("dp")):
    split = outputs_and_gradients(fn("xla"), q, k, v)
  for got, baseline, ref in zip(jax.tree.leaves(split), jax.tree.leaves(dense),
                                jax.tree.leaves(want)):
    assert got.dtype == jnp.bfloat16
    ref = np.asarray(ref, np.float32)
    error = np.abs(np.asarray(got, np.float32) - ref).max()
    assert error <= 2 * np.abs(np.asarray(baseline, np.float32) - ref).max(), error


@pytest.mark.parametrize("block", [None, 2])
def test_future_key_blocks_are_never_read(block):
  """NaN keys and values from half-shard m on: with the sequence split 4 ways (half-shards of 4
  tokens), every query before half-shard m stays finite and exact, on every device, because no
  device reads a key block wholly in its queries' future. The dense form, which multiplies the
  masked probabilities (0) by the NaN values, turns every row NaN: the poison is visible.
  ``block=2``: each half-shard is two query blocks of 2 tokens, each reading up to its own."""
  shards, half = 4, 4
  q, k, v, _ = inputs(2, 2 * shards * half, 4, 2)
  want = softmax.reference(q, k, v, causal=True)
  mesh = sharding.make_mesh({"data": 2, "context": shards})
  def fn(q, k, v):
    return softmax.apply(q, k, v, causal=True, impl="xla")

  def split(q, k, v):  # ``apply`` takes the context-parallel form under the mesh
    if block is None:
      return fn(q, k, v)
    return softmax.context_parallel(q, k, v, axis="context", causal=True,
                                    scale=q.shape[-1] ** -0.5, block=block)

  dense = jax.jit(lambda q, k, v: fn(q, k, v))  # its own trace cache, traced without a mesh
  for m in (1, shards, 2 * shards - 1):
    future = (jnp.arange(q.shape[1]) >= m * half)[None, :, None, None]
    k_poisoned, v_poisoned = (jnp.where(future, jnp.nan, x) for x in (k, v))
    assert np.isnan(np.asarray(dense(q, k_poisoned, v_poisoned))).all()  # no mesh: dense
    with sharding.use(mesh, sharding.rules_for("dp")):
      out = np.asarray(jax.jit(split)(q, k_poisoned, v_poisoned))
    assert_close(out[:, :m * half], want[:, :m * half])
    assert np.isnan(out[:, m * half:]).all()


def dot_output_dims(jaxpr) -> list[tuple[int, ...]]:
  """The output shapes of every dot_general in ``jaxpr`` and its sub-jaxprs."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for value in eqn.params.values():  # shard_map, while, cond, custom_vjp, pjit bodies
      for item in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(item, "jaxpr", item)
        if hasattr(sub, "eqns"):
          shapes += dot_output_dims(sub)
  return shapes


def array_shapes(jaxpr) -> list[tuple[int, ...]]:
  """The shapes of every array that ``jaxpr`` and its sub-jaxprs compute."""
  shapes = []
  for eqn in jaxpr.eqns:
    shapes += [tuple(x.aval.shape) for x in eqn.outvars if hasattr(x.aval, "shape")]
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(item, "jaxpr", item)
        if hasattr(sub, "eqns"):
          shapes += array_shapes(sub)
  return shapes


def shard_map_bodies(jaxpr) -> list:
  """The bodies of the shard_maps in ``jaxpr`` (the forward's and the backward's)."""
  bodies = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      bodies.append(getattr(eqn.params["jaxpr"], "jaxpr", eqn.params["jaxpr"]))
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(item, "jaxpr", item)
        if hasattr(sub, "eqns"):
          bodies += shard_map_bodies(sub)
  return bodies


def test_no_device_computes_logits_wider_than_a_key_block():
  """Forward and backward, with the default bound (``CONTEXT_BLOCK`` = 512 tokens) and half-shards
  of twice that: every matmul inside the shard_map is at most one block of queries by one block of
  keys, and every array there with two dimensions of a block or more (the logits, probabilities
  and their masks) is ``[.., block, block]``: no [c, c], [L, T] or [T, T] logits exist, where
  c = 1024 tokens per half-shard, L = 2048 per device and T = 8192. Only traced, never run. The
  same check finds [T, T] logits in the dense form."""
  shards, block = 4, softmax.CONTEXT_BLOCK
  length = 2 * shards * 2 * block
  q, k, v, ids = inputs(2, length, 4, 2, packed=True)

  def loss(impl, q, k, v):
    return jnp.sum(softmax.apply(q, k, v, causal=True, impl=impl, segment_ids=ids) ** 2)

  mesh = sharding.make_mesh({"data": 2, "context": shards})
  with sharding.use(mesh, sharding.rules_for("dp")):
    split = jax.make_jaxpr(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2)))(q, k, v)
    dense = jax.make_jaxpr(jax.grad(functools.partial(loss, "reference"),
                                    argnums=(0, 1, 2)))(q, k, v)
  dots = dot_output_dims(split.jaxpr)
  assert any(shape.count(block) == 2 for shape in dots), dots  # a block pair's logits
  assert all(max(shape) <= block for shape in dots), dots
  bodies = shard_map_bodies(split.jaxpr)
  assert len(bodies) >= 2  # forward and backward
  for body in bodies:
    wide = [shape for shape in array_shapes(body) if sum(n >= block for n in shape) >= 2]
    assert wide and all(sorted(shape)[-2:] == [block, block] for shape in wide), wide
  assert any(shape.count(length) == 2 for shape in dot_output_dims(dense.jaxpr))
  assert any(shape.count(length) == 2 for shape in array_shapes(dense.jaxpr))


def test_causal_length_without_equal_half_shards_runs_as_before():
  """36 tokens on a 4-way context axis make shards of 9, no two equal halves: the call runs as it
  would without the split (XLA partitions the dense form), still equal to the oracle."""
  q, k, v, _ = inputs(2, 36, 4, 2)
  fn = functools.partial(softmax.apply, causal=True, impl="xla")
  mesh = sharding.make_mesh({"data": 2, "context": 4})
  with sharding.use(mesh, sharding.rules_for("dp")):
    assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v))
    out = jax.jit(fn)(q, k, v)
  assert_close(out, softmax.reference(q, k, v, causal=True))


@pytest.mark.parametrize("attn", ["mha", "moh", "masa"])
def test_softmax_families_take_the_context_parallel_form(attn):
  """The LM of each softmax family, traced under a data x context mesh with ``impl=auto``: every
  layer's attention is the context-parallel xla form, and the record says why (its exactness in
  a training step: tests/test_sharding.py::test_context_parallel_step_equals_single_device_...)."""
  model = build_lm(lm_config(attn, d_model=64, num_heads=4))
  graphdef, state = nnx.split(model)
  tokens = random_tokens(2, 32, 256)
  mesh = sharding.make_mesh({"data": 2, "context": 4})
  with sharding.use(mesh, sharding.rules_for("dp")), ops.recording() as records:
    jaxpr = str(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))
  softmax_records = [r for r in records if r["op"] == "softmax"]
  assert softmax_records and "shard_map" in jaxpr
  for record in softmax_records:
    assert record["requested"] == "auto" and record["resolved"] == "xla", record
    assert "split over mesh axis 'context'" in record["reason"], record
