"""Builds the model and the train state directly in their sharded layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from arch_zoo import models, sharding
from arch_zoo.steps import TrainState


def split_model(model_cfg: ConfigDict, seed: int):
  """``(graphdef, params, model_state)`` of a freshly initialised model."""
  model = models.build(model_cfg, rngs=nnx.Rngs(seed))
  return nnx.split(model, nnx.Param, ...)


def graphdef_of(model_cfg: ConfigDict):
  """The static structure of the model, without allocating any weights."""
  model = nnx.eval_shape(lambda: models.build(model_cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model, nnx.Param, ...)[0]


def _initializer(config: ConfigDict, tx: optax.GradientTransformation):

  def init() -> TrainState:
    _, params, model_state = split_model(config.model, config.seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=model_state)

  return init


def shardings_of(config: ConfigDict, mesh: Mesh, rules, tx: optax.GradientTransformation):
  """The sharding of every array of the train state, from the parameters' logical axes."""
  return sharding.tree_shardings(jax.eval_shape(_initializer(config, tx)), mesh, rules)


def create(config: ConfigDict, mesh: Mesh, rules, tx: optax.GradientTransformation):
  """Returns ``(graphdef, state, state_shardings)``; weights are created already sharded, so a
  model larger than one device's memory never exists unsharded."""
  shardings = shardings_of(config, mesh, rules, tx)
  with sharding.use(mesh, rules):
    state = jax.jit(_initializer(config, tx), out_shardings=shardings)()
  return graphdef_of(config.model), state, shardings


def abstract_state(config: ConfigDict, tx: optax.GradientTransformation, shardings) -> TrainState:
  """Shape/dtype/sharding structs of the train state: the target of a checkpoint restore."""
  abstract = jax.eval_shape(_initializer(config, tx))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
