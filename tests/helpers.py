"""Small utilities shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arch_zoo import attention, metrics, models
from arch_zoo.attention.base import DIM_FIELDS
from configs import lm


def lm_config(attn: str = "mha", size: str = "test", **model_overrides):
  config = lm.get_config(f"attn={attn},size={size}")
  with config.unlocked():
    for key, value in model_overrides.items():
      if key in config.model.attention:
        config.model.attention[key] = value
      else:
        config.model[key] = value
  return config


def build_lm(config, seed: int = 0):
  return models.build(config.model, rngs=nnx.Rngs(seed))


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, dtype=jnp.int32)


def build_attention(name: str, seed: int = 0, **kwargs):
  """One attention layer outside a backbone, plus the ``ctx.shared`` it reads: what the Stack
  would build for a family with a ``shared_factory`` (MASA's atoms), else ``{}``."""
  rngs = nnx.Rngs(seed)
  attn = attention.build(name, rngs=rngs, **kwargs)
  fam = attention.family(name)
  if fam.shared_factory is None:
    return attn, {}
  dims = attention.Dims(**{k: kwargs[k] for k in DIM_FIELDS if k in kwargs})
  options = attention.make_options(name, **{k: v for k, v in kwargs.items()
                                            if k not in DIM_FIELDS})
  return attn, {name: fam.shared_factory(dims, options, rngs=rngs)()}


def train_losses(workdir) -> dict[int, float]:
  """``{step: train/loss}`` of every logged step of a train.py run."""
  return {row["step"]: row["train/loss"] for row in metrics.read_metrics(str(workdir))
          if "train/loss" in row}


def lm_loss_and_grads(attn: str = "mha", **model_overrides):
  """The next-token loss of a fixed batch and its gradients for the ``test``-size LM, jitted: for
  tests that a setting leaves the function unchanged."""
  model = build_lm(lm_config(attn, **model_overrides))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = random_tokens(2, 16, 256, seed=5)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
  return jax.jit(jax.value_and_grad(loss))(params)


def assert_same_loss_and_grads(got, want):
  (got_loss, got_grads), (want_loss, want_grads) = got, want
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def train_tiny_lm(workdir: str, data_dir: str, attn: str = "mha") -> str:
  """A 4-step run of the test-size LM in ``workdir`` (for tests that need a checkpoint)."""
  import train
  from configs import lm
  config = lm.get_config(f"attn={attn},size=test")
  config.data.data_dir = data_dir
  config.train.update(progress=False, steps=4, eval_every=0, checkpoint_every=0)
  train.train_and_evaluate(config, workdir)
  return workdir
