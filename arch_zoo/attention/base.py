"""The attention contract shared by every family, and the registry that builds them by name.

Every family is an NNX module called as ``y, aux = attn(x, ctx)``:

* ``x``: ``[B, T, d_model]`` activations (compute dtype).
* ``ctx``: a :class:`Context` with positions, optional segment ids, ``causal``, ``deterministic``,
  an optional PRNG key, and ``shared`` (cross-layer tensors owned by the backbone).
* ``y``: ``[B, T, d_model]``; ``aux``: a flat dict of scalars. ``loss/...`` entries are added to
  the training objective by the backbone (already multiplied by their coefficient), ``metric/...``
  entries are only logged.

A family that decodes (language-model inference) also defines three methods, evaluation only
(deterministic, nothing written to the module):

* ``init_state(batch, max_len) -> state``: its empty decode state, a pytree of arrays with fixed
  shapes, for ``max_len`` slots;
* ``prefill(x, ctx, state) -> (y, state)``: ``x [B, T, d_model]`` is a left-padded prompt in slots
  ``0 .. T-1``; ``y`` is what ``attn(x, ctx)`` gives at each row's valid slots;
* ``decode_step(x, ctx, state) -> (y, state)``: ``x [B, 1, d_model]``, the next token of every
  row, in slot ``ctx.slots.first``.

There ``ctx.slots`` (:class:`DecodeSlots`) says where the tokens sit: each row's first valid slot
(slots before it are padding, never attended to and never part of a recurrent state) and
``ctx.positions`` holds each token's position in its own row (``slot - start``).

A family that can show its attention (head diagnostics, :mod:`arch_zoo.analysis`) defines

* ``attention_weights(x, ctx) -> AttentionWeights`` (:mod:`arch_zoo.attention.weights`): its
  mixing of values as a dense ``[B, H, T, S]`` float32 matrix with the values it mixes, such that
  ``weights @ values`` (times MoH-style gates) is its output before the output projection. It may
  raise ``NotImplementedError`` with the reason for a configuration it cannot show.

Head ablation zeroes a head's output where it enters the output projection: the rows of the
module's ``out`` projection (``[H * head_dim, d_model]``). A family whose output projection is not
such a module attribute defines ``mask_output_heads(ctx, keep [H]) -> ctx``, a context under which
the heads with ``keep == 0`` contribute nothing.

A family registers itself with :func:`register`. Its record (:class:`Family`) is everything the rest
of the code knows about it: the options dataclass whose fields are its config keys and defaults, the
modes it supports, its cost (``flops_per_token``), its decode-time state (``state_size``), whether
its layers can be scanned, its cross-layer tensors, its kernel implementations and its decode
hooks. :func:`register` refuses a family that lacks any of them, naming what is missing. The model
config's ``attention`` sub-config is filled from the option defaults, so a misspelled option fails
loudly, and :func:`build` rejects unknown options with the valid list.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from arch_zoo.registry import Registry, check_choice  # noqa: F401  (re-exported for families)


@struct.dataclass
class DecodeSlots:
  """Where the tokens of a decoding call sit in the layers' decode states (a pytree)."""

  first: jax.Array  # int32 scalar: the slot of x's first token (0 for a prompt)
  start: jax.Array  # [B] int32: each row's first valid slot; earlier slots are left padding

  def slots(self, length: int) -> jax.Array:
    """``[length]`` int32: the slots of x's tokens."""
    return self.first + jnp.arange(length, dtype=jnp.int32)

  def valid(self, length: int) -> jax.Array:
    """``[B, length]`` bool: which of x's tokens are not padding."""
    return self.slots(length)[None, :] >= self.start[:, None]


@struct.dataclass
class Context:
  """Per-call information every attention layer receives (a pytree: safe under jit/remat)."""

  positions: jax.Array  # [B, T] int32 token positions (RoPE, decay exponents).
  segment_ids: jax.Array | None = None  # [B, T] int32; tokens attend only within a segment.
  rng: jax.Array | None = None  # PRNG key for stochastic layers; None when deterministic.
  shared: dict[str, Any] = struct.field(default_factory=dict)  # backbone-owned tensors (MASA).
  slots: DecodeSlots | None = None  # decoding only: see the module docstring
  causal: bool = struct.field(pytree_node=False, default=True)
  deterministic: bool = struct.field(pytree_node=False, default=True)
  # A static bound on the documents (segment runs, padding included) of one packed row, 0 when
  # unknown: cuDNN's packed layout needs it (docs/attention/kernels.md, "Packed rows").
  max_segments: int = struct.field(pytree_node=False, default=0)

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
class StateSize:
  """What one layer must keep in memory to produce the next token (the decode-time state), in
  elements per sequence: ``per_token`` elements for every token of context (a KV cache) plus
  ``fixed`` elements that do not grow with the context (a recurrent state, a rolling window). For
  a context of T tokens the layer holds ``per_token * T + fixed`` elements."""

  per_token: float
  fixed: float = 0.0

  def at(self, length: int) -> float:
    return self.per_token * length + self.fixed


