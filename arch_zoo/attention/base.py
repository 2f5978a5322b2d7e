"""The attention contract shared by every family, and the registry that builds them by name.

Every family is an NNX module called as ``y, aux = attn(x, ctx)``:

* ``x``: ``[B, T, d_model]`` activations (compute dtype).
* ``ctx``: a :class:`Context` with positions, optional segment ids, ``causal``, ``deterministic``,
  an optional PRNG key, and ``shared`` (cross-layer tensors owned by the backbone).
* ``y``: ``[B, T, d_model]``; ``aux``: a flat dict of scalars. ``loss/...`` entries are added to
  the training objective by the backbone (already multiplied by their coefficient), ``metric/...``
  entries are only logged.

A family registers itself with :func:`register`, giving an options dataclass whose fields are its
config keys and defaults. The model config's ``attention`` sub-config is filled from those defaults,
so a misspelled option fails loudly, and :func:`build` rejects unknown options with the valid list.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from arch_zoo.registry import Registry, check_choice  # noqa: F401  (re-exported for families)


@struct.dataclass
class Context:
  """Per-call information every attention layer receives (a pytree: safe under jit/remat)."""

  positions: jax.Array  # [B, T] int32 token positions (RoPE, decay exponents).
  segment_ids: jax.Array | None = None  # [B, T] int32; tokens attend only within a segment.
  rng: jax.Array | None = None  # PRNG key for stochastic layers; None when deterministic.
  shared: dict[str, Any] = struct.field(default_factory=dict)  # backbone-owned tensors (MASA).
  causal: bool = struct.field(pytree_node=False, default=True)
  deterministic: bool = struct.field(pytree_node=False, default=True)

  @classmethod
  def for_inputs(cls, batch: int, length: int, **kwargs) -> "Context":
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return cls(positions=positions, **kwargs)


@dataclasses.dataclass(frozen=True)
class Dims:
  """Shape and dtype arguments the backbone passes to every family (not config options)."""

  d_model: int
  num_heads: int
  head_dim: int = 0  # 0 -> d_model // num_heads
  dtype: Any = jnp.float32  # compute dtype of matmuls; parameters stay float32
  layer_index: int = 0
  num_layers: int = 1

  def __post_init__(self):
    if self.head_dim == 0:
      if self.d_model % self.num_heads:
        raise ValueError(
            f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
            "set head_dim explicitly or change num_heads.")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)


AUX_PREFIXES = ("loss/", "metric/")


@dataclasses.dataclass(frozen=True)
class Family:
  """What the registry knows about one attention family."""

  name: str
  module: type  # an nnx.Module subclass: module(dims, options, rngs=...)
  options: type  # frozen dataclass of config options with defaults
  bidirectional: bool | str  # True, or the reason the family cannot run without a causal mask
  causal: bool | str = True  # True, or the reason it cannot run causally
  # Cross-layer tensors the backbone must own (MASA's dictionaries): a function
  # (dims, options, rngs) -> nnx.Module whose call returns the arrays put in ctx.shared[name].
  shared_factory: Callable[..., nnx.Module] | None = None
  summary: str = ""

  def defaults(self) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(self.options)}

  def check_mode(self, causal: bool) -> None:
    """Raises at config time when the family cannot run in the requested mode."""
    ok = self.causal if causal else self.bidirectional
    if ok is not True:
      mode = "causal (language model)" if causal else "bidirectional (ViT)"
      reason = ok if isinstance(ok, str) else "not supported"
      raise ValueError(
          f"Attention {self.name!r} cannot be used {mode}: {reason}. "
          f"Pick another attention name; families that can: {', '.join(names_supporting(causal))}.")


_FAMILIES: Registry[Family] = Registry("attention name")
DIM_FIELDS = tuple(f.name for f in dataclasses.fields(Dims))


def register(name: str, *, options: type, bidirectional: bool | str, causal: bool | str = True,
             shared_factory: Callable[..., nnx.Module] | None = None):
  """Class decorator: ``@register("mha", options=MHAOptions, bidirectional=True)``."""

  def wrap(module_cls):
    summary = (module_cls.__doc__ or "").strip().splitlines()[0] if module_cls.__doc__ else ""
    _FAMILIES.add(name, Family(name=name, module=module_cls, options=options,
                               bidirectional=bidirectional, causal=causal,
                               shared_factory=shared_factory, summary=summary))
    return module_cls

  return wrap


def names() -> list[str]:
  """All registered attention names."""
  return _FAMILIES.names()


def family(name: str) -> Family:
  return _FAMILIES.get(name)


def names_supporting(causal: bool) -> list[str]:
  return [n for n in _FAMILIES.names() if (_FAMILIES.get(n).causal if causal
                                           else _FAMILIES.get(n).bidirectional) is True]


def make_options(name: str, **options):
  """Validated options dataclass for ``name``; unknown keys list the valid ones."""
  fam = family(name)
  valid = list(fam.defaults())
  unknown = [k for k in options if k not in valid]
  if unknown:
    raise TypeError(
        f"Unknown option(s) {', '.join(map(repr, unknown))} for attention {name!r}. "
        f"Valid options: {', '.join(valid) or '(none)'}; shape arguments: {', '.join(DIM_FIELDS)}.")
  return fam.options(**options)


def build(name: str, *, rngs: nnx.Rngs | None = None, **options) -> nnx.Module:
  """Builds attention ``name``. ``options`` holds shape arguments (``d_model``, ``num_heads``, ...)
  and the family's config options; anything else is rejected with the valid list."""
  fam = family(name)
  dims = Dims(**{k: options.pop(k) for k in DIM_FIELDS if k in options})
  opts = make_options(name, **options)
  return fam.module(dims, opts, rngs=rngs if rngs is not None else nnx.Rngs(0))


@dataclasses.dataclass(frozen=True)
class StateSize:
  """What one layer must keep in memory to produce the next token (the decode-time state), in
  elements per sequence: ``per_token`` elements for every token of context (a KV cache) plus
  ``fixed`` elements that do not grow with the context (a recurrent state). For a context of T
  tokens the layer holds ``per_token * T + fixed`` elements."""

  per_token: float
  fixed: float = 0.0

  def at(self, length: int) -> float:
    return self.per_token * length + self.fixed


def state_size(name: str, dims: Dims, options) -> StateSize:
  """The decode-time state of one layer of family ``name``. A family defines a static
  ``state_size(dims, options)`` when it differs from the default: softmax attention with a full
  KV cache, ``2 * kv_heads * head_dim`` elements per token (``options.num_kv_heads`` when the
  family has it, 0 meaning ``num_heads``)."""
  module = family(name).module
  if hasattr(module, "state_size"):
    return module.state_size(dims, options)
  kv = getattr(options, "num_kv_heads", 0) or dims.num_heads
  return StateSize(per_token=2 * kv * dims.head_dim)


def merge_aux(per_layer: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Averages each aux key over the layers that return it (MoH's code averages its loss too)."""
  sums: dict[str, list[jax.Array]] = {}
  for aux in per_layer:
    for key, value in aux.items():
      if not key.startswith(AUX_PREFIXES):
        raise ValueError(f"aux key {key!r} must start with one of {AUX_PREFIXES}.")
      sums.setdefault(key, []).append(jnp.asarray(value, jnp.float32))
  return {k: sum(v) / len(v) for k, v in sums.items()}
