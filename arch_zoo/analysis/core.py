"""The analysis of a loaded model: its attention maps, per-head reductions of them, and its loss
with any set of heads switched off, each as one jitted program.

    from arch_zoo import analysis
    run = analysis.load("runs/demo_lm_mha_S")
    maps = run.attention_maps(tokens)            # one AttentionWeights per layer
    entropy = run.per_head(tokens, analysis.metrics.entropy)   # [L, H] arrays
    losses = run.ablation_losses(batch, keeps)   # keeps [N, L, H] -> N losses, one program
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from arch_zoo.analysis.probe import Hooks, collected_list, num_heads, probed
from arch_zoo.attention import AttentionWeights
from arch_zoo.losses import cross_entropy


def forward(graphdef, params, model_state, inputs, *, reduce=None, keep=None, **model_inputs):
  """``(model output, per-layer reductions)`` of the model in evaluation mode, its attention
  probed (:mod:`arch_zoo.analysis.probe`); ``model_inputs``: positions, segment ids."""
  model = nnx.merge(graphdef, params, model_state, copy=True)
  hooks = Hooks(reduce=reduce, keep=keep)
  out, _ = probed(model, hooks)(inputs, **model_inputs)
  return out, collected_list(hooks)


def _full_maps(layer: int, weights: AttentionWeights, x: jax.Array) -> AttentionWeights:
  del layer, x
  return weights


def _per_head(metric: Callable[[jax.Array], Any]):
  def reduce(layer: int, weights: AttentionWeights, x: jax.Array):
    del layer, x
    return metric(weights.probabilities())
  return reduce


@dataclasses.dataclass
class Analysis:
  """A model to analyse: its structure, parameters and other state (and, for a run, its config,
  step and workdir). Every method is one jitted program, compiled once per input shape."""

  graphdef: Any
  params: Any
  model_state: Any
  config: ConfigDict | None = None
  step: int | None = None
  workdir: str | None = None

  @classmethod
  def of(cls, model: nnx.Module, **kwargs) -> "Analysis":
    """From a model in memory (a notebook's, a test's)."""
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return cls(graphdef, params, model_state, **kwargs)

  @classmethod
  def restored(cls, graphdef, state, config: ConfigDict, workdir: str) -> "Analysis":
    """From a restored train state (eval.py's); a scanned model is unstacked."""
    params, model_state = state.params, state.model_state
    if config.model.get("scan_layers"):
      graphdef, params, model_state = unstacked(graphdef, params, model_state, config)
    return cls(graphdef, params, model_state, config, int(state.step), workdir)

  def data(self):
    """The run's data (its validation text or test images), as train.py builds it."""
    from arch_zoo import data as data_lib
    return data_lib.build(self.config, 0, 1)

  def heads(self, settings=None, max_batches: int | None = None) -> dict:
    """Runs the head suite (eval.py --suite heads) into the run's directory; its summary."""
    from arch_zoo.analysis import suite
    return suite.evaluate(self, self.config, self.data(), self.workdir, settings, max_batches)

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params, self.model_state, copy=True)

  @functools.cached_property
  def shape(self) -> tuple[int, int]:
    """``(layers, heads per layer)``."""
    return num_heads(self.model())

  @functools.cached_property
  def _programs(self) -> dict:
    return {}

  @functools.cached_property
  def _reductions(self) -> dict:
    return {}

  def _program(self, key, fn):
    if key not in self._programs:
      self._programs[key] = jax.jit(fn)
    return self._programs[key]

  def reduce(self, inputs, reduce: Callable[[int, AttentionWeights, jax.Array], Any]
             ) -> tuple[jax.Array, list[Any]]:
    """``(model output, [reduce(layer, weights, x) for each layer])`` in one program, compiled
    once per reduction function (and input shape)."""
    program = self._program(("reduce", reduce), functools.partial(
        forward, self.graphdef, reduce=reduce))
    return program(self.params, self.model_state, inputs)

  def attention_maps(self, inputs) -> list[AttentionWeights]:
    """Every layer's :class:`~arch_zoo.attention.AttentionWeights` for ``inputs`` (tokens
    ``[B, T]`` or images ``[B, H, W, C]``): ``[B, H, T, S]`` float32 each."""
    return self.reduce(inputs, _full_maps)[1]

  def per_head(self, inputs, metric: Callable[[jax.Array], Any]) -> Any:
    """``metric(probabilities [B, H, T, S]) -> [H] (or a tuple of them)`` for every layer,
    stacked to ``[L, H]`` numpy arrays."""
    if metric not in self._reductions:
      self._reductions[metric] = _per_head(metric)
    _, per_layer = self.reduce(inputs, self._reductions[metric])
    return jax.tree.map(lambda *layers: np.stack([np.asarray(a) for a in layers]), *per_layer)

  def ablation_losses(self, batch: dict, keeps, chunk: int = 16) -> dict[str, np.ndarray]:
    """The summed loss of ``batch`` (``inputs``, ``targets``, ``weights``) under each head mask
    of ``keeps [N, L, H]`` (1 keeps a head, 0 zeroes its output): ``{"nll_sum" [N],
    "weight_sum", "correct_sum" [N]}``. The masks run ``chunk`` at a time in one vmapped program,
    not one forward per head."""
    keeps = jnp.asarray(keeps, jnp.float32)
    n = keeps.shape[0]
    chunks = -(-n // max(1, min(chunk, n)))
    chunk = -(-n // chunks)  # as even as possible: 17 masks in chunks of 16 run as 2 x 9
    padded = chunks * chunk
    keeps = jnp.concatenate([keeps, jnp.ones((padded - n,) + keeps.shape[1:], jnp.float32)])
    graphdef = self.graphdef

    def losses(params, model_state, batch, keeps):
      def one(keep):
        logits, _ = forward(graphdef, params, model_state, batch["inputs"], keep=keep)
        nll, weight, correct = cross_entropy(logits, batch["targets"], batch["weights"])
        return nll, correct, weight
      chunks = keeps.reshape(-1, chunk, *keeps.shape[1:])
      nll, correct, weight = jax.lax.map(jax.vmap(one), chunks)
      return nll.reshape(-1), correct.reshape(-1), weight.reshape(-1)[0]

    program = self._program(("ablation", chunk), losses)
    nll, correct, weight = program(self.params, self.model_state, batch, keeps)
    return {"nll_sum": np.asarray(nll)[:n], "correct_sum": np.asarray(correct)[:n],
            "weight_sum": float(weight)}


def unstacked(graphdef, params, model_state, config: ConfigDict):
  """``(graphdef, params, model_state)`` of the same model with its layers one by one: a model
  trained with ``model.scan_layers=True`` keeps one stacked block (a leading layer axis); the
  diagnostics look at each layer on its own. Layer i's arrays are slice i of the stacked ones."""
  from arch_zoo import models
  config = ConfigDict(config.to_dict())
  config.model.scan_layers = False
  abstract = nnx.eval_shape(lambda: models.build(config.model, rngs=nnx.Rngs(0)))
  new_graphdef, *abstract_states = nnx.split(abstract, nnx.Param, ...)

  def fill(abstract_state, stacked_state):
    stacked = dict(nnx.to_flat_state(stacked_state))
    out = []
    for path, variable in nnx.to_flat_state(abstract_state):
      if path[:2] == ("stack", "blocks") and isinstance(path[2], int):
        source = stacked[path[:2] + path[3:]]
        value = source[...][path[2]]
      else:
        source = stacked[path]
        value = source[...]
      out.append((path, variable.replace(value)))
    return nnx.from_flat_state(out)

  return (new_graphdef, fill(abstract_states[0], params), fill(abstract_states[1], model_state))


def load(workdir: str, step: int | None = None) -> Analysis:
  """The checkpoint ``step`` (default: the latest) of the train.py run in ``workdir``, ready to
  analyse (a scanned model is unstacked)."""
  from arch_zoo import sharding
  from arch_zoo.runs import load_config, restore
  config = load_config(workdir)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_for(config.sharding)
  state, graphdef = restore(workdir, config, step, mesh, rules)
  return Analysis.restored(graphdef, state, config, workdir)
