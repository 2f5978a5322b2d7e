"""Routing attention (spec section 4): the oracles of 4.8 against float64 NumPy references built
from the layer's own weights, strict causality of the LM form, and the k-means state in the train
step, the eval step, sharding, remat and checkpoint resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train
from arch_zoo import attention, checkpoint, optim, sharding, steps, train_state
from arch_zoo.attention import routing
from arch_zoo.attention.base import Context
from arch_zoo.attention.ops import routing as routing_ops
from arch_zoo.layers import apply_rope
from arch_zoo.models.block import Stack
from configs import lm
from tests.helpers import train_losses

D_MODEL, HEADS = 32, 2  # head_dim 16


def build(seed=0, **options):
  """A routing layer whose output projection is the identity, so outputs are the heads' outputs."""
  attn = attention.build("routing", rngs=nnx.Rngs(seed), d_model=D_MODEL, num_heads=HEADS,
                         **options)
  attn.out.kernel[...] = jnp.eye(D_MODEL)
  return attn


def inputs(batch=2, length=12, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, D_MODEL))


# ------------------------------------------------------------------------ float64 references


def projections(attn, x):
  """Per-head queries, local keys and values in float64, from the layer's own kernels."""
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape

  def heads(kernel):
    return (x @ np.asarray(kernel[...], np.float64)).reshape(b, t, -1, attn.head_dim)

  keys = heads(attn.key.kernel) if attn.key is not None else None
  return heads(attn.query.kernel), keys, heads(attn.value.kernel)


def unit_layer_norm(x):
  x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)


