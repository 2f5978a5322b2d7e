"""The ViT backbone: shapes and a falling loss for every attention family that runs bidirectionally,
permutation invariance, bidirectional attention, embeddings against independent references, sizes
and FLOPs against the published figures, and config-time refusal of causal-only families."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention, models, optim, steps
from arch_zoo.attention import base
from arch_zoo.layers import PatchEmbed, sincos_2d_position_embedding
from arch_zoo.layers.embeddings import shift_image
from configs import vit

BIDIRECTIONAL_NAMES = [n for n in attention.names() if attention.family(n).bidirectional is True]


def vit_config(attn="mha", size="test", **model_overrides):
  config = vit.get_config(f"attn={attn},size={size}")
  with config.unlocked():
    config.model.update(model_overrides)
  return config


def build(config, seed=0):
  return models.build(config.model, rngs=nnx.Rngs(seed))


def random_images(config, batch=4, seed=0):
  m = config.model
  return jax.random.normal(jax.random.key(seed), (batch, m.image_size, m.image_size,
                                                  m.num_channels))


@pytest.mark.parametrize("name", BIDIRECTIONAL_NAMES)
def test_logits_shape(name):
  """Both pools, traced only (no compilation): ``(logits[B, classes] float32, aux)``."""
  for pool in ("cls", "gap"):
    config = vit_config(name, pool=pool)

    def run(images):
      return build(config)(images)

    logits, aux = jax.eval_shape(run, random_images(config, batch=3))
    assert logits.shape == (3, config.model.num_classes) and logits.dtype == jnp.float32
    assert all(k.startswith(base.AUX_PREFIXES) and v.shape == () for k, v in aux.items())


def prototype_batch(config, batch, seed):
  """Ten fixed random prototype images, one per class, plus noise: learnable by any ViT."""
  m = config.model
  shape = (m.image_size, m.image_size, m.num_channels)
  prototypes = jax.random.normal(jax.random.key(123), (m.num_classes, *shape))
  k1, k2 = jax.random.split(jax.random.key(seed))
  labels = jax.random.randint(k1, (batch,), 0, m.num_classes, jnp.int32)
  images = prototypes[labels] + 0.5 * jax.random.normal(k2, (batch, *shape))
  return {"inputs": images, "targets": labels, "weights": jnp.ones((batch,), jnp.float32)}


@pytest.mark.parametrize("name", BIDIRECTIONAL_NAMES)
def test_loss_falls(name):
  """The train step of a real run, on an easy task; one compilation per family."""
  config = vit_config(name)
  model = build(config)
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  num_steps = 25
  tx, schedule = optim.build(config.optim, num_steps)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), model_state=model_state)
  train_step = jax.jit(steps.make_train_step(graphdef, tx, schedule, jax.random.key(0)))
  nll = []
  for i in range(num_steps):
    state, metrics = train_step(state, prototype_batch(config, 16, seed=i))
    nll.append(float(metrics["train/nll"]))
    assert all(np.isfinite(v) for v in jax.device_get(metrics).values()), metrics  # aux too
  # Zero-initialised head: the first logits are exactly zero, so the first loss is log(classes).
  np.testing.assert_allclose(nll[0], math.log(config.model.num_classes), rtol=1e-6)
  assert np.mean(nll[-5:]) < nll[0] - 0.5, nll


def permute_patches(images, patch, perm):
  b, h, w, c = images.shape
  g = h // patch
  blocks = images.reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
  blocks = blocks.reshape(b, g * g, patch, patch, c)[:, perm]
  return blocks.reshape(b, g, g, patch, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def test_mha_without_position_embedding_is_invariant_to_patch_order():
  config = vit_config("mha", pool="gap", posemb="none")
  model = build(config)
  # A non-zero head, so that the logits carry the pooled features.
  model.head.kernel[...] = jax.random.normal(jax.random.key(7), model.head.kernel.shape)
  images = random_images(config)
  perm = np.random.default_rng(0).permutation((28 // 7) ** 2)
  permuted = permute_patches(images, 7, perm)
  assert not np.allclose(images, permuted)
  np.testing.assert_allclose(model(images)[0], model(permuted)[0], atol=1e-5, rtol=1e-5)
  # With position embeddings the order matters: the invariance above is not vacuous.
  config = vit_config("mha", pool="gap", posemb="sincos2d")
  model = build(config)
  model.head.kernel[...] = jax.random.normal(jax.random.key(7), model.head.kernel.shape)
  assert not np.allclose(model(images)[0], model(permuted)[0], atol=1e-4)


def test_class_token_attends_to_every_patch():
  """The class token comes first; under a causal mask it would see only itself and the logits
  would not depend on the image at all. Changing only the last patch must change them."""
  config = vit_config("mha", pool="cls")
  model = build(config)
  model.head.kernel[...] = jax.random.normal(jax.random.key(7), model.head.kernel.shape)
  images = random_images(config)
  changed = images.at[:, -7:, -7:, :].add(1.0)
  assert not np.allclose(model(images)[0], model(changed)[0], atol=1e-4)


def test_patch_embedding_equals_a_strided_convolution():
  embed = PatchEmbed(4, 3, 16, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (2, 12, 8, 3))
  kernel = embed.proj.kernel[...].reshape(4, 4, 3, 16)  # (kh, kw, c) order of the flattening
  conv = jax.lax.conv_general_dilated(images, kernel, window_strides=(4, 4), padding="VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  expected = conv.reshape(2, 3 * 2, 16) + embed.proj.bias[...]
  np.testing.assert_allclose(embed(images), expected, atol=1e-5, rtol=1e-5)


def test_sincos_position_embedding_encodes_row_and_column():
  h, w, f = 3, 5, 16
  pe = np.asarray(sincos_2d_position_embedding(h, w, f))
  assert pe.shape == (h * w, f)
  # Each (sin, cos) pair has unit norm: every position has squared norm f / 2.
  np.testing.assert_allclose((pe ** 2).sum(axis=1), f / 2, rtol=1e-5)
  rows, cols = np.divmod(np.arange(h * w), w)
  # The first half depends only on the column, the second only on the row.
  for r in range(h):
    np.testing.assert_allclose(pe[rows == r, : f // 2], pe[rows == 0, : f // 2], atol=1e-6)
  for c in range(w):
    np.testing.assert_allclose(pe[cols == c, f // 2:], pe[cols == 0, f // 2:], atol=1e-6)
  # The lowest frequency is 1 (temperature^0): channel 0 is sin(column), channel f/2 sin(row).
  np.testing.assert_allclose(pe[:, 0], np.sin(cols), atol=1e-6)
  np.testing.assert_allclose(pe[:, f // 2], np.sin(rows), atol=1e-6)
  # All positions are distinct.
  assert len({tuple(np.round(p, 5)) for p in pe}) == h * w


def abstract_param_count(config):
  model = nnx.eval_shape(lambda: build(config))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_demo_size_splits_its_batches_over_the_two_cpu_devices_it_asks_for():
  """Size S (the 2-core CPU demo) names the cpu2 flag set: a fresh JAX then shows two CPU devices,
  and the train and eval batches split evenly over them (the data-parallel mesh requires it)."""
  config = vit.get_config("attn=mha,size=S")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  probe = ("from arch_zoo import perf; import sys; perf.apply_xla_flags(sys.argv[1]); "
           "import jax; print(jax.device_count())")
  out = subprocess.run([sys.executable, "-c", probe, config.train.xla_flags], env=env,
                       capture_output=True, text=True, check=True)
  devices = int(out.stdout.split()[-1])
  assert devices == 2
  assert config.train.batch_size % devices == 0 and config.eval.batch_size % devices == 0


@pytest.mark.parametrize("size,published", [("Ti/16", 5.7e6), ("S/16", 22.1e6), ("B/16", 86.6e6)])
def test_standard_sizes_match_the_published_parameter_counts(size, published):
  """DeiT Table 1 (Ti 5M... as timm's 5.7M, S 22M) and ViT Table 1 (B 86M), for ImageNet's
  1000 classes. Ours lacks the class token, learned position embedding (GAP + sin-cos) and the
  attention/MLP biases of those models: under 0.5% of the parameters."""
  config = vit_config(size=size)
  assert config.model.num_classes == 1000 and config.model.image_size == 224
  count = abstract_param_count(config)
  assert abs(count - published) / published < 0.01, count


def test_flops_per_image_of_vit_b16_match_timm():
  """timm's model card for vit_base_patch16_224 gives 17.6 GMACs per image (class token, 197
  tokens): 35.2 GFLOPs forward, matmuls only."""
  config = vit_config(size="B/16", pool="cls")
  flops = models.vit.flops_per_image(config.model)
  assert flops["tokens"] == 197
  assert abs(flops["forward_flops_per_image"] - 2 * 17.6e9) / (2 * 17.6e9) < 0.01
  assert flops["train_flops_per_image"] == 3 * flops["forward_flops_per_image"]


@pytest.fixture
def causal_only_family(monkeypatch):
  """A family registered for this test only, that refuses bidirectional use."""
  mha = attention.family("mha")
  fam = base.Family(name="causal_only", module=mha.module, options=mha.options,
                    bidirectional="its cumulative state only runs left to right")
  monkeypatch.setitem(base._FAMILIES._entries, "causal_only", fam)
  return fam


def test_causal_only_family_is_refused_at_config_time(causal_only_family):
  with pytest.raises(ValueError) as err:
    vit.get_config("attn=causal_only,size=test")
  message = str(err.value)
  assert "cannot be used bidirectional" in message
  assert "left to right" in message and "mha" in message  # the reason and what can be used


def test_causal_only_family_in_a_layer_pattern_is_refused(causal_only_family):
  config = vit_config("mha", layer_pattern="mha,causal_only")
  with pytest.raises(ValueError, match="left to right"):
    build(config)


def test_bad_choices_list_the_valid_ones():
  with pytest.raises(ValueError, match="cls, gap"):
    build(vit_config(pool="mean"))
  with pytest.raises(ValueError, match="learned, sincos2d, none"):
    build(vit_config(posemb="rope"))
  with pytest.raises(ValueError, match="patch, shifted_patch"):
    build(vit_config(tokenizer="spt"))
  with pytest.raises(ValueError, match="Ti/16"):
    vit.get_config("attn=mha,size=L/16")
  with pytest.raises(ValueError, match="not a multiple of model.patch_size"):
    build(vit_config(patch_size=5))
  config = vit_config()
  with pytest.raises(ValueError, match=r"expects images \[B, 28, 28, 1\]"):
    build(config)(jnp.zeros((2, 32, 32, 1)))


def test_label_smoothing_changes_the_objective_not_the_reported_nll():
  config = vit_config("mha")
  graphdef, params, model_state = nnx.split(build(config), nnx.Param, ...)
  model = nnx.merge(graphdef, params, model_state)
  model.head.kernel[...] = jax.random.normal(jax.random.key(7), model.head.kernel.shape)
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  tx, schedule = optim.build(config.optim, 10)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), model_state=model_state)
  batch = prototype_batch(config, 16, seed=0)
  plain = steps.make_train_step(graphdef, tx, schedule, jax.random.key(0))(state, batch)[1]
  smoothed = steps.make_train_step(graphdef, tx, schedule, jax.random.key(0),
                                   label_smoothing=0.1)(state, batch)[1]
  assert float(smoothed["train/nll"]) == float(plain["train/nll"])
  assert float(smoothed["train/loss"]) != float(plain["train/loss"])


def test_shift_image_translates_and_zero_fills():
  image = jnp.arange(1, 13, dtype=jnp.float32).reshape(1, 3, 4, 1)
  down_right = np.asarray(shift_image(image, 1, 2))[0, ..., 0]
  np.testing.assert_array_equal(down_right, [[0, 0, 0, 0], [0, 0, 1, 2], [0, 0, 5, 6]])
  up_left = np.asarray(shift_image(image, -1, -1))[0, ..., 0]
  np.testing.assert_array_equal(up_left, [[6, 7, 8, 0], [10, 11, 12, 0], [0, 0, 0, 0]])


def test_shifted_patch_tokens_see_the_neighbouring_patches():
  """Shifted Patch Tokenization: a patch's token changes when a pixel of the next patch, within
  half a patch of the border, changes; with plain patches it does not. Same token count."""
  images = jax.random.normal(jax.random.key(2), (1, 8, 8, 1))
  changed = images.at[0, 0, 4, 0].add(5.0)  # first column of the second patch of the first row
  for shifted, moves_first_token in ((False, False), (True, True)):
    embed = PatchEmbed(4, 1, 16, rngs=nnx.Rngs(0), shifted=shifted)
    before, after = embed(images), embed(changed)
    assert before.shape == (1, 4, 16)
    assert (not np.allclose(before[0, 0], after[0, 0])) == moves_first_token
    np.testing.assert_allclose(before[0, 3], after[0, 3], atol=1e-6)  # far away: unchanged
  assert embed.proj.kernel.shape == (5 * 4 * 4, 16) and embed.norm is not None