def kv_cache_state_size(dims: Dims, options) -> StateSize:
  """The state of softmax attention that keeps every key and value: ``2 * kv_heads * head_dim``
  elements per token of context (``options.num_kv_heads`` when the family has that option, 0
  meaning ``num_heads``). A family whose decode state is this passes
  ``state_size=kv_cache_state_size`` to :func:`register`."""
  kv = getattr(options, "num_kv_heads", 0) or dims.num_heads
  return StateSize(per_token=2 * kv * dims.head_dim)


@dataclasses.dataclass(frozen=True)
class Family:
  """What the registry knows about one attention family: the whole contract with the rest of the
  code (backbones, configs, provenance, sweeps). :func:`register` fills and checks it."""

  name: str
  module: type  # an nnx.Module subclass: module(dims, options, rngs=...)
  options: type  # frozen dataclass of config options, every field with a default
  bidirectional: bool | str  # True, or the reason the family cannot run without a causal mask
  causal: bool | str = True  # True, or the reason it cannot run causally
  # (dims, options, seq_len, causal) -> forward matmul FLOPs per token of one layer.
  flops_per_token: Callable[[Dims, Any, int, bool], float] | None = None
  # (dims, options) -> StateSize: what one layer keeps to produce the next token.
  state_size: Callable[[Dims, Any], StateSize] | None = None
  # True when its layers differ only in parameter values, so one stacked block can stand for all
  # of them under ``model.scan_layers``; else the reason they cannot be stacked.
  scannable: bool | str | None = None
  # The values its ``impl`` option accepts (the kernels it offers); () when it has no such option.
  impls: tuple[str, ...] = ()
  # Cross-layer tensors the backbone must own (MASA's dictionaries): a function
  # (dims, options, rngs) -> nnx.Module whose call returns the arrays put in ctx.shared[name].
  shared_factory: Callable[..., nnx.Module] | None = None
  # True when its module defines the decode hooks (init_state, prefill, decode_step; see the
  # module docstring), else the reason it cannot decode.
  decode: bool | str = True
  # True when its module defines attention_weights(x, ctx) (see the module docstring), else the
  # reason the head diagnostics cannot see its attention.
  weights: bool | str = True
  summary: str = ""  # the first line of the module's docstring

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

  def problems(self) -> list[str]:
    """What is missing or malformed in this record, each with what to do; [] when complete."""
    out = []
    if not (dataclasses.is_dataclass(self.options) and isinstance(self.options, type)):
      out.append("options: a frozen dataclass whose fields are the config keys with defaults")
    else:
      # Plain defaults only: they become the config's values (a default_factory would not).
      undefaulted = [f.name for f in dataclasses.fields(self.options)
                     if f.default is dataclasses.MISSING]
      if undefaulted:
        out.append(f"options: give every field a plain default (none: {', '.join(undefaulted)})")
      else:
        try:
          self.options()
        except Exception as e:  # noqa: BLE001  any failure means the defaults are not a config
          out.append(f"options: the defaults must be valid, but {self.options.__name__}() "
                     f"raised {type(e).__name__}: {e}")
    for mode in ("causal", "bidirectional"):
      value = getattr(self, mode)
      if value is not True and not (isinstance(value, str) and value):
        out.append(f"{mode}: True, or a string saying why the family cannot run that way")
    if not callable(self.flops_per_token):
      out.append("flops_per_token: a static method flops_per_token(dims, options, seq_len, "
                 "causal) -> forward matmul FLOPs per token of one layer (or "
                 "register(..., flops_per_token=fn))")
    if not callable(self.state_size):
      out.append("state_size: a static method state_size(dims, options) -> StateSize (or "
                 "register(..., state_size=kv_cache_state_size) for a full KV cache)")
    if self.scannable is not True and not (isinstance(self.scannable, str) and self.scannable):
      out.append("scannable: True if its layers differ only in parameter values (model."
                 "scan_layers can stack them), else a string saying why not")
    has_impl = (dataclasses.is_dataclass(self.options)
                and any(f.name == "impl" for f in dataclasses.fields(self.options)))
    if has_impl and not self.impls:
      out.append("impls: the values its impl option accepts, e.g. impls=(\"auto\", \"xla\")")
    elif has_impl and self.defaults()["impl"] not in self.impls:
      out.append(f"impls: {self.impls} lacks the default impl {self.defaults()['impl']!r}")
    elif not has_impl and self.impls:
      out.append(f"impls={self.impls} given, but the options have no impl field to choose them")
    if self.decode is not True and not (isinstance(self.decode, str) and self.decode):
      out.append("decode: define init_state(batch, max_len), prefill(x, ctx, state) and "
                 "decode_step(x, ctx, state) on the module (all three), or none of them")
    if self.shared_factory is not None and not callable(self.shared_factory):
      out.append("shared_factory: a function (dims, options, rngs) -> nnx.Module, or None")
    if not self.summary:
      out.append("summary: a class docstring whose first line says what the family is")
    return out