def masked_attention(q, k, v, allowed):
  """Softmax attention of ``q[T, D]`` over ``k, v[S, D]`` where ``allowed[T, S]``."""
  logits = np.where(allowed, q @ k.T / np.sqrt(q.shape[-1]), -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v


def nearest_clusters(attn, shared):
  """``shared[B, T, Hr, D]`` -> scores ``[B, T, Hr, C]`` and nearest centroids ``[B, T, Hr]``."""
  scores = np.einsum("bthd,hcd->bthc", shared, np.asarray(attn.centroids[...], np.float64))
  return scores, scores.argmax(-1)


def causal_routing_reference(qk, v, cluster, window, segment):
  """Token i attends to j <= i of its cluster and segment whose rank among them is in i's block
  or the one before; written from the definition, one pair at a time (a packed segment is ranked
  as it would be alone)."""
  t = len(cluster)
  rank = [int(np.sum((cluster[:i] == cluster[i]) & (segment[:i] == segment[i])))
          for i in range(t)]
  allowed = np.zeros((t, t), bool)
  for i in range(t):
    for j in range(i + 1):
      allowed[i, j] = (cluster[i] == cluster[j] and segment[i] == segment[j]
                       and rank[j] // window >= rank[i] // window - 1)
  return masked_attention(qk, qk, v, allowed)


def balanced_routing_reference(qk, v, scores, window):
  """The paper's balanced routing: per cluster the ``window`` best-scoring tokens attend to each
  other; a token's output is the mean over the windows holding it (0 if none)."""
  t, num_clusters = scores.shape
  total, count = np.zeros_like(v), np.zeros(t)
  for c in range(num_clusters):
    members = np.sort(np.argsort(-scores[:, c], kind="stable")[:window])
    total[members] += masked_attention(qk[members], qk[members], v[members],
                                       np.ones((window, window), bool))
    count[members] += 1
  return total / np.maximum(count, 1)[:, None]


def routing_heads_reference(attn, x, ctx_causal, segment_ids=None):
  """Outputs of the routing heads ``[B, T, Hr, D]`` (no RoPE)."""
  q, _, v = projections(attn, x)
  local = attn.local_heads
  shared = unit_layer_norm(q[:, :, local:])
  scores, nearest = nearest_clusters(attn, shared)
  b, t = x.shape[:2]
  segment_ids = np.zeros((b, t), int) if segment_ids is None else np.asarray(segment_ids)
  window = attn.window_for(t)
  out = np.zeros_like(shared)
  for bi in range(b):
    for r in range(attn.routing_heads):
      if ctx_causal:
        out[bi, :, r] = causal_routing_reference(shared[bi, :, r], v[bi, :, local + r],
                                                 nearest[bi, :, r], window, segment_ids[bi])
      else:
        out[bi, :, r] = balanced_routing_reference(shared[bi, :, r], v[bi, :, local + r],
                                                   scores[bi, :, r], window)
  return out


def heads_of(y):
  return np.asarray(y).reshape(*y.shape[:2], HEADS, -1)


# ------------------------------------------------------------------------ registry and options


def test_registered_for_the_lm_and_the_vit_with_official_defaults():
  assert "routing" in attention.names_supporting(causal=True)
  assert "routing" in attention.names_supporting(causal=False)
  defaults = attention.family("routing").defaults()
  assert defaults["decay"] == 0.999 and defaults["commitment"] == 1e-4
  config = lm.get_config("attn=routing,size=test")
  assert dict(config.model.attention) == {"name": "routing", **defaults}
  config.model.attention.local_heads = 1  # the head mix is a config key


def test_bad_options_fail_clearly():
  with pytest.raises(ValueError, match="local_heads=3 exceeds num_heads=2"):
    build(local_heads=3)
  with pytest.raises(ValueError, match="num_clusters must be >= 1"):
    build(num_clusters=0)
  with pytest.raises(ValueError, match="decay must lie in"):
    build(decay=1.5)
  with pytest.raises(TypeError, match="Valid options: local_heads"):
    build(clusters=4)


# ------------------------------------------------------------------------ oracles (spec 4.8)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rope", [False, True])
def test_one_cluster_with_the_whole_window_is_full_attention(causal, rope):
  attn = build(local_heads=0, num_clusters=1, rope=rope)
  x = inputs(length=10)
  ctx = Context.for_inputs(2, 10, causal=causal)
  y, _ = attn(x, ctx)
  q, _, v = projections(attn, x)
  shared = unit_layer_norm(q)
  if rope:
    shared = np.asarray(apply_rope(jnp.asarray(shared, jnp.float32), ctx.positions), np.float64)
  allowed = np.tril(np.ones((10, 10), bool)) if causal else np.ones((10, 10), bool)
  expected = np.stack([np.stack([masked_attention(shared[b, :, h], shared[b, :, h], v[b, :, h],
                                                  allowed) for h in range(HEADS)], 1)
                       for b in range(2)])
  np.testing.assert_allclose(heads_of(y), expected, atol=1e-5, rtol=1e-5)


def test_every_cluster_holding_every_token_is_full_attention():
  """Spec 4.8.2: C windows of w = T tokens are C copies of full attention; their mean is one."""
  attn = build(local_heads=0, num_clusters=3, window=9, rope=False)
  x = inputs(length=9)
  y, _ = attn(x, Context.for_inputs(2, 9, causal=False))
  q, _, v = projections(attn, x)
  shared = unit_layer_norm(q)
  expected = np.stack([np.stack([masked_attention(shared[b, :, h], shared[b, :, h], v[b, :, h],
                                                  np.ones((9, 9), bool)) for h in range(HEADS)], 1)
                       for b in range(2)])
  np.testing.assert_allclose(heads_of(y), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_local_heads_match_a_banded_reference(causal):
  block, t = 4, 11  # T not a multiple of the block
  attn = build(local_heads=HEADS, local_window=block, rope=False)
  x = inputs(length=t)
  y, aux = attn(x, Context.for_inputs(2, t, causal=causal))
  assert aux == {}  # no routing heads, no commitment loss
  q, k, v = projections(attn, x)
  query_block, key_block = np.arange(t)[:, None] // block, np.arange(t)[None, :] // block
  allowed = (key_block >= query_block - 1) & (key_block <= query_block + (0 if causal else 1))
  if causal:
    allowed &= np.tril(np.ones((t, t), bool))
  expected = np.stack([np.stack([masked_attention(q[b, :, h], k[b, :, h], v[b, :, h], allowed)
                                 for h in range(HEADS)], 1) for b in range(2)])
  np.testing.assert_allclose(heads_of(y), expected, atol=1e-5, rtol=1e-5)


def test_causal_routing_matches_the_definition_with_segments():
  t = 20
  attn = build(local_heads=1, num_clusters=3, window=3, rope=False)
  x = inputs(length=t, seed=3)
  segment_ids = jnp.array([[0] * 12 + [1] * 8, [0] * 5 + [1] * 15], jnp.int32)
  y, _ = attn(x, Context.for_inputs(2, t, causal=True, segment_ids=segment_ids))
  expected = routing_heads_reference(attn, x, True, segment_ids)
  np.testing.assert_allclose(heads_of(y)[:, :, 1:], expected, atol=1e-5, rtol=1e-5)
  _, nearest = nearest_clusters(attn, unit_layer_norm(projections(attn, x)[0][:, :, 1:]))
  assert max(np.bincount(nearest[b, :, 0]).max() for b in range(2)) > 2 * 3, \
      "some cluster should span more than two blocks so the block window is exercised"


def test_balanced_routing_matches_the_definition():
  attn = build(local_heads=0, num_clusters=3, rope=False)  # w = 4 = T / C
  x = inputs(length=12, seed=4)
  y, _ = attn(x, Context.for_inputs(2, 12, causal=False))
  np.testing.assert_allclose(heads_of(y), routing_heads_reference(attn, x, False), atol=1e-5,
                             rtol=1e-5)


def test_balanced_windows_are_balanced_sorted_and_the_best_scoring():
  t, num_clusters, window = 24, 4, 6
  scores = jax.random.normal(jax.random.key(5), (t, num_clusters))
  members = np.asarray(routing_ops.balanced_windows(scores, window))
  assert members.shape == (num_clusters, window)  # every cluster exactly w tokens
  assert (np.diff(members, axis=1) > 0).all()  # distinct, increasing positions
  counts = np.bincount(members.ravel(), minlength=t)
  assert counts.sum() == num_clusters * window
  scores = np.asarray(scores)
  for c in range(num_clusters):
    outside = np.setdiff1d(np.arange(t), members[c])
    assert scores[members[c], c].min() > scores[outside, c].max()


# ------------------------------------------------------------------------ k-means state


def test_ema_update_matches_the_formula_on_a_hand_made_batch():
  # One head, two clusters, D = 2. Tokens 0 and 1 go to cluster 0, token 2 to cluster 1.
  xhat = jnp.array([[[[1.0, 1.0]], [[1.0, -1.0]], [[-1.0, 1.0]]]])  # [B=1, T=3, H=1, D=2]
  assignment = jnp.array([[[0], [0], [1]]])
  counts0 = jnp.array([[3.0, 1.0]])
  sums0 = jnp.array([[[3.0, 0.0], [0.0, 2.0]]])
  centroids0 = sums0 / counts0[..., None]
  decay, eps = 0.9, routing.COUNT_SMOOTHING
  counts, sums, centroids = routing.ema_update(counts0, sums0, centroids0, xhat, assignment, decay)
  # By hand: n = (2, 1) and the batch sums are (2, 0) and (-1, 1).
  want_counts = np.array([[0.9 * 3 + 0.1 * 2, 0.9 * 1 + 0.1 * 1]])
  want_sums = np.array([[[0.9 * 3 + 0.1 * 2, 0.0], [0.1 * -1, 0.9 * 2 + 0.1 * 1]]])
  total = want_counts.sum()
  smoothed = (want_counts + eps) / (total + 2 * eps) * total
  np.testing.assert_allclose(counts, want_counts, rtol=1e-6)
  np.testing.assert_allclose(sums, want_sums, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(centroids, want_sums / smoothed[..., None], rtol=1e-5)

  # decay 0: each centroid becomes the mean of its tokens (up to the smoothing of 1e-5).
  _, _, means = routing.ema_update(counts0, sums0, centroids0, xhat, assignment, 0.0)
  np.testing.assert_allclose(means, [[[1.0, 0.0], [-1.0, 1.0]]], atol=1e-4)
  # decay 1: the statistics do not move, so neither do the centroids (up to the smoothing); from
  # the initial state (no counts yet) the centroids are kept exactly.
  same_counts, same_sums, same = routing.ema_update(counts0, sums0, centroids0, xhat, assignment,
                                                    1.0)
  np.testing.assert_array_equal(same_counts, counts0)
  np.testing.assert_array_equal(same_sums, sums0)
  np.testing.assert_allclose(same, centroids0, rtol=1e-4)
  _, _, kept = routing.ema_update(jnp.zeros((1, 2)), sums0, centroids0, xhat, assignment, 1.0)
  np.testing.assert_array_equal(kept, centroids0)


def test_training_call_updates_the_centroids_and_evaluation_does_not():
  attn = build(local_heads=1, decay=0.5, rope=False)
  x = inputs(length=16, seed=6)
  before = {k: np.asarray(v) for k, v in nnx.state(attn, routing.ClusterState).flat_state()}
  attn(x, Context.for_inputs(2, 16, causal=True, deterministic=True))
  after_eval = {k: np.asarray(v) for k, v in nnx.state(attn, routing.ClusterState).flat_state()}
  for key in before:
    np.testing.assert_array_equal(before[key], after_eval[key])

  shared = unit_layer_norm(projections(attn, x)[0][:, :, 1:])
  _, nearest = nearest_clusters(attn, shared)
  attn(x, Context.for_inputs(2, 16, causal=True, deterministic=False, rng=jax.random.key(0)))
  counts, sums, centroids = routing.ema_update(
      jnp.asarray(before[("cluster_counts",)]), jnp.asarray(before[("cluster_sums",)]),
      jnp.asarray(before[("centroids",)]), jnp.asarray(shared, jnp.float32),
      jnp.asarray(nearest), 0.5)
  np.testing.assert_allclose(attn.cluster_counts[...], counts, rtol=1e-6)
  np.testing.assert_allclose(attn.centroids[...], centroids, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(attn.centroids[...]) - before[("centroids",)]).max() > 0.1


def test_commitment_loss_and_occupancy_match_their_definitions():
  attn = build(local_heads=0, commitment=0.5, rope=False)
  x = inputs(length=16, seed=7)
  _, aux = attn(x, Context.for_inputs(2, 16))
  shared = unit_layer_norm(projections(attn, x)[0])
  _, nearest = nearest_clusters(attn, shared)
  centroids = np.asarray(attn.centroids[...], np.float64)
  assigned = centroids[np.arange(HEADS), nearest]
  np.testing.assert_allclose(aux["loss/routing_commitment"],
                             0.5 * np.mean((shared - assigned) ** 2), rtol=1e-5)
  largest = np.mean([np.bincount(nearest[:, :, h].ravel(), minlength=4).max() / 32
                     for h in range(HEADS)])
  np.testing.assert_allclose(aux["metric/routing_largest_cluster"], largest, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_are_finite_and_never_reach_the_centroids(causal):
  attn = build(local_heads=1, num_clusters=2)
  x = inputs(length=12, seed=8)
  ctx = Context.for_inputs(2, 12, causal=causal, deterministic=False, rng=jax.random.key(0))
  graphdef, params, clusters = nnx.split(attn, nnx.Param, routing.ClusterState)

  def objective(params, clusters):
    y, aux = nnx.merge(graphdef, params, clusters, copy=True)(x, ctx)
    return jnp.sum(y ** 2) + aux["loss/routing_commitment"] * 1e4

  param_grads, cluster_grads = jax.grad(objective, argnums=(0, 1))(params, clusters)
  for path, g in param_grads.flat_state():
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, path
  for g in jax.tree.leaves(cluster_grads):
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ------------------------------------------------------------------------ strict causality


@pytest.mark.parametrize("deterministic", [True, False])
def test_no_output_depends_on_a_later_token(deterministic):
  """Perturbs the inputs from position t on, so that later tokens change clusters and shift where
  each cluster's blocks start, and checks that every output before t stays bitwise the same."""
  length = 40
  attn = build(local_heads=1, num_clusters=4, window=3, local_window=4)
  x = inputs(batch=2, length=length, seed=9)
  ctx = Context.for_inputs(2, length, causal=True, deterministic=deterministic,
                           rng=None if deterministic else jax.random.key(0))

  graphdef, state = nnx.split(attn)
  # Each call starts from the same state (a training call updates the centroids); jitted once.
  run_jitted = jax.jit(lambda state, x: nnx.merge(graphdef, state, copy=True)(x, ctx)[0])

  def run(x):
    return np.asarray(run_jitted(state, x))

  def layout(x):
    _, nearest = nearest_clusters(attn, unit_layer_norm(projections(attn, x)[0][:, :, 1:]))
    return [np.bincount(nearest[b, :, 0], minlength=4) for b in range(2)]

  reference = run(x)
  layouts_changed = 0
  for trial, t in enumerate([1, 7, 18, 25, 33, 39]):
    noise = 3.0 * jax.random.normal(jax.random.key(100 + trial), (2, length - t, D_MODEL))
    perturbed = x.at[:, t:].add(noise)
    out = run(perturbed)
    np.testing.assert_array_equal(out[:, :t], reference[:, :t], err_msg=f"leak before t={t}")
    assert not np.allclose(out[:, t:], reference[:, t:])
    layouts_changed += any((a != b).any() for a, b in zip(layout(x), layout(perturbed)))
  assert layouts_changed >= 3, "the perturbations should move tokens between clusters"


def test_past_outputs_have_zero_gradient_wrt_later_inputs():
  length, t = 30, 17
  attn = build(local_heads=1, num_clusters=3, window=2, local_window=4)
  ctx = Context.for_inputs(1, length, causal=True)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(attn(x, ctx)[0][:, :t] ** 2)))(
      inputs(1, length, seed=10))
  np.testing.assert_array_equal(np.asarray(grad[:, t:]), 0.0)
  assert np.abs(np.asarray(grad[:, :t])).sum() > 0


# ------------------------------------------------------------------------ in the train step


def routing_config(**model):
  config = lm.get_config("attn=routing,size=test")
  config.model.update(model)
  return config


def train_steps(config, mesh_shape=None, devices=None, steps_taken=2, evaluate=False):
  """Runs ``steps_taken`` jitted train steps on one fixed batch; returns the initial and final
  state, the last step's metrics, the state's shardings and (optionally) one eval step."""
  mesh = sharding.make_mesh(mesh_shape or {"data": 1}, devices or jax.devices()[:1])
  rules = sharding.rules_for(config.sharding)
  tx, schedule = optim.build(config.optim, 10)
  graphdef, state, shardings = train_state.create(config, mesh, rules, tx)
  step = jax.jit(steps.make_train_step(graphdef, tx, schedule, jax.random.key(0)),
                 in_shardings=(shardings, None), out_shardings=(shardings, None))
  tokens = jax.random.randint(jax.random.key(1), (8, 33), 0, 256, jnp.int32)
  local = {"inputs": np.asarray(tokens[:, :-1]), "targets": np.asarray(tokens[:, 1:]),
           "weights": np.ones((8, 32), np.float32)}
  initial, evaluation = state.model_state, None
  with sharding.use(mesh, rules):
    batch = sharding.global_batch_from_local(local, mesh)
    for _ in range(steps_taken):
      state, step_metrics = sharding.wait_if_cpu_mesh(step(state, batch))
    if evaluate:
      eval_step = jax.jit(steps.make_eval_step(graphdef))
      evaluation = eval_step(state.params, state.model_state, batch)
      again = eval_step(state.params, state.model_state, batch)
  return initial, state, step_metrics, shardings, (evaluation, again) if evaluate else None


def test_train_step_updates_replicated_centroids_like_sharded_and_remat_steps():
  """The train step updates the k-means state (replicated, logged); evaluation depends only on
  the state it is given. Cluster statistics are sums over the global batch: a 2 x 4 mesh and
  remat must reach the centroids of one device."""
  initial, reference, ref_metrics, shardings, (evaluation, again) = train_steps(
      routing_config(), evaluate=True)
  assert {"cluster_counts", "cluster_sums", "centroids"} <= {
      str(path[-1]) for path, _ in reference.model_state.flat_state()}
  for (path, new), (_, old) in zip(reference.model_state.flat_state(), initial.flat_state()):
    assert not np.array_equal(np.asarray(new), np.asarray(old)), path
  for _, spec in shardings.model_state.flat_state():
    assert spec.get_value().spec == jax.sharding.PartitionSpec()  # replicated
  assert ref_metrics["train/loss/routing_commitment"] > 0
  assert np.isfinite(evaluation["nll_sum"]) and evaluation["nll_sum"] == again["nll_sum"]

  _, sharded, metrics_sharded, _, _ = train_steps(routing_config(), {"data": 2, "fsdp": 4},
                                                  jax.devices())
  _, remat, metrics_remat, _, _ = train_steps(routing_config(remat="full"))
  for other, other_metrics in ((sharded, metrics_sharded), (remat, metrics_remat)):
    np.testing.assert_allclose(other_metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(reference.model_state), jax.tree.leaves(other.model_state)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_bidirectional_stack_runs_and_updates_every_layer():
  """The ViT path: the shared block stack with ``causal=False`` (balanced routing)."""
  config = routing_config()
  stack = Stack(config.model, rngs=nnx.Rngs(0))
  before = [np.asarray(block.attn.centroids[...]) for block in stack.blocks]
  x = jax.random.normal(jax.random.key(2), (2, 17, config.model.d_model))
  y, aux = stack(x, Context.for_inputs(2, 17, causal=False, deterministic=False,
                                       rng=jax.random.key(0)))
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
  assert set(aux) == {"loss/routing_commitment", "metric/routing_largest_cluster"}
  for block, old in zip(stack.blocks, before):
    assert not np.array_equal(np.asarray(block.attn.centroids[...]), old)


# ------------------------------------------------------------------------ checkpoints


def run_config(data_dir, **train_overrides):
  config = lm.get_config("attn=routing,size=test")
  config.data.data_dir = data_dir
  config.train.update(progress=False, **train_overrides)
  return config


def restored_model_state(config, workdir, step):
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = optim.build(config.optim, config.train.steps)
  blueprint = train_state.trace(config, mesh, sharding.rules_for(config.sharding), tx)
  state, _ = checkpoint.Checkpointer(str(workdir / "checkpoints")).restore(
      blueprint.abstract, step=step)
  return state.model_state


def test_resumed_run_continues_with_the_same_centroids(austen_data_dir, tmp_path):
  # Both runs stop at step 20 of 40 (like a preemption), which skips the final validation over
  # the whole split; tests/test_training.py covers that the final evaluation resumes exactly.
  full_dir, split_dir = tmp_path / "full", tmp_path / "split"
  train.train_and_evaluate(run_config(austen_data_dir, steps=40, stop_at_step=20), str(full_dir))
  train.train_and_evaluate(run_config(austen_data_dir, steps=40, stop_at_step=10), str(split_dir))
  train.train_and_evaluate(run_config(austen_data_dir, steps=40, stop_at_step=20), str(split_dir))

  assert train_losses(full_dir) == train_losses(split_dir)  # bitwise, every logged step
  assert train_losses(full_dir)[20] < train_losses(full_dir)[5]  # it learns
  config = run_config(austen_data_dir, steps=40)
  at_10 = restored_model_state(config, split_dir, 10)
  for a, b in zip(jax.tree.leaves(restored_model_state(config, full_dir, 20)),
                  jax.tree.leaves(restored_model_state(config, split_dir, 20))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(at_10), jax.tree.leaves(restored_model_state(config, split_dir,
                                                                               20))):
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # the centroids kept moving


def test_flops_count_full_attention_for_one_cluster_and_stay_flat_with_a_fixed_window():
  dims = attention.Dims(d_model=64, num_heads=4)
  mha = attention.family("mha").module.flops_per_token(
      dims, attention.make_options("mha"), 128, True)
  one_cluster = routing.RoutingAttention.flops_per_token(
      dims, routing.RoutingOptions(local_heads=0, num_clusters=1), 128, True)
  no_key_projection = 2 * 64 * 4 * 16  # routing heads use their queries as keys
  scores = 2 * 4 * 1 * 16  # one centroid score per head
  # MHA counts T/2 keys per causal query, the exact mean is (T + 1)/2: half a key per head.
  np.testing.assert_allclose(one_cluster, mha - no_key_projection + scores + 4 * 16 * 4 * 0.5)

  def per_token(name, seq_len):
    options = dict(num_clusters=seq_len // 512, window=512) if name == "routing" else {}
    return attention.family(name).module.flops_per_token(
        dims, attention.make_options(name, **options), seq_len, True)

  # With w fixed, routing's cost per token stays nearly flat from 4K to 32K (the centroid scores
  # and the local heads' first block are the only T-dependent terms); MHA's grows with T.
  assert per_token("routing", 32768) < 1.05 * per_token("routing", 4096)
  assert per_token("mha", 32768) > 5 * per_token("mha", 4096)
