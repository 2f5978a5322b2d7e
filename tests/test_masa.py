"""MASA (spec section 6): parameter accounting against the paper's formula, the untied/tied MHA
oracles, the gradient identity of shared atoms, initialisation, sharding and training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train
from arch_zoo import attention, optim, provenance, sharding, steps, train_state
from arch_zoo.attention import masa
from arch_zoo.attention.base import Context, Dims
from arch_zoo.layers.linear import DEFAULT_STDDEV
from tests.helpers import build_attention, build_lm, lm_config, random_tokens, train_losses

SHARED_TYPES = {"qkvo": ("query", "key", "value", "out"), "qkv": ("query", "key", "value")}


# ----------------------------------------------------------------------------- helpers

def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_params(model, pure):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def mha_params_from_masa(masa_pure, num_layers: int, shared: str):
  """An untied mha model's parameters whose layer-l weights are masa's synthesised W_l; every
  parameter outside attention is copied unchanged."""
  pure = jax.tree.map(lambda a: a, masa_pure)
  atoms = pure["stack"].pop("shared")["masa"]["atoms"]
  for layer in range(num_layers):
    attn = pure["stack"]["blocks"][layer]["attn"]
    coefficients = attn.pop("coefficients")
    w = {name: masa.synthesize(c, atoms[name]) for name, c in coefficients.items()}
    attn["qkv"] = {name: {"kernel": w[name]} for name in ("query", "key", "value")}
    if "out" in w:
      attn["out"] = {"kernel": w["out"]}
  return pure


def lm_loss(model, tokens):
  logits, _ = model(tokens[:, :-1])
  nll, count, _ = steps.cross_entropy(logits, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape))
  return nll / count


def param_grads(model, tokens):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    return lm_loss(nnx.merge(graphdef, params, rest), tokens)

  return nnx.to_pure_dict(jax.grad(loss)(params))


def stack_output(model, tokens, causal: bool):
  """The block stack on embedded tokens, causal (LM) or bidirectional (as the ViT calls it)."""
  ctx = Context.for_inputs(*tokens.shape, causal=causal)
  return model.stack(model.embed(tokens), ctx)[0]


def masa_and_mha(num_layers=3, num_atoms=0, shared="qkvo", coefficient_init="one_hot", **model):
  config = lm_config("masa", num_layers=num_layers, num_atoms=num_atoms, shared=shared,
                     coefficient_init=coefficient_init, **model)
  masa_model = build_lm(config, seed=1)
  mha_model = build_lm(lm_config("mha", num_layers=num_layers, **model), seed=2)
  load_params(mha_model, mha_params_from_masa(params_of(masa_model), num_layers, shared))
  return masa_model, mha_model


# ----------------------------------------------------------------------------- registry, options

def test_registered_for_both_modes_with_a_backbone_owned_dictionary():
  fam = attention.family("masa")
  assert fam.causal is True and fam.bidirectional is True
  assert fam.shared_factory is not None
  assert "masa" in attention.names_supporting(causal=True)
  assert "masa" in attention.names_supporting(causal=False)


@pytest.mark.parametrize("num_layers,expected", [(12, 4), (24, 8), (6, 2), (2, 1), (1, 1)])
def test_default_num_atoms_is_a_third_of_the_layers(num_layers, expected):
  dims = Dims(d_model=32, num_heads=2, num_layers=num_layers)
  assert masa.num_atoms(dims, masa.MASAOptions()) == expected


def test_bad_options_fail_with_the_valid_choices():
  with pytest.raises(ValueError, match="qkvo, qkv"):
    attention.build("masa", d_model=32, num_heads=2, shared="qk")
  with pytest.raises(ValueError, match="random_unit, one_hot"):
    attention.build("masa", d_model=32, num_heads=2, coefficient_init="zeros")
  with pytest.raises(ValueError, match="num_atoms must be >= 1"):
    attention.build("masa", d_model=32, num_heads=2, num_atoms=-2)
  with pytest.raises(TypeError, match="num_atoms"):
    attention.build("masa", d_model=32, num_heads=2, atoms=2)


def test_a_layer_without_its_atoms_says_how_to_provide_them():
  attn = attention.build("masa", d_model=32, num_heads=2)
  with pytest.raises(ValueError, match=r"ctx.shared\['masa'\].*shared_factory"):
    attn(jnp.ones((1, 4, 32)), Context.for_inputs(1, 4))


# ----------------------------------------------------------------------------- parameter count

def attention_formula(num_layers, num_atoms, d_model, num_heads, num_kv_heads, shared):
  """The paper's count: sum over shared types of S d_in d_out + L S; unshared outputs stay
  L d_in d_out."""
  head_dim = d_model // num_heads
  width_q, width_kv = num_heads * head_dim, (num_kv_heads or num_heads) * head_dim
  shapes = {"query": (d_model, width_q), "key": (d_model, width_kv),
            "value": (d_model, width_kv), "out": (width_q, d_model)}
  total = 0
  for name, (d_in, d_out) in shapes.items():
    if name in SHARED_TYPES[shared]:
      total += num_atoms * d_in * d_out + num_layers * num_atoms
    else:
      total += num_layers * d_in * d_out
  return total


def abstract_counts(attn, **model):
  config = lm_config(attn, **model)
  model = nnx.eval_shape(lambda: build_lm(config))
  return provenance.parameter_counts(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("num_layers,num_atoms,d_model,num_heads,num_kv_heads,shared", [
    (12, 4, 64, 4, 0, "qkvo"),
    (12, 4, 64, 4, 0, "qkv"),
    (6, 2, 48, 4, 2, "qkvo"),  # GQA: K and V atoms are narrower
    (3, 3, 32, 2, 0, "qkvo"),
    (4, 1, 32, 2, 1, "qkv"),  # MQA, a single atom
    (8, 5, 96, 6, 0, "qkvo"),
])
def test_attention_parameters_match_the_paper_formula(num_layers, num_atoms, d_model, num_heads,
                                                      num_kv_heads, shared):
  model = dict(num_layers=num_layers, d_model=d_model, num_heads=num_heads,
               num_kv_heads=num_kv_heads)
  ours = abstract_counts("masa", num_atoms=num_atoms, shared=shared, **model)
  untied = abstract_counts("mha", **model)
  assert ours["attention"] == attention_formula(num_layers, num_atoms, d_model, num_heads,
                                                num_kv_heads, shared)
  assert untied["attention"] == attention_formula(num_layers, num_layers, d_model, num_heads,
                                                  num_kv_heads, "qkvo") - 4 * num_layers ** 2
  # Nothing outside attention changed.
  assert ours["total"] - ours["attention"] == untied["total"] - untied["attention"]


def test_the_papers_700M_attention_count_and_transformer_s_reductions():
  # "226.5M -> 75M attention parameters" (L = 24, d = 1536, default S = L/3 = 8).
  big = dict(num_layers=24, d_model=1536, num_heads=16)
  assert round(abstract_counts("mha", **big)["attention"] / 1e6, 1) == 226.5
  assert round(abstract_counts("masa", **big)["attention"] / 1e6, 1) == 75.5
  # Transformer-S (L = 12): S = 2/4/6/8 removes 83.3/66.7/50/33.3% (QKVO), 62.5/50/37.5/25% (QKV).
  small = dict(num_layers=12, d_model=768, num_heads=12)
  untied = abstract_counts("mha", **small)["attention"]
  paper = {"qkvo": (83.3, 66.7, 50.0, 33.3), "qkv": (62.5, 50.0, 37.5, 25.0)}
  for shared, reductions in paper.items():
    for s, reduction in zip((2, 4, 6, 8), reductions):
      ours = abstract_counts("masa", num_atoms=s, shared=shared, **small)["attention"]
      assert round(100 * (1 - ours / untied), 1) == reduction, (shared, s)


# ----------------------------------------------------------------------------- oracles

@pytest.mark.parametrize("num_layers,num_atoms,shared,num_kv_heads", [
    (3, 3, "qkvo", 0),  # S = L, C = I: an untied mha model
    (3, 3, "qkv", 2),  # S = L with per-layer outputs, GQA
    (3, 1, "qkvo", 0),  # S = 1: every layer has the same weights (ALBERT-style tied attention)
])
@pytest.mark.parametrize("causal", [True, False])
def test_one_hot_coefficients_are_exactly_mha_with_weights_taken_from_the_atoms(
    num_layers, num_atoms, shared, num_kv_heads, causal):
  masa_model, mha_model = masa_and_mha(num_layers, num_atoms, shared, num_kv_heads=num_kv_heads)
  tokens = random_tokens(2, 16, 256, seed=3)
  np.testing.assert_array_equal(stack_output(masa_model, tokens, causal),
                                stack_output(mha_model, tokens, causal))
  np.testing.assert_array_equal(masa_model(tokens)[0], mha_model(tokens)[0])


def test_masa_built_from_an_untied_mha_model_reproduces_it_and_its_gradients():
  """The other direction: stack a trained-looking mha model's weights into S = L atoms."""
  num_layers = 3
  mha_model = build_lm(lm_config("mha", num_layers=num_layers), seed=5)
  masa_model = build_lm(lm_config("masa", num_layers=num_layers, num_atoms=num_layers,
                                  coefficient_init="one_hot"), seed=6)
  pure = params_of(mha_model)
  blocks = pure["stack"]["blocks"]
  kernels = {name: [blocks[l]["attn"]["qkv"][name]["kernel"] for l in range(num_layers)]
             for name in ("query", "key", "value")}
  kernels["out"] = [blocks[l]["attn"]["out"]["kernel"] for l in range(num_layers)]
  for l in range(num_layers):
    blocks[l]["attn"] = {"coefficients": params_of(masa_model)["stack"]["blocks"][l]["attn"][
        "coefficients"]}
  pure["stack"]["shared"] = {"masa": {"atoms": {n: jnp.stack(k) for n, k in kernels.items()}}}
  load_params(masa_model, pure)

  tokens = random_tokens(2, 17, 256, seed=7)
  np.testing.assert_array_equal(masa_model(tokens)[0], mha_model(tokens)[0])
  masa_grads, mha_grads = param_grads(masa_model, tokens), param_grads(mha_model, tokens)
  atom_grads = masa_grads["stack"]["shared"]["masa"]["atoms"]
  for l in range(num_layers):
    mha_attn = mha_grads["stack"]["blocks"][l]["attn"]
    for name in ("query", "key", "value"):
      np.testing.assert_array_equal(atom_grads[name][l], mha_attn["qkv"][name]["kernel"])
    np.testing.assert_array_equal(atom_grads["out"][l], mha_attn["out"]["kernel"])


