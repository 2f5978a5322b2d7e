"""The kernel layer (``arch_zoo.attention.ops``): every operator's reference against an
independent float64 definition, every implementation that runs on the CPU against the reference
(outputs and gradients), the one ``impl`` vocabulary, and the record of which kernel ran."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch_zoo.attention import ops
from arch_zoo.attention.ops import dynamic_mask, kv_cache, linear, routing, softmax
from tests.helpers import build_lm, lm_config, random_tokens
from tests.test_mha import naive_attention
from tests.test_routing import (balanced_routing_reference, causal_routing_reference,
                                masked_attention)

TOL = dict(atol=1e-5, rtol=1e-5)
OPS = {"softmax": softmax, "linear": linear, "dynamic_mask": dynamic_mask, "routing": routing}


def normal(seed, *shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


def value_and_grads(fn, *args):
  """``fn(*args)`` and the gradients of a fixed random projection of it, jitted."""
  out = fn(*args)
  cotangent = normal(99, *out.shape)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), range(len(args))))(*args)
  return out, grads


def assert_same(got, want, **tol):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, **(tol or TOL))


# ------------------------------------------------------------------------------ the interface


@pytest.mark.parametrize("name", list(OPS))
def test_every_operator_has_the_interface_and_names_from_the_vocabulary(name):
  op = OPS[name]
  assert set(op.IMPLS) <= set(ops.VOCABULARY) - {"auto"}
  assert op.IMPLS[-1] == "reference"  # auto tries the fast ones first
  for attribute in ("reference", "supports", "apply"):
    assert callable(getattr(op, attribute))


@pytest.mark.parametrize("old,new", list(ops.RENAMED.items()))
def test_old_impl_names_fail_with_the_new_name(old, new):
  with pytest.raises(ValueError, match=f"impl='{old}' was renamed '{new}'"):
    ops.check_impl(old, ("pallas", "xla", "reference"))


def test_an_impl_an_operator_lacks_lists_the_ones_it_has():
  with pytest.raises(ValueError, match=r"Valid: auto, reference, xla\."):
    ops.check_impl("cudnn", kv_cache.IMPLS)  # routing now has pallas; kv_cache has xla, reference


def test_a_forced_impl_that_cannot_run_says_why_and_what_can():
  q = normal(0, 1, 8, 2, 16)
  with pytest.raises(ValueError, match=r"impl='cudnn' cannot run here: the backend is 'cpu'.*"
                                       r"Use impl='auto' or 'xla' or 'reference'"):
    softmax.apply(q, q, q, causal=True, impl="cudnn")
  with pytest.raises(ValueError, match=r"impl='pallas' cannot run here: the bidirectional "
                                       r"no_decay form"):
    linear.apply(q, q, q, jnp.zeros(2), causal=False, impl="pallas")
  score = normal(1, 1, 8, 2)
  with pytest.raises(ValueError, match="impl='cudnn' cannot run here: the mask is active"):
    dynamic_mask.apply(q, q, q, score, score, causal=True, keep_window=4, impl="cudnn")


def auto_choice(op, *args, **kwargs) -> str:
  name = op.__name__.rsplit(".", 1)[-1]
  impls = getattr(op, "AUTO_IMPLS", op.IMPLS)
  return ops.resolve(name, "auto", impls, lambda impl: op.supports(impl, *args, **kwargs))


def test_auto_on_a_gpu_picks_the_kernels_of_the_table(monkeypatch):
  """The choices docs/attention/kernels.md promises, with the backend reported as a GPU (only
  the resolution runs here; the kernels themselves are the gpu-marked tests)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
  q, k = bf16(2, 256, 8, 64), bf16(2, 256, 2, 64)
  segments = jnp.zeros((2, 256), jnp.int32)
  assert auto_choice(softmax, q, k) == "cudnn"
  assert auto_choice(softmax, bf16(2, 197, 8, 64), bf16(2, 197, 2, 64)) == "xla"  # odd length
  # Packed rows without a bound on their documents: JAX's Pallas flash kernel with segment ids.
  assert auto_choice(softmax, q, k, segment_ids=segments) == "pallas"
  assert auto_choice(softmax, q.update(dtype=jnp.float32), k) == "xla"
  for causal, form, want in ((True, "no_decay", "pallas"), (False, "no_decay", "xla"),
                             (False, "symmetric_decay", "pallas")):
    assert auto_choice(linear, q, q, q, causal=causal, bidirectional_form=form) == want
  assert auto_choice(linear, bf16(2, 256, 8, 48), bf16(2, 256, 8, 48), bf16(2, 256, 8, 48),
                     causal=True) == "xla"  # head_dim 48: no Triton tile
  # dynamic_mask: cuDNN in the dense limit and bidirectionally, else the block-sparse kernel.
  for causal, window, segment_ids, want in ((True, 256, None, "cudnn"),
                                            (True, 128, None, "pallas"),
                                            (False, 128, None, "cudnn"),
                                            (True, 256, segments, "pallas"),
                                            (True, 128, segments, "pallas")):
    assert auto_choice(dynamic_mask, q, k, causal=causal, keep_window=window,
                       segment_ids=segment_ids) == want, (causal, window, segment_ids)
  # routing: its Pallas kernel where it covers the heads, xla for the balanced bidirectional form.
  assert auto_choice(routing, q, q, routing.Local(4), causal=True) == "pallas"
  scores = jnp.zeros((2, 256, 8, 4))
  clusters = routing.Clusters(scores, jnp.argmax(scores, axis=-1), 64)
  assert auto_choice(routing, q, q, clusters, causal=False) == "xla"


