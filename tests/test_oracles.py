"""Every attention family against its float64 NumPy oracle (``tests/oracles.py``), written from
the paper's equations and fed the module's own weights: the whole layer output, its aux losses,
and the gradients of both with respect to the input and to every weight.

The modules are built through the public API only (``attention.build``, ``attention.Context``,
``nnx.state``), with settings under which every part of the mathematics matters: several lightning
blocks, a dynamic-mask window shorter than the sequence and a bias that does not cancel, MoH's
top-k of several routed heads, routing with several clusters whose windows select, MASA's atoms,
GQA, causal and bidirectional.

Gradients are checked without reusing the module's code: the module's ``jax.grad`` of a scalar
(the output against fixed random weights, and each aux loss) along one random direction per
tensor, against the central finite difference of the float64 oracle along that direction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention
from tests import oracles
from tests.helpers import build_attention

BATCH = 2
# Forward tolerance, relative to the largest output. The module runs float32 (unit roundoff
# 6e-8); with the weights drawn below every activation is O(1), and the deepest chains (a
# 32-term softmax or decayed sum, a normalisation, two 32-wide matmuls) accumulate a few 1e-7
# relative: measured worst case 4.4e-7 over the cases below. 5e-6 leaves a margin of 10 and is
# still 10^4 times smaller than the effect of the planted bugs this file was checked against (a
# wrong feature map, norm axis, gate, bias form or score source moves outputs by 5-100% of their
# scale).
FORWARD_RTOL = 5e-6
# Directional derivatives: float32 gradients against float64 central differences (step 1e-5 on a
# unit direction: truncation error ~1e-10, rounding ~1e-11, both negligible). The float32 backward
# is accurate to ~1e-7 of the gradient's norm: measured worst case 1.5e-6 (MASA's two-element
# coefficient vectors), 3.4e-5 relative to a small derivative. A derivative passes within
# 2e-5 |grad| |u| (|u| = 1) plus 1e-4 of its value; a random direction's derivative is typically
# 2e-3 to 6e-2 of |grad|, so a wrong gradient term of 1% of it still fails.
GRAD_ATOL, GRAD_RTOL, FD_STEP = 2e-5, 1e-4, 1e-5
# A discrete choice (top-k, argmax, top-w) is trusted only if its margin exceeds this: float32
# rounding (~1e-6 on O(1) scores) and the finite-difference step (1e-5) cannot flip it.
MIN_MARGIN = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
  name: str  # the family
  length: int
  causal: bool
  options: dict[str, Any]  # passed to attention.build (dims and family options)
  training: bool = False  # ctx.deterministic=False: aux losses, state updates
  id: str = ""

  def __str__(self):
    return self.id or self.name


CASES = [
    # mha: GQA (4 query heads on 2 KV heads), RoPE; QK-norm in the bidirectional case.
    Case("mha", 24, True, dict(d_model=32, num_heads=4, num_kv_heads=2), id="mha-causal-gqa"),
    Case("mha", 24, False, dict(d_model=32, num_heads=4, num_kv_heads=2, qk_norm=True),
         id="mha-bidirectional-gqa-qknorm"),
    # moh: 2 shared + top-2 of 4 routed heads (code form), 1 shared + top-2 of 5 (no W_s), the
    # paper form; training mode for the balance loss.
    Case("moh", 24, True, dict(d_model=24, num_heads=6, num_kv_heads=3, num_shared_heads=2,
                               top_k=2), training=True, id="moh-causal-code"),
    Case("moh", 24, False, dict(d_model=24, num_heads=6, num_shared_heads=1, top_k=2,
                                normalization="paper", rope=False), training=True,
         id="moh-bidirectional-paper-one-shared"),
    Case("moh", 24, True, dict(d_model=24, num_heads=6, num_shared_heads=2, top_k=3,
                               qk_norm=True), id="moh-causal-eval"),
    # lightning: 30 tokens in blocks of 8 (three full blocks and a partial one), a middle layer of
    # three; both schedules; H = 6 exercises ALiBi's non-power-of-two slopes.
    Case("lightning", 30, True, dict(d_model=32, num_heads=4, block_size=8, layer_index=1,
                                     num_layers=3), id="lightning-causal-official"),
    Case("lightning", 30, True, dict(d_model=24, num_heads=6, block_size=8, layer_index=0,
                                     num_layers=2), id="lightning-causal-official-6-heads"),
    Case("lightning", 30, True, dict(d_model=32, num_heads=4, block_size=8, layer_index=1,
                                     num_layers=3, decay_schedule="paper_linear"),
         id="lightning-causal-paper"),
    Case("lightning", 30, False, dict(d_model=32, num_heads=4, block_size=8, layer_index=1,
                                      num_layers=3), id="lightning-bidirectional-no-decay"),
    Case("lightning", 30, False, dict(d_model=32, num_heads=4, block_size=8, layer_index=1,
                                      num_layers=3, bidirectional_form="symmetric_decay",
                                      decay_schedule="paper_linear"),
         id="lightning-bidirectional-symmetric"),
    # routing: 2 local heads (blocks of 8) + 2 routing heads, 3 clusters, windows of 4 tokens:
    # causal clusters span several windows, balanced windows leave tokens unrouted.
    Case("routing", 32, True, dict(d_model=32, num_heads=4, num_clusters=3, window=4,
                                   local_window=8, decay=0.9), training=True,
         id="routing-causal-training"),
    Case("routing", 32, False, dict(d_model=32, num_heads=4, num_clusters=3, window=4,
                                    local_window=8), id="routing-bidirectional"),
    # dynamic_mask: 32 keys, each query keeps 8 (chunks of 8 in the sparse kernel), GQA, both
    # bias forms, both kernels (auto = the sparse kernel on CPU here, xla = the dense reference).
    Case("dynamic_mask", 32, True, dict(d_model=32, num_heads=4, num_kv_heads=2,
                                        keep_window_size=8, chunk_size=8), id="dma-causal-exp"),
    Case("dynamic_mask", 32, True, dict(d_model=32, num_heads=4, num_kv_heads=2,
                                        keep_window_size=8, chunk_size=8, bias_form="log",
                                        dt_bias=True), id="dma-causal-log-dt-bias"),
    Case("dynamic_mask", 32, True, dict(d_model=32, num_heads=4, num_kv_heads=2,
                                        keep_window_size=8, impl="xla"), id="dma-causal-exp-xla"),
    Case("dynamic_mask", 32, False, dict(d_model=32, num_heads=4, num_kv_heads=2,
                                         keep_window_size=8), id="dma-bidirectional-exp"),
    Case("dynamic_mask", 32, False, dict(d_model=32, num_heads=4, keep_window_size=8,
                                         bias_form="log", impl="xla"),
         id="dma-bidirectional-log-xla"),
    # masa: 2 atoms for a middle layer of 3; QKVO causal with GQA, QKV bidirectional with QK-norm.
    Case("masa", 24, True, dict(d_model=32, num_heads=4, num_kv_heads=2, num_atoms=2,
                                layer_index=1, num_layers=3), id="masa-causal-qkvo-gqa"),
    Case("masa", 24, False, dict(d_model=32, num_heads=4, num_atoms=2, shared="qkv",
                                 qk_norm=True, layer_index=1, num_layers=3),
         id="masa-bidirectional-qkv-qknorm"),
]


def test_every_library_family_has_an_oracle_and_a_case():
  # Families registered by arch_zoo itself; one that a test file defines brings its own test.
  library = {name for name in attention.names()
             if attention.family(name).module.__module__.startswith("arch_zoo.")}
  assert library <= set(oracles.ORACLES), f"no oracle for {library - set(oracles.ORACLES)}"
  assert {case.name for case in CASES} == set(oracles.ORACLES)


# ------------------------------------------------------------------------------ state plumbing


def path_words(path) -> tuple[str, ...]:
  """A pytree path of ``nnx.state`` as names: ``('qkv', 'query', 'kernel')``."""
  words = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      words.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
      words.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      words.append(str(key.idx))
  return tuple(words)


def flatten(tree, prefix=()) -> dict[tuple[str, ...], np.ndarray]:
  return {prefix + path_words(p): np.asarray(a)
          for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def redraw(tree, seed: int):
  """Fresh weights with O(1) activations, so that every term of the maths shows in the output:
  matrices ``N(0, 1/fan_in)`` (fan-in = the next-to-last axis); norm gains ``U(0.5, 1.5)``; other
  vectors (DMA's A, biases, MASA's coefficients) ``+-U(0.5, 1.5)``, away from zero so that no term
  vanishes. The inits' small scales would make e.g. DMA's bias nearly constant (it cancels)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  rng = np.random.default_rng(seed)
  new = []
  for path, leaf in leaves:
    shape = np.shape(leaf)
    if len(shape) >= 2:
      value = rng.normal(size=shape) / math.sqrt(shape[-2])
    elif path_words(path)[-1] == "scale":
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 1.5, shape)
    new.append(jnp.asarray(value, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, new)


@dataclasses.dataclass
class Setup:
  """One case, built: the module split for differentiation, its inputs, and the oracle's view."""
  case: Case
  module: nnx.Module
  graphdef: Any
  params: Any
  rest: Any
  shared: Any
  x: jax.Array
  readout: jax.Array  # fixed random weights R: the scalar is sum(y * R)

  def ctx(self, shared):
    return attention.Context.for_inputs(BATCH, self.case.length, causal=self.case.causal,
                                        deterministic=not self.case.training, shared=shared)

  def weights(self) -> oracles.Weights:
    return oracles.Weights({**flatten(nnx.state(self.module)),
                            **flatten(self.shared, prefix=("shared",))})

  def oracle(self, weights: oracles.Weights, x: np.ndarray) -> oracles.Output:
    options = {**attention.family(self.case.name).defaults(), **self.case.options}
    if self.case.name == "routing" and options["local_heads"] == -1:
      options["local_heads"] = options["num_heads"] // 2  # the documented default: half
    return oracles.ORACLES[self.case.name](weights, x, causal=self.case.causal,
                                           training=self.case.training, **options)

  def call(self, params, shared, x, rest):
    """The module as a function of its weights (and of its other state, which a training call
    may update: routing's centroids)."""
    # copy=True: fresh Variables at this trace level, which a training call may then update.
    return nnx.merge(self.graphdef, params, rest, copy=True)(x, self.ctx(shared))


def setup(case: Case, seed: int = 0) -> Setup:
  module, shared = build_attention(case.name, seed=seed, **case.options)
  nnx.update(module, redraw(nnx.state(module, nnx.Param), seed + 1))
  shared = redraw(shared, seed + 2)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  keys = jax.random.split(jax.random.key(seed + 3), 2)
  x = jax.random.normal(keys[0], (BATCH, case.length, case.options["d_model"]))
  readout = jax.random.normal(keys[1], x.shape)
  return Setup(case, module, graphdef, params, rest, shared, x, readout)


# ------------------------------------------------------------------------------ the checks


def check_preconditions(case: Case, checks: dict[str, Any]):
  """The discrete choices are clear-cut, and selection really selects."""
  for key in ("top_k_margin", "argmax_margin", "window_margin", "selection_margin"):
    if key in checks:
      assert checks[key] > MIN_MARGIN, f"{key} {checks[key]:.2e}: near-tie, pick another seed"
  if case.name == "moh":  # the cases give the split explicitly (no -1 defaults to resolve)
    assert 0 < case.options["top_k"] < case.options["num_heads"] - case.options["num_shared_heads"]
    assert 0 < checks["chosen"].mean(axis=(0, 1)).min() < 1, "a routed head always or never used"
  if case.name == "routing":
    assert checks["clusters_used"] >= 2 and checks["window"] < case.length
    if case.causal:
      assert checks["restricted_pairs"] > 0, "the rank window excludes no cluster-mate"
    else:
      assert checks["unrouted"] > 0, "the balanced windows hold every token"
  if case.name == "dynamic_mask":
    assert checks["dropped_keys"] > 0, "the keep window drops no key"
    assert checks["bias_spread"] > 0.1, "the key bias is nearly constant, so it cancels"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_layer_matches_its_float64_oracle(case):
  s = setup(case)
  want = s.oracle(s.weights(), np.asarray(s.x, np.float64))
  check_preconditions(case, want.checks)
  module = nnx.clone(s.module)
  y, aux = module(s.x, s.ctx(s.shared))

  scale = np.abs(want.y).max()
  np.testing.assert_allclose(np.asarray(y, np.float64), want.y, rtol=0, atol=FORWARD_RTOL * scale)
  for key, value in want.aux.items():
    np.testing.assert_allclose(float(aux[key]), value, rtol=FORWARD_RTOL, err_msg=key)
  losses = {key for key in aux if key.startswith("loss/")}
  assert losses == {key for key in want.aux if key.startswith("loss/")}
  # Non-gradient state written by a training call (routing's k-means statistics).
  for key, value in want.checks.get("state", {}).items():
    got = oracles.Weights(flatten(nnx.state(module)))(key)
    np.testing.assert_allclose(got, value, rtol=FORWARD_RTOL, atol=FORWARD_RTOL, err_msg=key)


def directional_derivatives(s: Setup, scalars, seed: int = 7):
  """For each scalar, for the input and every weight: (module's grad . u, oracle's central
  difference along u), with u one random unit direction per tensor."""
  module_grads = [jax.jit(jax.grad(lambda p, sh, x, rest, f=f: f(*s.call(p, sh, x, rest)),
                                   argnums=(0, 1, 2)))(s.params, s.shared, s.x, s.rest)
                  for f, _ in scalars]
  flat_grads = [{**flatten(g[0]), **flatten(g[1], ("shared",)), ("input",): np.asarray(g[2])}
                for g in module_grads]
  weights, x = s.weights(), np.asarray(s.x, np.float64)
  rng = np.random.default_rng(seed)
  results = []
  for path in flat_grads[0]:
    base = x if path == ("input",) else weights.arrays[path]
    u = rng.normal(size=base.shape)
    u /= np.linalg.norm(u)

    def oracle_at(sign):
      moved = base + sign * FD_STEP * u
      if path == ("input",):
        return s.oracle(weights, moved)
      return s.oracle(weights.replaced(path, moved), x)

    plus, minus = oracle_at(1.0), oracle_at(-1.0)
    for (_, oracle_scalar), grads in zip(scalars, flat_grads):
      fd = (oracle_scalar(plus) - oracle_scalar(minus)) / (2 * FD_STEP)
      g = np.asarray(grads[path], np.float64)
      results.append((path, float(np.sum(g * u)), fd, float(np.linalg.norm(g))))
  return results


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_finite_differences_of_the_oracle(case):
  s = setup(case)
  at_inputs = s.oracle(s.weights(), np.asarray(s.x, np.float64))
  check_preconditions(case, at_inputs.checks)
  readout = np.asarray(s.readout, np.float64)
  scalars = [(lambda y, aux: jnp.sum(y * s.readout), lambda out: float(np.sum(out.y * readout)))]
  for key in at_inputs.aux:
    if key.startswith("loss/"):
      scalars.append((lambda y, aux, key=key: aux[key], lambda out, key=key: out.aux[key]))
  failures = []
  for path, got, want, norm in directional_derivatives(s, scalars):
    if abs(got - want) > GRAD_ATOL * norm + GRAD_RTOL * abs(want):
      failures.append(f"{'/'.join(path)}: grad.u {got:.8g}, finite difference {want:.8g}")
  assert not failures, "\n".join(failures)