@pytest.mark.parametrize("shared", ["qkvo", "qkv"])
def test_atom_gradients_sum_every_layers_weight_gradient(shared):
  """dL/dD_s = sum_l C_ls dL/dW_l and dL/dC_ls = <D_s, dL/dW_l>, with dL/dW_l taken from an
  untied mha model that holds the synthesised weights (an independent forward and backward)."""
  num_layers, num_atoms = 4, 3
  masa_model, mha_model = masa_and_mha(num_layers, num_atoms, shared,
                                       coefficient_init="random_unit")
  tokens = random_tokens(2, 17, 256, seed=4)
  np.testing.assert_allclose(lm_loss(masa_model, tokens), lm_loss(mha_model, tokens), rtol=1e-6)
  masa_grads, mha_grads = param_grads(masa_model, tokens), param_grads(mha_model, tokens)
  masa_pure = params_of(masa_model)
  atoms = masa_pure["stack"]["shared"]["masa"]["atoms"]
  for name in SHARED_TYPES[shared]:
    expected_atom_grad = np.zeros(atoms[name].shape)
    for l in range(num_layers):
      mha_attn = mha_grads["stack"]["blocks"][l]["attn"]
      w_grad = np.asarray(mha_attn["out"]["kernel"] if name == "out"
                          else mha_attn["qkv"][name]["kernel"], np.float64)
      c = np.asarray(masa_pure["stack"]["blocks"][l]["attn"]["coefficients"][name], np.float64)
      contribution = c[:, None, None] * w_grad[None]
      # Every layer's weight gradient reaches every atom it uses (random_unit: all of them).
      assert np.all(np.linalg.norm(contribution.reshape(num_atoms, -1), axis=1) > 0)
      expected_atom_grad += contribution
      coefficient_grad = np.einsum("sio,io->s", np.asarray(atoms[name], np.float64), w_grad)
      np.testing.assert_allclose(
          masa_grads["stack"]["blocks"][l]["attn"]["coefficients"][name], coefficient_grad,
          rtol=1e-4, atol=1e-6 * np.abs(coefficient_grad).max())
    got = masa_grads["stack"]["shared"]["masa"]["atoms"][name]
    np.testing.assert_allclose(got, expected_atom_grad, rtol=1e-4,
                               atol=1e-6 * np.abs(expected_atom_grad).max())


