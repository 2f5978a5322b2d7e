"""Hooks on a model's attention layers: what each layer's attention looks like, and the model with
chosen heads switched off.

Both work on a merged model (``nnx.merge`` inside a jitted function, or a model a notebook holds):
:func:`probed` puts a :class:`Probe` in place of every block's attention. A probe calls the layer as
the model would and, where asked,

* reads the layer's :class:`~arch_zoo.attention.AttentionWeights` (the family's
  ``attention_weights(x, ctx)`` on the very input and context the layer received) and hands them
  to a reduction, whose result is collected per layer (full maps, or a few numbers per head);
* zeroes the output of heads where it enters the output projection (``keep [L, H]``, 0 = off):
  the rows of the layer's ``out`` projection, or the family's ``mask_output_heads``. This is
  linear in ``keep``, so :func:`jax.vmap` over a batch of masks ablates many heads in one
  program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from arch_zoo import attention

# reduce(layer_index, weights, x) -> any pytree of arrays, collected per layer.
Reduce = Callable[[int, attention.AttentionWeights, jax.Array], Any]


@dataclasses.dataclass
class Hooks:
  """What the probes of one call do (a plain Python object: probes hold it, jit never sees it)."""

  reduce: Reduce | None = None
  keep: jax.Array | None = None  # [L, H]; 1 keeps a head, 0 zeroes its output
  collected: dict[int, Any] = dataclasses.field(default_factory=dict)


class MaskedProjection(nnx.Module):
  """An output projection whose input heads are scaled by ``keep [H]`` first."""

  def __init__(self, projection: nnx.Module, keep: jax.Array):
    self.projection, self.keep = projection, keep

  def __call__(self, o: jax.Array) -> jax.Array:
    heads = self.keep.shape[0]
    rows = jnp.repeat(self.keep, o.shape[-1] // heads).astype(o.dtype)
    return self.projection(o * rows)


def ablation_reason(attn: nnx.Module) -> str | None:
  """None when the heads of ``attn`` can be switched off, else why not."""
  if isinstance(getattr(attn, "out", None), nnx.Module) or callable(
      getattr(attn, "mask_output_heads", None)):
    return None
  return (f"{type(attn).__name__} has neither an output projection `out` nor "
          "mask_output_heads(ctx, keep) (see arch_zoo/attention/base.py)")


class Probe(nnx.Module):
  """Stands in for one layer's attention; see the module docstring."""

  def __init__(self, inner: nnx.Module, layer: int, hooks: Hooks):
    self.inner, self.layer, self.hooks = inner, layer, hooks

  def __call__(self, x: jax.Array, ctx: attention.Context):
    inner, hooks = self.inner, self.hooks
    call_ctx = ctx
    if hooks.keep is not None:
      keep = hooks.keep[self.layer]
      reason = ablation_reason(inner)
      if reason is not None:
        raise NotImplementedError(f"head ablation: {reason}")
      if isinstance(getattr(inner, "out", None), nnx.Module):
        projection = inner.out
        inner.out = MaskedProjection(projection, keep)
        try:
          y, aux = inner(x, ctx)
        finally:
          inner.out = projection
      else:
        call_ctx = inner.mask_output_heads(ctx, keep)
        y, aux = inner(x, call_ctx)
    else:
      y, aux = inner(x, ctx)
    if hooks.reduce is not None:
      hooks.collected[self.layer] = hooks.reduce(self.layer, weights_of(inner, x, ctx), x)
    return y, aux


def weights_of(attn: nnx.Module, x: jax.Array, ctx: attention.Context
               ) -> attention.AttentionWeights:
  """``attn.attention_weights(x, ctx)``, or one clear error saying why the family has none."""
  if not callable(getattr(attn, "attention_weights", None)):
    raise NotImplementedError(f"{type(attn).__name__} defines no attention_weights(x, ctx); "
                              f"families that do: {', '.join(attention.names_with_weights())}")
  return attn.attention_weights(x, ctx)


def blocks_of(model: nnx.Module) -> list[nnx.Module]:
  """The model's blocks, in order (an LM or a ViT: anything with a ``stack`` of blocks)."""
  stack = getattr(model, "stack", None)
  if stack is None:
    raise ValueError(f"{type(model).__name__} has no block stack to analyse; the head "
                     "diagnostics read the LM and the ViT of arch_zoo.models.")
  if stack.scan_layers:
    raise ValueError("The head diagnostics look at each layer on its own, which a scanned stack "
                     "(model.scan_layers=True) does not have; restore the run with "
                     "arch_zoo.analysis.load(workdir), which unstacks it.")
  return list(stack.blocks)


def num_heads(model: nnx.Module) -> tuple[int, int]:
  """``(layers, heads per layer)``."""
  blocks = blocks_of(model)
  heads = {_heads(b.attn.inner if isinstance(b.attn, Probe) else b.attn) for b in blocks}
  if len(heads) != 1:
    raise ValueError(f"layers with different head counts {sorted(heads)}")
  return len(blocks), heads.pop()


def _heads(attn) -> int:
  if hasattr(attn, "num_heads"):
    return int(attn.num_heads)
  if hasattr(attn, "qkv"):
    return int(attn.qkv.num_heads)
  raise ValueError(f"{type(attn).__name__}: cannot tell its number of heads")


def probed(model: nnx.Module, hooks: Hooks) -> nnx.Module:
  """Puts a :class:`Probe` around every block's attention of ``model`` (in place; use on a
  merged copy) and returns the model."""
  for index, block in enumerate(blocks_of(model)):
    inner = block.attn.inner if isinstance(block.attn, Probe) else block.attn
    block.attn = Probe(inner, index, hooks)
  return model


def collected_list(hooks: Hooks) -> list[Any]:
  return [hooks.collected[i] for i in sorted(hooks.collected)]