_FAMILIES: Registry[Family] = Registry("attention name")
DIM_FIELDS = tuple(f.name for f in dataclasses.fields(Dims))


def register(name: str, *, options: type, bidirectional: bool | str, causal: bool | str = True,
             scannable: bool | str | None = None, flops_per_token: Callable | None = None,
             state_size: Callable | None = None, impls: Sequence[str] = (),
             shared_factory: Callable[..., nnx.Module] | None = None):
  """Class decorator that registers an attention family; the arguments are its :class:`Family`
  record. ``flops_per_token`` and ``state_size`` may instead be static methods of the class.
  Whether it decodes is read from the class: the three decode hooks, or none of them.

      @register("mha", options=MHAOptions, bidirectional=True, scannable=True,
                state_size=kv_cache_state_size, impls=("auto", "xla", "cudnn"))

  Raises ValueError, naming every missing or malformed fact, when the record is incomplete."""

  def wrap(module_cls):
    facts = {"flops_per_token": flops_per_token, "state_size": state_size}
    for fact, given in facts.items():
      defined = getattr(module_cls, fact, None)
      if given is not None and defined is not None:
        raise ValueError(f"Attention family {name!r}: {fact} is both a method of "
                         f"{module_cls.__qualname__} and an argument of register(); keep one.")
      facts[fact] = given if given is not None else defined
    doc = (module_cls.__doc__ or "").strip()
    fam = Family(name=name, module=module_cls, options=options, bidirectional=bidirectional,
                 causal=causal, scannable=scannable, impls=tuple(impls),
                 shared_factory=shared_factory, decode=decode_hooks(module_cls),
                 weights=weights_hook(module_cls),
                 summary=doc.splitlines()[0] if doc else "", **facts)
    problems = fam.problems()
    if problems:
      raise ValueError(f"Attention family {name!r} ({module_cls.__qualname__}) is incomplete; "
                       "register() needs:\n  - " + "\n  - ".join(problems))
    _FAMILIES.add(name, fam)
    return module_cls

  return wrap


DECODE_HOOKS = ("init_state", "prefill", "decode_step")


def decode_hooks(module_cls: type) -> bool | str | None:
  """A record's ``decode``: True with all three hooks, a reason without any, None (a problem that
  :meth:`Family.problems` reports) with some."""
  defined = [hook for hook in DECODE_HOOKS if callable(getattr(module_cls, hook, None))]
  if len(defined) == len(DECODE_HOOKS):
    return True
  if not defined:
    return f"its module defines no {', '.join(DECODE_HOOKS)}"
  return None


def weights_hook(module_cls: type) -> bool | str:
  """A record's ``weights``: True when the module defines ``attention_weights``, else why not."""
  if callable(getattr(module_cls, "attention_weights", None)):
    return True
  return "its module defines no attention_weights(x, ctx)"


def names() -> list[str]:
  """All registered attention names."""
  return _FAMILIES.names()


def family(name: str) -> Family:
  return _FAMILIES.get(name)


def names_supporting(causal: bool) -> list[str]:
  return [n for n in _FAMILIES.names() if (_FAMILIES.get(n).causal if causal
                                           else _FAMILIES.get(n).bidirectional) is True]


def names_scannable() -> list[str]:
  return [n for n in _FAMILIES.names() if _FAMILIES.get(n).scannable is True]


def names_with_weights() -> list[str]:
  return [n for n in _FAMILIES.names() if _FAMILIES.get(n).weights is True]


def names_decoding() -> list[str]:
  return [n for n in _FAMILIES.names() if _FAMILIES.get(n).decode is True]


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


def merge_aux(per_layer: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Averages each aux key over the layers that return it (MoH's code averages its loss too)."""
  sums: dict[str, list[jax.Array]] = {}
  for aux in per_layer:
    for key, value in aux.items():
      if not key.startswith(AUX_PREFIXES):
        raise ValueError(f"aux key {key!r} must start with one of {AUX_PREFIXES}.")
      sums.setdefault(key, []).append(jnp.asarray(value, jnp.float32))
  return {k: sum(v) / len(v) for k, v in sums.items()}