def test_weight_synthesis_is_linear_in_the_coefficients():
  keys = jax.random.split(jax.random.key(0), 3)
  atoms = jax.random.normal(keys[0], (4, 8, 6))
  c, c2 = jax.random.normal(keys[1], (4,)), jax.random.normal(keys[2], (4,))
  np.testing.assert_allclose(masa.synthesize(2.5 * c - 0.5 * c2, atoms),
                             2.5 * masa.synthesize(c, atoms) - 0.5 * masa.synthesize(c2, atoms),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(masa.synthesize(c, atoms),
                             np.einsum("s,sio->io", np.asarray(c, np.float64),
                                       np.asarray(atoms, np.float64)), rtol=1e-5, atol=1e-6)


def test_bidirectional_stack_without_rope_is_permutation_equivariant():
  model = build_lm(lm_config("masa", num_layers=3, num_atoms=2, rope=False))
  x = jax.random.normal(jax.random.key(8), (2, 6, 32))
  perm = np.array([3, 0, 5, 1, 4, 2])
  ctx = Context.for_inputs(2, 6, causal=False)
  np.testing.assert_allclose(model.stack(x, ctx)[0][:, perm], model.stack(x[:, perm], ctx)[0],
                             atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- initialisation

def test_random_unit_coefficients_give_each_layer_the_untied_weight_variance():
  num_layers, num_atoms, d = 6, 2, 64
  model = build_lm(lm_config("masa", num_layers=num_layers, num_atoms=num_atoms, d_model=d,
                             num_heads=4))
  pure = params_of(model)
  atoms = pure["stack"]["shared"]["masa"]["atoms"]
  coefficients = [pure["stack"]["blocks"][l]["attn"]["coefficients"] for l in range(num_layers)]
  for name in ("query", "key", "value", "out"):
    c = np.stack([np.asarray(layer[name]) for layer in coefficients])
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-6)
    assert len({tuple(np.round(row, 6)) for row in c}) == num_layers  # layers start distinct
    # The untied mha init: N(0, 0.02^2), outputs N(0, (0.02 / sqrt(2 L))^2).
    untied_std = DEFAULT_STDDEV / (2 * num_layers) ** 0.5 if name == "out" else DEFAULT_STDDEV
    for row in c:
      w = masa.synthesize(jnp.asarray(row), atoms[name])
      # 4096 i.i.d. entries: the sample std is within 5% with overwhelming probability.
      np.testing.assert_allclose(np.std(w), untied_std, rtol=0.05)


def test_one_hot_coefficients_pick_atom_l_mod_s():
  dims = dict(d_model=32, num_heads=2, num_layers=5)
  for layer in range(5):
    attn, _ = build_attention("masa", layer_index=layer, num_atoms=2, coefficient_init="one_hot",
                              **dims)
    for c in attn.coefficients.values():
      np.testing.assert_array_equal(c[...], np.eye(2)[layer % 2])


# ----------------------------------------------------------------------------- sharding, training

def one_train_step(config, mesh_shape, rules, devices):
  mesh = sharding.make_mesh(mesh_shape, devices)
  rules = sharding.rules_for(rules)
  tx, schedule = optim.build(config.optim, 10)
  graphdef, state, shardings = train_state.create(config, mesh, rules, tx)
  step = jax.jit(steps.make_train_step(graphdef, tx, schedule, jax.random.key(0)),
                 in_shardings=(shardings, None), out_shardings=(shardings, None))
  tokens = np.asarray(random_tokens(8, 33, 256, seed=9))
  local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((8, 32))}
  with sharding.use(mesh, rules):
    state, step_metrics = sharding.wait_if_cpu_mesh(
        step(state, sharding.global_batch_from_local(local, mesh)))
  return state, step_metrics


