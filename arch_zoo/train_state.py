"""The train state's blueprint, from one build of the model, and the state in its sharded layout.

``trace`` builds the model once, abstractly (``jax.make_jaxpr`` of the initialiser): that one build
gives the model's structure (``graphdef``), every array's shape and logical axes, hence its
sharding and the target of a checkpoint restore, and the recorded initialiser, which ``initialize``
then runs under ``jit`` straight into the shardings without building the model again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun
from jax.sharding import Mesh
from ml_collections import ConfigDict

from arch_zoo import models, sharding
from arch_zoo.steps import TrainState


@dataclasses.dataclass(frozen=True)
class Blueprint:
  """The model, built once: what the rest of a run needs to know about its train state."""

  graphdef: Any  # the model's static structure (steps merge it with the params)
  shardings: TrainState  # the sharding of every array, from the parameters' logical axes
  abstract: TrainState  # shape/dtype/sharding structs: the target of a checkpoint restore
  initializer: ClosedJaxpr  # the recorded initialiser of the train state
  placement: str  # where ``initialize`` creates the weights (``init_placement``)

  def initialize(self) -> TrainState:
    """A freshly initialised train state, every array in its sharding."""
    tree = jax.tree.structure(self.abstract)

    def init():
      return jax.tree.unflatten(tree, jaxpr_as_fun(self.initializer)())

    if self.placement == "host":
      with jax.default_device(jax.devices("cpu")[0]):
        return jax.device_put(jax.jit(init)(), self.shardings)
    return jax.jit(init, out_shardings=self.shardings)()


def init_placement(config: ConfigDict) -> str:
  """``train.init``: ``device`` creates the weights already sharded on the accelerators (a model
  larger than one device never exists unsharded); ``host`` creates them with the CPU and copies
  them into their shardings. ``auto`` picks ``host`` on GPUs, where XLA takes ~3 minutes to
  compile the threefry random-number kernels of a 124M-parameter init (measured on an H100, jax
  0.11.2) against seconds on the CPU; the values are identical either way (threefry is
  platform-independent)."""
  choice = config.train.get("init", "auto")
  if choice == "auto":
    return "host" if jax.default_backend() == "gpu" else "device"
  if choice not in ("host", "device"):
    raise ValueError(f"train.init must be auto, host or device; got {choice!r}.")
  return choice


def trace(config: ConfigDict, mesh: Mesh, rules, tx: optax.GradientTransformation) -> Blueprint:
  """Builds the model once (abstractly) and derives the train state's blueprint from it."""
  placement = init_placement(config)
  graphdefs = []

  def init() -> TrainState:
    model = models.build(config.model, rngs=nnx.Rngs(config.seed))
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    graphdefs.append(graphdef)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=model_state)

  with sharding.use(mesh, rules):
    initializer, shapes = jax.make_jaxpr(init, return_shape=True)()
  shardings = sharding.tree_shardings(shapes, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  return Blueprint(graphdefs[0], shardings, abstract, initializer, placement)


def create(config: ConfigDict, mesh: Mesh, rules, tx: optax.GradientTransformation):
  """Returns ``(graphdef, state, state_shardings)`` with every array in its sharding."""
  blueprint = trace(config, mesh, rules, tx)
  return blueprint.graphdef, blueprint.initialize(), blueprint.shardings
