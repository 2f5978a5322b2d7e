"""The residual block shared by the LM and the ViT, the layer stack that owns shared tensors, and
the stack's cost model (FLOPs per token, decode-time state) from its families' own."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from arch_zoo import attention, sharding
from arch_zoo.attention.base import Context, Dims
from arch_zoo.layers import MLP, LayerNorm, RMSNorm
from arch_zoo.layers.mlp import MLP_KINDS
from arch_zoo.layers.linear import DEFAULT_STDDEV
from arch_zoo.layers.norms import resolve_norm_impl
from arch_zoo.layers.short_conv import ShortConv
from arch_zoo.registry import check_choice

NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
# ``none``: attention-only blocks, ``x + attn(norm(x))`` (Zoology's MQAR models have no MLP).
BLOCK_MLPS = (*MLP_KINDS, "none")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def compute_dtype(name: str):
  """``auto`` is bf16 on accelerators and float32 on CPU (where bf16 matmuls are slow)."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  check_choice("model.dtype", name, ("auto", "float32", "bfloat16"))
  return jnp.dtype(name)


RECOMPUTE_ACTIVATION = ("auto", "always", "never")
SHORT_CONV_DECODE = ("Cached decoding does not support model.short_conv yet (its state would keep "
                     "each layer's last K - 1 inputs); generate with decoder='reference', which "
                     "recomputes the forward pass, or train with model.short_conv=0.")


def recompute_activation(cfg: ConfigDict) -> bool:
  """``model.recompute_activation``: ``auto`` recomputes the MLP activation in the backward pass
  on GPU/TPU, where it saves memory traffic (``layers.mlp.activation``), and not on the CPU, where
  it made the ViT demo's step 7% slower (benchmarks/results/vit_S_cpu_recompute.json)."""
  choice = cfg.recompute_activation
  check_choice("model.recompute_activation", choice, RECOMPUTE_ACTIVATION)
  if choice == "auto":
    return jax.default_backend() != "cpu"
  return choice == "always"


def layer_names(cfg: ConfigDict) -> list[str]:
  """The attention name of each layer: ``layer_pattern`` (comma separated, repeated to fill the
  depth, e.g. ``lightning,lightning,lightning,mha``) or ``attention.name`` everywhere."""
  pattern = [p.strip() for p in cfg.layer_pattern.split(",") if p.strip()] if cfg.layer_pattern \
      else [cfg.attention.name]
  return [pattern[i % len(pattern)] for i in range(cfg.num_layers)]


def attention_options(cfg: ConfigDict, name: str) -> dict[str, Any]:
  """The options of family ``name``'s layers: ``attention`` for the main family,
  ``attention_options.NAME`` for the other families of a hybrid's ``layer_pattern``."""
  attention.family(name)  # an unknown name in layer_pattern lists the registered ones
  if name == cfg.attention.name:
    return {k: v for k, v in cfg.attention.items() if k != "name"}
  if name not in cfg.attention_options:
    raise ValueError(f"model.layer_pattern names {name!r}, which has no options in "
                     f"model.attention_options (it has {', '.join(cfg.attention_options)}); "
                     "build the config after registering the family.")
  return dict(cfg.attention_options[name])


def dims_for(cfg: ConfigDict, layer_index: int) -> Dims:
  return Dims(d_model=cfg.d_model, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
              dtype=compute_dtype(cfg.dtype), layer_index=layer_index, num_layers=cfg.num_layers)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer's attention: its family, its shape arguments and its options (validated)."""

  name: str
  dims: Dims
  options: Any


def layer_specs(cfg: ConfigDict) -> list[LayerSpec]:
  options = {name: attention.make_options(name, **attention_options(cfg, name))
             for name in dict.fromkeys(layer_names(cfg))}
  return [LayerSpec(name, dims_for(cfg, i), options[name])
          for i, name in enumerate(layer_names(cfg))]


def d_ff(cfg: ConfigDict) -> int:
  return cfg.d_ff or 4 * cfg.d_model


def flops_per_token(cfg: ConfigDict, seq_len: int, causal: bool) -> float:
  """Forward matmul FLOPs per token of the block stack: each layer's attention (its family's
  ``flops_per_token``) and MLP."""
  mlp = 0 if cfg.mlp == "none" else MLP.flops_per_token(cfg.d_model, d_ff(cfg), cfg.mlp)
  total = 0.0
  for layer in layer_specs(cfg):
    total += attention.family(layer.name).flops_per_token(layer.dims, layer.options, seq_len,
                                                          causal)
    total += mlp
  return total


def short_conv_size(cfg: ConfigDict) -> int:
  """``model.short_conv``'s kernel size (0: off; configs older than the option have none)."""
  size = cfg.get("short_conv", 0) or 0
  if not isinstance(size, int) or size < 0:
    raise ValueError(f"model.short_conv is a kernel size (0 = off, e.g. 4), got {size!r}.")
  return size