def test_atoms_shard_like_projection_kernels_and_the_sharded_step_matches_one_device():
  config = lm_config("masa", num_layers=2, num_atoms=2, d_model=64, num_heads=4)
  ref_state, ref_metrics = one_train_step(config, {"data": 1}, "dp", jax.devices()[:1])
  state, step_metrics = one_train_step(config, {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp",
                                       jax.devices())
  atoms = state.params["stack"]["shared"]["masa"]["atoms"]
  spec = jax.sharding.PartitionSpec
  assert atoms["query"][...].sharding.spec == spec(None, "fsdp", "tensor")
  assert atoms["out"][...].sharding.spec == spec(None, "tensor", "fsdp")
  assert atoms["query"][...].addressable_shards[0].data.shape == (2, 32, 32)
  coefficients = state.params["stack"]["blocks"][0]["attn"]["coefficients"]["query"][...]
  assert coefficients.sharding.spec == spec(None)
  np.testing.assert_allclose(step_metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_weight_decay_applies_to_atoms_not_coefficients():
  model = build_lm(lm_config("masa", num_layers=3, num_atoms=2))
  mask = optim.decay_mask(params_of(model))
  assert all(jax.tree.leaves(mask["stack"]["shared"]))
  assert not any(jax.tree.leaves(mask["stack"]["blocks"][0]["attn"]))


def test_trains_through_train_py_and_resumes_exactly(austen_data_dir, tmp_path):
  def config(**train_overrides):
    cfg = lm_config("masa", num_layers=3)
    cfg.data.data_dir = austen_data_dir
    cfg.eval.batch_size = 512  # the final validation reads all of Persuasion: fewer, larger calls
    cfg.train.update(steps=30, log_every=5, eval_every=0, checkpoint_every=10, progress=False,
                     **train_overrides)
    return cfg

  full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
  full = train.train_and_evaluate(config(), full_dir)
  assert train.train_and_evaluate(config(stop_at_step=10), split_dir) == {"step": 10}
  resumed = train.train_and_evaluate(config(), split_dir)

  assert train_losses(full_dir) == train_losses(split_dir)  # bitwise, every logged step
  assert resumed["loss"] == full["loss"]
  assert train_losses(full_dir)[30] < train_losses(full_dir)[5] - 0.5, train_losses(full_dir)
  info = json.load(open(tmp_path / "full" / "run_info.json"))
  assert info["parameters"]["attention"] == attention_formula(3, 1, 32, 2, 0, "qkvo")
