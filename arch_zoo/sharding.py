"""Meshes, logical axis rules and shardings.

Layers name their dimensions logically (``embed``, ``heads``, ``mlp``, ``vocab`` for parameters;
``act_batch``, ``act_length``, ``act_embed``... for activations). A rules preset maps logical
names to the mesh axes ``data``, ``fsdp``, ``context`` and ``tensor``; XLA's SPMD partitioner does
the rest. The same code runs on one CPU, 8 fake CPU devices, a GPU node or a TPU slice.

Presets:

* ``dp``: parameters replicated; the batch split over ``data`` x ``fsdp``.
* ``fsdp``: parameters sharded along ``embed`` (and ``vocab``) over ``fsdp`` (ZeRO-3 style).
* ``fsdp_tp``: as ``fsdp``, plus heads, MLP and vocabulary split over ``tensor`` (Megatron style).

In every preset the residual stream's sequence dimension (``act_length``) is split over
``context`` (size 1 unless ``mesh.context`` says otherwise): context parallelism. Each device
holds its share of the tokens. ``lightning`` passes states between the shards
(``ops.linear.per_shard``); softmax attention gathers keys and values and splits its causal work
evenly (``ops.softmax.context_parallel``); elsewhere, where attention needs the keys and values
of the whole sequence, XLA gathers them, and kernels that XLA cannot partition (cuDNN) see the
whole sequence on each device.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from arch_zoo.registry import check_choice

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH = ("data", "fsdp")  # the batch is split over every data-parallel axis

_COMMON = {"act_batch": BATCH, "act_length": "context", "act_embed": None, "act_heads": None,
           "act_mlp": None, "act_vocab": None, "norm": None, "layers": None, "atoms": None}
RULES: dict[str, dict[str, Any]] = {
    "dp": {**_COMMON, "embed": None, "heads": None, "kv_heads": None, "mlp": None, "vocab": None},
    "fsdp": {**_COMMON, "embed": "fsdp", "heads": None, "kv_heads": None, "mlp": None,
             "vocab": None},
    "fsdp_tp": {**_COMMON, "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
                "mlp": "tensor", "vocab": "tensor", "act_heads": "tensor", "act_mlp": "tensor",
                "act_vocab": "tensor"},
}

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping[str, Any]] | None] = contextvars.ContextVar(
    "arch_zoo_sharding", default=None)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``data x fsdp x context x tensor`` mesh; one size may be -1 (= all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; valid: {', '.join(MESH_AXES)}.")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot fill mesh {dict(zip(MESH_AXES, sizes))}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
        f"{len(devices)} are visible. Set one axis to -1 to use them all.")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules_for(preset: str) -> dict[str, Any]:
  check_choice("sharding.rules", preset, list(RULES))
  return RULES[preset]


def logical_to_spec(logical: Sequence[str | None] | None, rules: Mapping[str, Any],
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
  """Maps logical axis names to a PartitionSpec. A dimension the mesh axis does not divide is
  left replicated (tiny models on many devices), rather than failing."""
  if not logical:
    return P()
  spec = []
  for i, name in enumerate(logical):
    if name is not None and name not in rules:
      raise ValueError(f"Logical axis {name!r} has no sharding rule; known: {sorted(rules)}.")
    target = rules.get(name) if name is not None else None
    if target is not None and mesh is not None:
      axes = (target,) if isinstance(target, str) else tuple(target)
      # Axes of one device split nothing: leaving them out keeps a spec free of them, which
      # kernels' partitioning rules read literally (cuDNN refuses any axis on the sequence).
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      target = (axes[0] if len(axes) == 1 else axes) if axes else None
      size = math.prod(mesh.shape[a] for a in axes)
      if target is not None and shape is not None and shape[i] % size:
        logging.debug("Replicating dim %d (%s, size %d): not divisible by %d", i, name, shape[i],
                      size)
        target = None
    spec.append(target)
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Mapping[str, Any]):
  """NamedShardings for an (abstract) pytree that holds NNX Variables (params, optimizer moments):
  each Variable is sharded by its ``logical_axes``; any other leaf (step counters) is replicated."""

  def one(node):
    if not isinstance(node, nnx.Variable):
      return NamedSharding(mesh, P())
    value = node.get_value()
    axes = node.get_metadata().get("logical_axes")
    if axes is not None and len(axes) != value.ndim:
      raise ValueError(f"logical_axes {axes} do not match shape {value.shape}.")
    return node.replace(NamedSharding(mesh, logical_to_spec(axes, rules, value.shape, mesh)))

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


@contextlib.contextmanager
def use(mesh: Mesh, rules: Mapping[str, Any]):
  """Makes ``constrain`` active while tracing model code."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Mesh, Mapping[str, Any]] | None:
  """The ``(mesh, rules)`` set by ``use``, or None: for custom kernels (Pallas) that XLA cannot
  partition and that must be wrapped in ``shard_map`` themselves."""
  return _ACTIVE.get()


def one_device() -> bool:
  """Whether the computation runs on one device (no active mesh, or a mesh of one): where a
  Pallas call, which XLA cannot partition, can run as it is."""
  active = _ACTIVE.get()
  return active is None or active[0].size == 1


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Sharding hint for an activation; a no-op outside ``use`` (unit tests, single device)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(logical, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def global_batch_from_local(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process host batches into globally sharded arrays (works single-host too)."""
  out = {}
  for key, value in local.items():
    sharding = batch_sharding(mesh, value.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def wait_if_cpu_mesh(result: Any) -> Any:
  """Blocks on ``result`` when running a multi-device program on XLA:CPU.

  XLA:CPU runs every device of a program on one shared thread pool, and its collectives block
  those threads in a rendezvous. Two multi-device programs in flight (async dispatch) can starve
  each other until XLA aborts the process ("Termination timeout for all reduce"). Fake CPU meshes
  (tests, laptops) therefore run one step at a time; GPUs and TPUs keep async dispatch.
  """
  if jax.default_backend() == "cpu" and jax.device_count() > 1:
    jax.block_until_ready(result)
  return result