def state_sizes(cfg: ConfigDict) -> list[attention.StateSize]:
  """The decode-time state of each layer's attention (its family's ``state_size``), plus the
  K - 1 inputs a short convolution of kernel K would keep."""
  conv = max(short_conv_size(cfg) - 1, 0) * cfg.d_model
  return [dataclasses.replace(size, fixed=size.fixed + conv) if conv else size
          for size in (attention.family(layer.name).state_size(layer.dims, layer.options)
                       for layer in layer_specs(cfg))]


def dropout(x: jax.Array, rate: float, ctx: Context, salt: int) -> jax.Array:
  if ctx.deterministic or rate == 0.0:
    return x
  if ctx.rng is None:
    raise ValueError("Dropout needs ctx.rng when deterministic=False.")
  keep = jax.random.bernoulli(jax.random.fold_in(ctx.rng, salt), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def make_norm(cfg: ConfigDict):
  """The configured norm of width ``d_model``, with ``model.norm_impl`` for RMSNorm."""
  impl = resolve_norm_impl(cfg.norm_impl, cfg.norm, cfg.d_model)
  if cfg.norm == "rmsnorm":
    return RMSNorm(cfg.d_model, impl=impl)
  return NORMS[cfg.norm](cfg.d_model)


class Block(nnx.Module):
  """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (no MLP with
  ``model.mlp="none"``).

  Each residual add runs together with the norm that reads its result (``add_and_norm``). With
  the fused kernel (``defers_add``) the block returns its MLP branch unadded, for the next
  block's first norm (or the model's final norm) to add: the block takes the stream without the
  previous block's last branch (``pending``). Otherwise the stream leaves the block whole and
  ``pending`` is None, exactly the computation of an unfused pre-norm block.
  """

  def __init__(self, cfg: ConfigDict, layer_index: int, *, rngs: nnx.Rngs):
    dims = dims_for(cfg, layer_index)
    name = layer_names(cfg)[layer_index]
    self.layer_index = layer_index
    self.attention_name = name
    self.dropout_rate = cfg.dropout
    self.attn_norm = make_norm(cfg)
    kernel_size = short_conv_size(cfg)
    self.short_conv = ShortConv(cfg.d_model, kernel_size, rngs=rngs) if kernel_size else None
    self.attn = attention.build(name, rngs=rngs, **dataclasses.asdict(dims),
                                **attention_options(cfg, name))
    self.defers_add = getattr(self.attn_norm, "impl", "xla") == "pallas"
    check_choice("model.mlp", cfg.mlp, BLOCK_MLPS)
    if cfg.mlp == "none":
      self.mlp_norm = self.mlp = None
    else:
      self.mlp_norm = make_norm(cfg)
      self.mlp = MLP(cfg.d_model, d_ff(cfg), kind=cfg.mlp, rngs=rngs,
                     out_stddev=DEFAULT_STDDEV / (2 * cfg.num_layers) ** 0.5, dtype=dims.dtype,
                     recompute_activation=recompute_activation(cfg))

  def __call__(self, x: jax.Array, pending: jax.Array | None, ctx: Context,
               layer_index: jax.Array | int | None = None):
    """``(x, branch, aux)``: the stream is ``x + branch`` (``x + pending`` on the way in); the
    branch is None unless ``defers_add``."""
    # Under scan_layers the index arrives as a scanned array (the stacked block's own attribute
    # is that of layer 0); it only salts dropout.
    index = self.layer_index if layer_index is None else layer_index
    x, h = self.attn_norm.add_and_norm(x, pending)
    if self.short_conv is not None:
      h = self.short_conv(h, ctx.segment_ids)
    y, aux = self.attn(h, ctx)
    y = dropout(y, self.dropout_rate, ctx, 2 * index)
    if self.mlp is None:  # attention-only: its branch is the block's last
      return self._leave(x, y, aux)
    x, h = self.mlp_norm.add_and_norm(x, y)
    branch = dropout(self.mlp(h), self.dropout_rate, ctx, 2 * index + 1)
    return self._leave(x, branch, aux)

  def _leave(self, x: jax.Array, branch: jax.Array, extra):
    axes = ("act_batch", "act_length", "act_embed")
    if not self.defers_add:
      return sharding.constrain(x + branch, axes), None, extra
    return sharding.constrain(x, axes), sharding.constrain(branch, axes), extra

  def decode(self, x: jax.Array, pending: jax.Array | None, ctx: Context, state, *,
             prompt: bool):
    """``(x, branch, state)``: the block's computation with the attention's ``prefill``
    (``prompt``) or ``decode_step`` (evaluation: no dropout)."""
    if self.short_conv is not None:
      raise ValueError(SHORT_CONV_DECODE)
    x, h = self.attn_norm.add_and_norm(x, pending)
    hook = self.attn.prefill if prompt else self.attn.decode_step
    y, state = hook(h, ctx, state)
    if self.mlp is None:
      return self._leave(x, y, state)
    x, h = self.mlp_norm.add_and_norm(x, y)
    return self._leave(x, self.mlp(h), state)


def stack_blocks(blocks: list[Block]) -> Block:
  """One Block whose parameters carry a leading ``layers`` axis, from L blocks built as usual
  (so a scanned model starts from exactly the weights of the unrolled one)."""
  graphdef, first = nnx.split(blocks[0])
  others = [nnx.split(block)[1] for block in blocks[1:]]
  stacked = jax.tree.map(lambda *layers: jnp.stack(layers), first, *others)
  block = nnx.merge(graphdef, stacked)
  for _, var in nnx.iter_graph(block):
    axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
    if axes is not None:
      var.set_metadata(logical_axes=("layers", *axes))
  return block


class Stack(nnx.Module):
  """The blocks, plus cross-layer tensors some families need (passed down via ``ctx.shared``)."""

  def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs):
    check_choice("model.norm", cfg.norm, list(NORMS))
    check_choice("model.remat", cfg.remat, list(REMAT_POLICIES))
    self.remat = cfg.remat
    names = layer_names(cfg)
    shared = {}
    for name in dict.fromkeys(names):
      fam = attention.family(name)
      if fam.shared_factory is not None:
        opts = attention.make_options(name, **attention_options(cfg, name))
        shared[name] = fam.shared_factory(dims_for(cfg, 0), opts, rngs=rngs)
    self.shared = nnx.Dict(shared)
    self.scan_layers = bool(cfg.scan_layers)
    blocks = [Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)]
    if self.scan_layers:
      # One stacked block stands for all layers: only families whose layers differ in parameter
      # values alone (the registry's `scannable`) can be stacked.
      for name in dict.fromkeys(names):
        reason = attention.family(name).scannable
        if reason is not True:
          raise ValueError(f"model.scan_layers=True cannot stack {name} layers: {reason}. It "
                           f"supports {', '.join(attention.names_scannable())}. Set "
                           "model.scan_layers=False.")
      self.num_layers = cfg.num_layers
      self.blocks = stack_blocks(blocks)
    else:
      self.blocks = nnx.List(blocks)

  def __call__(self, x: jax.Array, ctx: Context, final_norm=None):
    """``(stream, aux)``; with ``final_norm``, the stream comes out normalised by it (the last
    residual add fused with it, see ``Block``)."""
    ctx = ctx.replace(shared={name: module() for name, module in self.shared.items()})
    call = _block_call if self.remat == "none" else nnx.remat(
        _block_call, policy=REMAT_POLICIES[self.remat])
    if self.scan_layers:
      # One compiled block body applied L times (lax.scan); aux is stacked over layers and
      # averaged as merge_aux does for the unrolled stack. The carry needs a fixed structure,
      # so with deferred adds the first block adds a zero branch.
      @nnx.scan(in_axes=(nnx.Carry, 0, 0, None), out_axes=(nnx.Carry, 0))
      def body(carry, block, index, ctx):
        x, pending, aux = call(block, *carry, ctx, index)
        return (x, pending), aux

      pending = jnp.zeros_like(x) if self.blocks.defers_add else None
      (x, pending), aux = body((x, pending), self.blocks, jnp.arange(self.num_layers), ctx)
      aux = {k: jnp.mean(jnp.asarray(v, jnp.float32), axis=0) for k, v in aux.items()}
    else:
      pending, per_layer = None, []
      for block in self.blocks:
        x, pending, aux = call(block, x, pending, ctx)
        per_layer.append(aux)
      aux = attention.merge_aux(per_layer)
    if final_norm is not None:
      return final_norm.add_and_norm(x, pending)[1], aux
    return (x if pending is None else x + pending), aux

  def check_decodes(self) -> None:
    """Raises, in one line, when a layer cannot decode."""
    if self.scan_layers:
      raise ValueError("Decoding needs model.scan_layers=False (the decode loop runs the layers "
                       "one by one, each with its own state); build the model with "
                       "model.scan_layers=False.")
    if any(block.short_conv is not None for block in self.blocks):
      raise ValueError(SHORT_CONV_DECODE)
    for name in dict.fromkeys(block.attention_name for block in self.blocks):
      reason = attention.family(name).decode
      if reason is not True:
        raise ValueError(f"Attention {name!r} cannot decode: {reason}. Families that can: "
                         f"{', '.join(attention.names_decoding())}.")

  def init_state(self, batch: int, max_len: int) -> tuple:
    """Each layer's empty decode state."""
    self.check_decodes()
    return tuple(block.attn.init_state(batch, max_len) for block in self.blocks)

  def decode(self, x: jax.Array, ctx: Context, states: tuple, *, prompt: bool, final_norm):
    """``(stream normalised by final_norm, states)``: the layers one after another, each with its
    ``prefill`` (``prompt``) or ``decode_step``; the shared tensors built once for the call."""
    ctx = ctx.replace(shared={name: module() for name, module in self.shared.items()})
    pending, new_states = None, []
    for block, state in zip(self.blocks, states):
      x, pending, state = block.decode(x, pending, ctx, state, prompt=prompt)
      new_states.append(state)
    return final_norm.add_and_norm(x, pending)[1], tuple(new_states)


def _block_call(block: Block, x: jax.Array, pending: jax.Array | None, ctx: Context,
                layer_index=None):
  return block(x, pending, ctx, layer_index)
