"""Registry and config errors: every bad name or option fails with the valid choices listed; and
the family contract, checked for every registered name."""

import dataclasses
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

from arch_zoo import attention, models
from configs import lm, vit
from tests.helpers import build_attention, random_tokens


def test_names_lists_registered_families():
  names = attention.names()
  assert "mha" in names
  assert names == sorted(names)


def test_unknown_name_lists_valid_names():
  with pytest.raises(KeyError) as err:
    attention.build("mhaa", d_model=32, num_heads=2)
  message = str(err.value)
  assert "mhaa" in message and "Did you mean 'mha'" in message
  for name in attention.names():
    assert name in message


def test_unknown_option_lists_valid_options():
  with pytest.raises(TypeError) as err:
    attention.build("mha", d_model=32, num_heads=2, qknorm=True)
  message = str(err.value)
  assert "'qknorm'" in message and "qk_norm" in message and "num_kv_heads" in message


def test_bad_option_value_lists_choices():
  with pytest.raises(ValueError, match="Valid: auto, reference, xla, cudnn"):
    attention.build("mha", d_model=32, num_heads=2, impl="flash")


def test_indivisible_heads_fail_clearly():
  with pytest.raises(ValueError, match="num_kv_heads"):
    attention.build("mha", d_model=32, num_heads=4, num_kv_heads=3)


def test_config_attention_subconfig_comes_from_registry_defaults():
  config = lm.get_config("attn=mha,size=test")
  assert dict(config.model.attention) == {"name": "mha", **attention.family("mha").defaults()}


def test_config_rejects_unknown_attention_and_size():
  with pytest.raises(KeyError, match="Valid: "):
    lm.get_config("attn=nope,size=test")
  with pytest.raises(ValueError, match="124M"):
    lm.get_config("attn=mha,size=huge")
  with pytest.raises(ValueError, match="Unknown config argument 'atn'"):
    lm.get_config("atn=mha")


def test_locked_config_rejects_misspelled_override():
  config = lm.get_config("attn=mha,size=test")
  with pytest.raises(AttributeError):
    config.model.attention.qknorm = True  # misspelled: must not silently add a key
  config.model.attention.qk_norm = True  # the real key is fine


@pytest.mark.parametrize("size", ["test", "S", "124M", "350M"])
def test_all_lm_sizes_build_a_config(size):
  config = lm.get_config(f"attn=mha,size={size}")
  assert config.model.d_model % config.model.num_heads == 0


# ------------------------------------------------------------------------- the family contract

CONTRACT_DIMS = dict(d_model=32, num_heads=4, num_layers=3)


def supported_modes(fam) -> list[bool]:
  return [causal for causal in (True, False) if (fam.causal if causal else fam.bidirectional)
          is True]


def small_model_config(name: str, causal: bool, **model_overrides):
  """The ``test``-size LM (causal) or ViT (bidirectional) with attention ``name``."""
  config = (lm if causal else vit).get_config(f"attn={name},size=test")
  with config.unlocked():
    config.model.update(model_overrides)
  return config


def small_model_inputs(config):
  if config.task == "classification":
    m = config.model
    return jax.random.normal(jax.random.key(0), (2, m.image_size, m.image_size, m.num_channels))
  return random_tokens(2, 16, config.model.vocab_size, seed=3)


def check_family_contract(name: str) -> None:
  """Everything the rest of the code reads from a family's record holds for family ``name``."""
  fam = attention.family(name)
  assert fam.name == name and fam.problems() == [], fam.problems()
  # Options: a dataclass whose defaults are the config's keys and build a valid options object.
  defaults = fam.options()
  assert dataclasses.is_dataclass(defaults)
  assert fam.defaults() == {f.name: getattr(defaults, f.name)
                            for f in dataclasses.fields(defaults)}
  # Modes: usable at least one way; a refused mode says why at config time.
  modes = supported_modes(fam)
  assert modes, f"{name} supports neither causal nor bidirectional use"
  for causal in (True, False):
    if causal not in modes:
      with pytest.raises(ValueError, match=re.escape(fam.causal if causal else fam.bidirectional)):
        fam.check_mode(causal)
  # Summary: the one line that listings show.
  assert fam.summary.strip() and "\n" not in fam.summary
  # The layer itself: y, aux = attn(x, ctx) in every supported mode.
  dims = attention.Dims(**CONTRACT_DIMS)
  layer, shared = build_attention(name, **CONTRACT_DIMS)
  x = jax.random.normal(jax.random.key(0), (2, 12, dims.d_model))
  for causal in modes:
    y, aux = layer(x, attention.Context.for_inputs(2, 12, causal=causal, shared=shared))
    assert y.shape == x.shape and bool(np.isfinite(np.asarray(y)).all())
    assert all(k.startswith(attention.base.AUX_PREFIXES) for k in aux), list(aux)
  # State size: what a layer keeps to produce the next token.
  state = fam.state_size(dims, defaults)
  assert isinstance(state, attention.StateSize)
  assert state.per_token >= 0 and state.fixed >= 0 and state.per_token + state.fixed > 0
  # FLOPs: positive and finite; a family whose state grows with the context (a KV cache) attends
  # over more keys per token as the sequence grows.
  for causal in modes:
    flops = [fam.flops_per_token(dims, defaults, t, causal) for t in (64, 256, 1024)]
    assert all(math.isfinite(f) and f > 0 for f in flops), flops
    if state.per_token > 0:
      assert flops[0] < flops[1] < flops[2], (causal, flops)
  # Kernels: every listed impl is a valid value of the impl option; others are refused.
  for impl in fam.impls:
    assert fam.options(impl=impl).impl == impl
  if fam.impls:
    with pytest.raises(ValueError):
      fam.options(impl="no_such_kernel")
  # Scannable: a scanned model builds and computes what the unrolled one does; else it is
  # refused with the record's reason.
  causal = modes[0]
  scanned = small_model_config(name, causal, scan_layers=True)
  if fam.scannable is True:
    inputs = small_model_inputs(scanned)
    want, _ = models.build(small_model_config(name, causal).model, rngs=nnx.Rngs(0))(inputs)
    got, _ = models.build(scanned.model, rngs=nnx.Rngs(0))(inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  else:
    with pytest.raises(ValueError, match=re.escape(fam.scannable)):
      models.build(scanned.model, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", attention.names())
def test_every_family_meets_the_contract(name):
  check_family_contract(name)


def test_an_incomplete_family_is_refused_with_what_it_lacks():
  @dataclasses.dataclass(frozen=True)
  class Options:
    impl: str = "auto"

  class NoCost(nnx.Module):
    """A family without its cost."""

  with pytest.raises(ValueError) as err:
    attention.register("no_cost", options=Options, bidirectional=True)(NoCost)
  message = str(err.value)
  for missing in ("flops_per_token", "state_size", "scannable", "impls"):
    assert missing in message, message
  assert "no_cost" not in attention.names()
