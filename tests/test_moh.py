"""Mixture-of-Head attention: the oracles of spec section 2.9 against MHA and an independent
float64 reference, the balance loss, router gradients, causality, and training through train.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train
from arch_zoo import attention, metrics
from arch_zoo.attention import moh
from arch_zoo.attention.base import Context
from tests.helpers import build_lm, lm_config, random_tokens
from tests.test_mha import naive_attention

D_MODEL, HEADS, HEAD_DIM = 32, 4, 8


def build_moh(seed=0, num_heads=HEADS, **options):
  return attention.build("moh", rngs=nnx.Rngs(seed), d_model=D_MODEL, num_heads=num_heads,
                         head_dim=HEAD_DIM, **options)


def routers(attn):
  return [m for m in (attn.router.routed, attn.router.shared, attn.router.groups) if m is not None]


def zero_routers(attn):
  for router in routers(attn):
    router.kernel[...] = jnp.zeros_like(router.kernel[...])


def mha_with_weights_of(attn, num_kv_heads=0, **options):
  """An MHA layer holding the same query/key/value/output weights as the MoH layer ``attn``."""
  mha = attention.build("mha", rngs=nnx.Rngs(99), d_model=D_MODEL, head_dim=HEAD_DIM,
                        num_heads=attn.router.num_heads, num_kv_heads=num_kv_heads, **options)
  for name in ("query", "key", "value"):
    getattr(mha.qkv, name).kernel[...] = getattr(attn.qkv, name).kernel[...]
  mha.out.kernel[...] = attn.out.kernel[...]
  return mha


def inputs(batch=2, length=7, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, D_MODEL))


# ------------------------------------------------------------------------- reduction to MHA


# (num_shared_heads, top_k) with every head active: all shared; all routed; one shared head (its
# gate is a constant, no W_s); and a mixed split with top_k equal to the routed heads.
ALL_ACTIVE_SPLITS = [(HEADS, 0), (0, HEADS), (1, HEADS - 1), (2, 2)]


@pytest.mark.parametrize("split,causal,num_kv_heads", [
    *[(split, causal, 0) for split in ALL_ACTIVE_SPLITS for causal in (True, False)],
    ((2, 2), True, 2), ((2, 2), False, 2),  # grouped-query heads
])
def test_all_heads_active_with_zero_routers_equals_mha_bitwise(split, causal, num_kv_heads):
  """Spec 2.9-1/2: uniform router outputs make every code-form gate exactly 1."""
  num_shared, top_k = split
  attn = build_moh(num_shared_heads=num_shared, top_k=top_k, num_kv_heads=num_kv_heads)
  zero_routers(attn)
  mha = mha_with_weights_of(attn, num_kv_heads=num_kv_heads)
  x = inputs()
  ctx = Context.for_inputs(2, 7, causal=causal, deterministic=False)
  y, aux = attn(x, ctx)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(mha(x, ctx)[0]))
  assert float(aux["metric/moh_active_fraction"]) == 1.0

  # Gradients with respect to the shared Q/K/V/O weights are equal too (task loss only).
  def task_grads(module):
    graphdef, params = nnx.split(module, nnx.Param)

    def loss(params):
      return jnp.sum(nnx.merge(graphdef, params)(x, ctx)[0] ** 2)

    grads = jax.grad(loss)(params)
    return {name: grads["qkv"][name]["kernel"][...] for name in ("query", "key", "value")} | {
        "out": grads["out"]["kernel"][...]}

  ours, theirs = task_grads(attn), task_grads(mha)
  for name in theirs:
    np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(theirs[name]), err_msg=name)


# ------------------------------------------------------------------------- independent reference


def softmax(z):
  z = z - z.max()
  return np.exp(z) / np.exp(z).sum()


def reference_gates(x, attn, num_shared, top_k, normalization):
  """The gate equations of spec 2.2 (code) and 2.3 (paper), token by token in float64."""
  weights = {name: np.asarray(getattr(attn.router, name).kernel[...], np.float64)
             for name in ("routed", "shared", "groups") if getattr(attn.router, name) is not None}
  num_heads = attn.router.num_heads
  code = normalization == "code"
  tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  out = np.zeros((len(tokens), num_heads))
  for n, token in enumerate(tokens):
    routed = shared = None
    if top_k:
      p = softmax(token @ weights["routed"])
      chosen = np.argsort(-p, kind="stable")[:top_k]
      routed = np.zeros_like(p)
      routed[chosen] = p[chosen]
      if code:
        routed = top_k * routed / routed.sum()
    if num_shared:
      shared = softmax(token @ weights["shared"]) if num_shared > 1 else np.ones(1)
      if code:
        shared = num_shared * shared
    if routed is None:
      out[n] = shared
    elif shared is None:
      out[n] = routed
    else:
      alpha = softmax(token @ weights["groups"]) * (2.0 if code else 1.0)
      out[n] = np.concatenate([alpha[0] * shared, alpha[1] * routed])
  return out.reshape(*x.shape[:-1], num_heads)


@pytest.mark.parametrize("normalization", ["code", "paper"])
@pytest.mark.parametrize("split", [(2, 1), (1, 2), (0, 2), (HEADS, 0)])
@pytest.mark.parametrize("causal", [True, False])
def test_layer_matches_float64_reference(normalization, split, causal):
  num_shared, top_k = split
  attn = build_moh(seed=3, num_shared_heads=num_shared, top_k=top_k,
                   normalization=normalization, rope=False)
  x = inputs(seed=4)
  y, _ = attn(x, Context.for_inputs(2, 7, causal=causal))
  gates = reference_gates(x, attn, num_shared, top_k, normalization)
  xn = np.asarray(x, np.float64)
  q, k, v = ((xn @ np.asarray(getattr(attn.qkv, n).kernel[...])).reshape(2, 7, HEADS, HEAD_DIM)
             for n in ("query", "key", "value"))
  heads = naive_attention(q, k, v, causal) * gates[..., None]
  expected = heads.reshape(2, 7, -1) @ np.asarray(attn.out.kernel[...], np.float64)
  np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(attn.router(x).gates, gates, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_shared,top_k", [(2, 2), (1, 3), (3, 1), (0, 3)])
def test_gate_sums_and_number_of_active_heads(num_shared, top_k):
  """Spec 2.9-3/4 (code form): shared gates sum to h_s * alpha_1, routed to k * alpha_2,
  alpha_1 + alpha_2 = 2, and exactly h_s + k gates are non-zero for every token."""
  attn = build_moh(seed=5, num_heads=6, num_shared_heads=num_shared, top_k=top_k)
  gates = np.asarray(attn.router(inputs(batch=3, length=11, seed=6)).gates, np.float64)
  np.testing.assert_array_equal((gates > 0).sum(-1), num_shared + top_k)
  shared_sum, routed_sum = gates[..., :num_shared].sum(-1), gates[..., num_shared:].sum(-1)
  alphas = (shared_sum / num_shared if num_shared else 0) + routed_sum / top_k
  np.testing.assert_allclose(alphas, 2.0 if num_shared else 1.0, rtol=1e-5)


def test_paper_form_gates_are_softmax_weights():
  """Paper form: alpha_1 + alpha_2 = 1, shared gates sum to alpha_1, routed gates are alpha_2
  times the (not renormalised) router probabilities of the chosen heads."""
  attn = build_moh(seed=7, num_heads=6, num_shared_heads=2, top_k=2, normalization="paper")
  routing = attn.router(inputs(seed=8))
  gates, probs, mask = (np.asarray(a, np.float64) for a in routing)
  alpha_routed = gates[..., 2:].sum(-1) / (probs * mask).sum(-1)
  np.testing.assert_allclose(gates[..., :2].sum(-1) + alpha_routed, 1.0, rtol=1e-5)
  np.testing.assert_allclose(gates[..., 2:], alpha_routed[..., None] * probs * mask, rtol=1e-5,
                             atol=1e-7)


def test_unselected_heads_get_no_gradient_from_that_token():
  """Spec 2.9-4: the output rows of a head a token did not choose get no gradient from it."""
  attn = build_moh(seed=9, num_heads=6, num_shared_heads=1, top_k=2, rope=False)
  x = inputs(batch=1, length=5, seed=10)
  ctx = Context.for_inputs(1, 5, causal=False)
  token = 3
  active = np.asarray(attn.router(x).gates[0, token] > 0)
  graphdef, params = nnx.split(attn, nnx.Param)
  grad = jax.grad(lambda p: nnx.merge(graphdef, p)(x, ctx)[0][0, token].sum())(params)
  per_head = np.abs(np.asarray(grad["out"]["kernel"][...])).reshape(6, HEAD_DIM, D_MODEL)
  per_head = per_head.sum(axis=(1, 2))
  assert np.all(per_head[~active] == 0.0) and np.all(per_head[active] > 0), (active, per_head)


def test_joint_permutation_of_routed_heads_leaves_output_unchanged():
  """Spec 2.9-7: routed heads are exchangeable; permuting their Q/K/V columns, W_o rows and
  router columns together permutes nothing in the output."""
  attn = build_moh(seed=11, num_heads=6, num_shared_heads=2, top_k=2)
  x = inputs(seed=12)
  ctx = Context.for_inputs(2, 7)
  before = attn(x, ctx)[0]
  routed_perm = np.array([2, 0, 3, 1])
  heads = np.concatenate([np.arange(2), 2 + routed_perm])
  columns = (heads[:, None] * HEAD_DIM + np.arange(HEAD_DIM)).reshape(-1)
  for name in ("query", "key", "value"):
    kernel = getattr(attn.qkv, name).kernel
    kernel[...] = kernel[...][:, columns]
  attn.out.kernel[...] = attn.out.kernel[...][columns]
  attn.router.routed.kernel[...] = attn.router.routed.kernel[...][:, routed_perm]
  np.testing.assert_allclose(attn(x, ctx)[0], before, atol=1e-6, rtol=1e-5)


def test_bidirectional_without_rope_is_permutation_equivariant():
  attn = build_moh(seed=13, num_heads=6, num_shared_heads=2, top_k=2, rope=False)
  x = inputs(seed=14)
  ctx = Context.for_inputs(2, 7, causal=False)
  perm = np.array([4, 0, 6, 1, 5, 3, 2])
  np.testing.assert_allclose(attn(x, ctx)[0][:, perm], attn(x[:, perm], ctx)[0], atol=1e-5,
                             rtol=1e-5)


# ------------------------------------------------------------------------- balance loss


@pytest.mark.parametrize("normalization,expected", [("code", 2.0), ("paper", 2.0 / 4)])
def test_balance_loss_under_uniform_routing_is_k(normalization, expected):
  """Spec 2.9-5: W_r = 0 gives P_j = 1/h_r, and sum_j f_j = k whatever the tie-breaking, so the
  code's loss is k exactly (the paper's k / h_r), times the coefficient."""
  attn = build_moh(num_heads=6, num_shared_heads=2, top_k=2, normalization=normalization,
                   balance_loss_coef=0.5)
  zero_routers(attn)
  _, aux = attn(inputs(), Context.for_inputs(2, 7, deterministic=False))
  np.testing.assert_allclose(aux["loss/moh_balance"], 0.5 * expected, rtol=1e-6)


def test_balance_loss_grows_from_uniform_to_collapsed_routing():
  """Every token with the same router preference, sharpened from uniform (temperature 0) to
  one-hot: the loss (code form) rises from k to h_r. Derivation: all tokens choose the same k
  heads, so f is 1 on them and the loss is h_r times their probability mass, which grows from
  k / h_r to 1."""
  num_routed, top_k = 6, 2
  preference = jnp.array([3.0, 1.0, 0.5, 0.0, -1.0, -2.0])
  values = []
  for temperature in (0.0, 0.5, 1.0, 2.0, 5.0, 100.0):
    probs = jnp.broadcast_to(jax.nn.softmax(temperature * preference), (2, 9, num_routed))
    _, chosen = jax.lax.top_k(probs, top_k)
    mask = jax.nn.one_hot(chosen, num_routed).sum(-2)
    values.append(float(moh.balance_loss(probs, mask, "code")))
  np.testing.assert_allclose(values[0], top_k, rtol=1e-6)
  np.testing.assert_allclose(values[-1], num_routed, rtol=1e-6)
  assert all(a < b for a, b in zip(values, values[1:])), values


def test_balance_loss_only_in_training_and_output_unchanged():
  """Spec 2.9-9: evaluation drops the loss and computes the same output."""
  attn = build_moh(num_heads=6, num_shared_heads=2, top_k=2)
  x = inputs()
  y_train, aux_train = attn(x, Context.for_inputs(2, 7, deterministic=False))
  y_eval, aux_eval = attn(x, Context.for_inputs(2, 7, deterministic=True))
  assert "loss/moh_balance" in aux_train and "loss/moh_balance" not in aux_eval
  np.testing.assert_array_equal(np.asarray(y_train), np.asarray(y_eval))


def test_no_balance_loss_without_routed_heads():
  attn = build_moh(num_shared_heads=HEADS, top_k=0)
  _, aux = attn(inputs(), Context.for_inputs(2, 7, deterministic=False))
  assert not any(k.startswith("loss/") for k in aux)


# ------------------------------------------------------------------------- router gradients


@pytest.mark.parametrize("normalization", ["code", "paper"])
def test_gradients_reach_every_router_map(normalization):
  """W_r, W_s and W_h all receive gradient from the task loss (through the gates), and W_r also
  from the balance loss alone."""
  attn = build_moh(seed=15, num_heads=6, num_shared_heads=2, top_k=2, normalization=normalization)
  x = inputs(seed=16)
  ctx = Context.for_inputs(2, 7, deterministic=False)
  graphdef, params = nnx.split(attn, nnx.Param)

  def losses(params):
    y, aux = nnx.merge(graphdef, params)(x, ctx)
    return jnp.sum(y ** 2), aux["loss/moh_balance"]

  task_grad = jax.grad(lambda p: losses(p)[0])(params)["router"]
  balance_grad = jax.grad(lambda p: losses(p)[1])(params)["router"]
  for name in ("routed", "shared", "groups"):
    assert np.abs(np.asarray(task_grad[name]["kernel"][...])).max() > 0, name
  assert np.abs(np.asarray(balance_grad["routed"]["kernel"][...])).max() > 0


# ------------------------------------------------------------------------- usage metrics


def test_head_frequencies_per_layer_are_reported_and_consistent():
  config = lm_config("moh", d_model=48, num_heads=6, num_shared_heads=2, top_k=3)
  model = build_lm(config)
  _, aux = model(random_tokens(2, 16, 256), deterministic=False, rng=jax.random.key(0))
  for layer in range(config.model.num_layers):
    freq = np.array([float(aux[f"metric/moh_head_frequency/l{layer:02d}/h{h:02d}"])
                     for h in range(6)])
    np.testing.assert_array_equal(freq[:2], 1.0)  # shared heads are always on
    np.testing.assert_allclose(freq[2:].sum(), 3.0, rtol=1e-6)  # sum_j f_j = k
  np.testing.assert_allclose(aux["metric/moh_active_fraction"], 5 / 6, rtol=1e-6)
  assert "loss/moh_balance" in aux


# ------------------------------------------------------------------------- options and FLOPs


@pytest.mark.parametrize("num_heads,expected", [(2, (1, 1)), (4, (2, 1)), (6, (3, 2)),
                                                (12, (6, 3)), (32, (16, 8))])
def test_default_split_is_half_shared_and_75_percent_active(num_heads, expected):
  # 32 heads -> 16 shared + top-8 of 16: MoH-LLaMA3-8B's published split.
  assert moh.head_split(num_heads, moh.MoHOptions()) == expected


@pytest.mark.parametrize("options,message", [
    (dict(num_shared_heads=5), "exceeds num_heads=4"),
    (dict(num_shared_heads=1, top_k=4), "exceeds the 3 routed heads"),
    (dict(num_shared_heads=1, top_k=0), "top_k=0 leaves the 3 routed heads unused"),
    (dict(top_k=-2), "must be >= 0, or -1"),
    (dict(normalization="mixed"), "Valid: code, paper"),
    (dict(balance_loss_coef=-1.0), "must be >= 0"),
])
def test_bad_options_fail_clearly(options, message):
  with pytest.raises(ValueError, match=message):
    build_moh(**options)


def test_flops_count_active_heads_and_reduce_to_mha():
  dims = attention.Dims(d_model=768, num_heads=12)
  mha_flops = attention.family("mha").module.flops_per_token(
      dims, attention.make_options("mha"), 1024, True)
  flops = attention.family("moh").module.flops_per_token
  every_head = attention.make_options("moh", num_shared_heads=4, top_k=8)
  router = 2 * 768 * (8 + 4 + 2)
  assert flops(dims, every_head, 1024, True) == mha_flops + router
  default = attention.make_options("moh")  # 6 shared + top-3 of 6: 9 of 12 heads
  assert flops(dims, default, 1024, True) < mha_flops


# ------------------------------------------------------------------------- the language model


def test_lm_is_causal_with_real_routing():
  """Spec 2.9-6 with routing that actually chooses (1 shared + top-2 of 3), train and eval."""
  config = lm_config("moh", num_heads=4, num_shared_heads=1, top_k=2)
  model = build_lm(config)
  tokens = random_tokens(2, 24, 256)
  perturbed = tokens.at[:, 13:].set((tokens[:, 13:] + 7) % 256)
  for deterministic in (True, False):
    before, _ = model(tokens, deterministic=deterministic, rng=jax.random.key(0))
    after, _ = model(perturbed, deterministic=deterministic, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(before[:, :13]), np.asarray(after[:, :13]))


def training_config(data_dir, **train_overrides):
  config = lm_config("moh", num_heads=4)  # default split: 2 shared + top-1 of 2 routed
  config.data.data_dir = data_dir
  config.train.update(progress=False, **train_overrides)
  return config


def train_rows(workdir):
  """Logged training metrics, without the wall-clock throughput."""
  return [{k: v for k, v in row.items() if k != "train/throughput"}
          for row in metrics.read_metrics(workdir) if "train/loss" in row]


def test_trains_through_train_py_and_logs_routing(austen_data_dir, tmp_path):
  final = train.train_and_evaluate(
      training_config(austen_data_dir, steps=60, log_every=5, eval_every=0), str(tmp_path))
  rows = train_rows(str(tmp_path))
  assert rows[-1]["train/nll"] < rows[0]["train/nll"] - 1.0, rows
  assert final["loss"] < np.log(256) - 1.0
  last = rows[-1]
  assert 0 < last["train/loss/moh_balance"] < 0.01 * 2 + 1e-6  # at most beta * h_r (collapse)
  for layer in range(2):
    assert last[f"train/metric/moh_head_frequency/l{layer:02d}/h00"] == 1.0
    routed = [last[f"train/metric/moh_head_frequency/l{layer:02d}/h{h:02d}"] for h in (2, 3)]
    np.testing.assert_allclose(sum(routed), 1.0, rtol=1e-6)  # top-1 of 2


def test_resume_is_exact(austen_data_dir, tmp_path):
  full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
  full = train.train_and_evaluate(training_config(austen_data_dir), full_dir)
  assert train.train_and_evaluate(training_config(austen_data_dir, stop_at_step=10),
                                  split_dir) == {"step": 10}
  resumed = train.train_and_evaluate(training_config(austen_data_dir), split_dir)
  assert train_rows(full_dir) == train_rows(split_dir)  # every logged metric, bitwise
  assert resumed["loss"] == full["loss"]


def test_sharded_training_step_equals_single_device():
  """The balance loss and usage metrics are means over the global batch, so a step on a
  data x fsdp x tensor mesh computes what one device computes."""
  from arch_zoo import optim, sharding, steps, train_state

  def one_step(mesh_shape, rules, devices):
    config = lm_config("moh", d_model=64, num_heads=4, num_shared_heads=1, top_k=2)
    mesh = sharding.make_mesh(mesh_shape, devices)
    rules = sharding.rules_for(rules)
    tx, schedule = optim.build(config.optim, 10)
    graphdef, state, shardings = train_state.create(config, mesh, rules, tx)
    step = jax.jit(steps.make_train_step(graphdef, tx, schedule, jax.random.key(0)),
                   in_shardings=(shardings, None), out_shardings=(shardings, None))
    tokens = np.asarray(random_tokens(8, 33, 256, seed=2))
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": np.ones((8, 32), np.float32)}
    with sharding.use(mesh, rules):
      state, step_metrics = sharding.wait_if_cpu_mesh(
          step(state, sharding.global_batch_from_local(local, mesh)))
    return state, jax.device_get(step_metrics)

  ref_state, ref_metrics = one_step({"data": 1}, "dp", jax.devices()[:1])
  state, step_metrics = one_step({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp", jax.devices())
  for key in ("train/loss", "train/loss/moh_balance", "train/metric/moh_head_frequency/l01/h02"):
    np.testing.assert_allclose(step_metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
