"""Registry and config errors: every bad name or option fails with the valid choices listed."""

import pytest

from arch_zoo import attention
from configs import lm


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