# ------------------------------------------------------------------------------ softmax


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_reference_is_the_definition(kv_heads, causal):
  q, k, v = normal(0, 2, 7, 4, 8), normal(1, 2, 7, kv_heads, 8), normal(2, 2, 7, kv_heads, 8)
  segments = jnp.array([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 2]], jnp.int32)
  np.testing.assert_allclose(softmax.reference(q, k, v, causal=causal, segment_ids=segments),
                             naive_attention(q, k, v, causal, np.asarray(segments)), **TOL)


def test_softmax_reference_computes_in_float32_whatever_the_inputs():
  q, k, v = (normal(i, 1, 16, 2, 8).astype(jnp.bfloat16) for i in range(3))
  out = softmax.reference(q, k, v, causal=True)
  assert out.dtype == jnp.bfloat16
  want = naive_attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
  # Only the final rounding to bf16 (relative 2^-9) separates it from the float64 definition.
  np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_softmax_xla_equals_the_reference_with_bias_mask_and_segments(causal):
  q, k, v = normal(0, 2, 9, 4, 8), normal(1, 2, 9, 2, 8), normal(2, 2, 9, 2, 8)
  bias = normal(3, 2, 4, 1, 9)
  mask = normal(4, 2, 1, 9, 9) > -0.5
  segments = jnp.array([[0] * 4 + [1] * 5, [0] * 9], jnp.int32)
  run = lambda impl: value_and_grads(  # noqa: E731
      lambda q, k, v, bias: softmax.apply(q, k, v, causal=causal, impl=impl, bias=bias, mask=mask,
                                          segment_ids=segments), q, k, v, bias)
  assert_same(run("xla"), run("reference"))
  assert_same(run("auto"), run("reference"))


# ------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("causal,form", [(True, "no_decay"), (False, "no_decay"),
                                         (False, "symmetric_decay")])
def test_linear_xla_equals_the_reference(causal, form):
  q, k, v = (normal(i, 2, 37, 4, 16, scale=0.1) for i in range(3))
  slopes = jnp.array([0.0, 0.01, 0.3, 2.0])
  run = lambda impl: value_and_grads(  # noqa: E731
      lambda q, k, v: linear.apply(q, k, v, slopes, causal=causal, impl=impl, block_size=8,
                                   bidirectional_form=form), q, k, v)
  assert_same(run("xla"), run("reference"), atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------ dynamic_mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("keep_window", [6, 40])  # the sparse forms, and the dense limit
def test_dynamic_mask_xla_equals_the_reference(causal, keep_window):
  q, k, v = normal(0, 2, 21, 4, 8), normal(1, 2, 21, 2, 8), normal(2, 2, 21, 2, 8)
  bias, score = normal(3, 2, 21, 2), normal(4, 2, 21, 2)
  run = lambda impl: value_and_grads(  # noqa: E731
      lambda q, k, v, bias: dynamic_mask.apply(q, k, v, bias, score, causal=causal,
                                               keep_window=keep_window, impl=impl, chunk_size=8),
      q, k, v, bias)
  assert_same(run("xla"), run("reference"))


def test_dynamic_mask_supports_names_the_gpu_and_packing_limits():
  q, k = normal(0, 1, 16, 4, 8), normal(1, 1, 16, 2, 8)
  segments = jnp.zeros((1, 16), jnp.int32)
  assert "does not support segment_ids" in dynamic_mask.supports(
      "xla", q, k, causal=True, keep_window=4, segment_ids=segments)
  assert dynamic_mask.supports("xla", q, k, causal=True, keep_window=16,
                               segment_ids=segments) is None  # dense limit: every key kept
  assert "backend" in dynamic_mask.supports("cudnn", q, k, causal=False, keep_window=4)


# ------------------------------------------------------------------------------ routing


def routing_inputs(seed=0, b=2, t=20, h=2, d=8, clusters=3):
  qk = normal(seed, b, t, h, d)
  scores = normal(seed + 1, b, t, h, clusters)
  return qk, normal(seed + 2, b, t, h, d), scores, jnp.argmax(scores, axis=-1)


SEGMENTS = jnp.array([[0] * 12 + [1] * 8, [0] * 5 + [1] * 15], jnp.int32)


@pytest.mark.parametrize("causal", [True, False])
def test_routing_reference_of_local_blocks_is_the_banded_definition(causal):
  block, t = 4, 11
  q, k, v = normal(0, 2, t, 2, 8), normal(1, 2, t, 2, 8), normal(2, 2, t, 2, 8)
  out = routing.reference(q, k, v, routing.Local(block), causal=causal)
  query_block, key_block = np.arange(t)[:, None] // block, np.arange(t)[None, :] // block
  allowed = (key_block >= query_block - 1) & (key_block <= query_block + (0 if causal else 1))
  if causal:
    allowed &= np.tril(np.ones((t, t), bool))
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  want = np.stack([np.stack([masked_attention(q[b, :, h], k[b, :, h], v[b, :, h], allowed)
                             for h in range(2)], 1) for b in range(2)])
  np.testing.assert_allclose(out, want, **TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_routing_reference_of_clusters_is_the_definition(causal):
  qk, v, scores, nearest = routing_inputs()
  window = 3
  out = routing.reference(qk, qk, v, routing.Clusters(scores, nearest, window), causal=causal,
                          segment_ids=SEGMENTS if causal else None)
  qk, v, scores, nearest = (np.asarray(x, np.float64) for x in (qk, v, scores, nearest))
  want = np.zeros_like(v)
  for b in range(2):
    for h in range(2):
      if causal:
        want[b, :, h] = causal_routing_reference(qk[b, :, h], v[b, :, h], nearest[b, :, h],
                                                 window, np.asarray(SEGMENTS)[b])
      else:
        want[b, :, h] = balanced_routing_reference(qk[b, :, h], v[b, :, h], scores[b, :, h],
                                                   window)
  np.testing.assert_allclose(out, want, **TOL)


def test_routing_balanced_reference_breaks_score_ties_like_top_k():
  """Tied scores: the lower position takes the last place of a window (top_k is stable)."""
  scores = jnp.round(normal(1, 1, 12, 1, 3))
  members = np.asarray(routing.balanced_members(scores, 4))[0, 0]  # [C, T]
  for c in range(3):
    want = np.zeros(12, bool)
    want[np.asarray(routing.balanced_windows(scores[0, :, 0], 4))[c]] = True
    np.testing.assert_array_equal(members[c], want)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segmented", [False, True])
def test_routing_xla_equals_the_reference(causal, segmented):
  qk, v, scores, nearest = routing_inputs(seed=3)
  k = normal(9, *qk.shape)
  segments = SEGMENTS if segmented else None
  for pattern, keys in ((routing.Local(4), k), (routing.Clusters(scores, nearest, 3), None)):
    def run(impl, pattern=pattern, keys=keys):
      return value_and_grads(lambda q, v: routing.apply(
          q, q if keys is None else keys, v, pattern, causal=causal, impl=impl,
          segment_ids=segments), qk, v)
    assert_same(run("xla"), run("reference"))


# ------------------------------------------------------------------------------ recording


def test_resolutions_are_recorded_once_per_trace_with_the_reason():
  q = normal(0, 1, 8, 2, 16)
  site = ops.Site("mha", 3)
  fn = jax.jit(lambda q: softmax.apply(q, q, q, causal=True, site=site))
  with ops.recording() as records:
    fn(q)
    fn(q)  # cached: no new trace, no new record
    jax.jit(lambda q: softmax.apply(q, q, q, causal=True, impl="reference", site=site))(q)
  assert records[0] == {"layer": 3, "family": "mha", "op": "softmax", "requested": "auto",
                        "resolved": "xla", "reason": "cudnn: the backend is 'cpu', not 'gpu'"}
  assert len(records) == 2 and records[1]["resolved"] == records[1]["requested"] == "reference"
  softmax.apply(q, q, q, causal=True, site=site)  # outside the block: not recorded
  assert len(records) == 2


def test_summary_has_one_entry_per_layer_and_collapses_repeated_traces():
  def record(layer, family, op, resolved, reason=""):
    return {"layer": layer, "family": family, "op": op, "requested": "auto", "resolved": resolved,
            "reason": reason}

  records = [record(1, "mha", "softmax", "xla", "cudnn: odd length"),
             record(0, "lightning", "linear", "xla", "pallas: cpu"),
             record(1, "mha", "softmax", "xla", "cudnn: odd length"),
             record(2, "mha", "softmax", "cudnn"),
             record(2, "mha", "softmax", "xla", "cudnn: odd length"),
             record(3, "mha", "softmax", "cudnn"),
             record(4, "mha", "softmax", "cudnn")]
  summary = ops.summarize(records)
  assert [e["layer"] for e in summary] == [0, 1, 2, 3, 4]
  assert summary[1] == {"layer": 1, "family": "mha", "requested": {"softmax": "auto"},
                        "kernels": {"softmax": "xla"}, "reasons": {"softmax": "cudnn: odd length"}}
  assert summary[2]["kernels"] == {"softmax": "cudnn, xla"}  # two traces, two choices
  assert summary[3]["reasons"] == {}
  assert ops.summary_line(summary) == (
      "attention kernels: layer 0 lightning linear=xla; layer 1 mha softmax=xla; "
      "layer 2 mha softmax=cudnn, xla; layers 3-4 mha softmax=cudnn")


def test_a_hybrid_model_records_one_resolved_kernel_per_layer():
  config = lm_config("mha", layer_pattern="lightning,mha")
  model = build_lm(config)
  graphdef, state = nnx.split(model)
  tokens = random_tokens(2, 16, config.model.vocab_size)
  with ops.recording() as records:
    jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0]).lower(state, tokens)
  summary = ops.summarize(records)
  assert [(e["layer"], e["family"], e["kernels"]) for e in summary] == [
      (0, "lightning", {"linear": "xla"}), (1, "mha", {"softmax": "xla"})]
  assert "backend" in summary[0]["reasons"]["linear"]
  assert ops.summary_line(summary) == \
      "attention kernels: layer 0 lightning linear=xla; layer 1 mha softmax=xla"


def test_train_py_prints_and_records_the_kernel_of_every_layer(austen_data_dir, tmp_path, capsys):
  import json

  import train
  config = lm_config("mha", layer_pattern="lightning,mha")
  config.data.data_dir = austen_data_dir
  config.train.update(steps=2, progress=False)
  train.train_and_evaluate(config, str(tmp_path))
  kernels = json.load(open(tmp_path / "run_info.json"))["attention_kernels"]
  assert [(k["layer"], k["family"], k["kernels"]) for k in kernels] == [
      (0, "lightning", {"linear": "xla"}), (1, "mha", {"softmax": "xla"})]  # CPU: no GPU kernels
  assert ("attention kernels: layer 0 lightning linear=xla; layer 1 mha softmax=xla"
          in capsys.readouterr().out)
