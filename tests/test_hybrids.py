"""Hybrids (``model.layer_pattern``): every family of the pattern has its own options, filled from
the registry and set from the command line; a ViT hybrid's layers follow the ViT's RoPE setting;
a misspelled option fails; options of families no layer uses do not define a run."""

import json

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

import train
from arch_zoo import attention, models, provenance, workdir as workdir_lib
from arch_zoo.attention import Context
from configs import lm, vit


def parse_flags(*args):
  """The config as train.py's flags make it (locked, overrides applied)."""
  argv = ["train.py", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_every_other_family_has_its_registry_defaults():
  config = lm.get_config("attn=lightning,size=test")
  others = set(attention.names()) - {"lightning"}
  assert set(config.model.attention_options) == others
  for name in others:
    assert dict(config.model.attention_options[name]) == attention.family(name).defaults()


def test_vit_hybrid_layers_have_rope_off():
  config = vit.get_config("attn=lightning,size=test")
  config.model.layer_pattern = "lightning,mha"
  model = models.build(config.model, rngs=nnx.Rngs(0))
  mha_layer = model.stack.blocks[1].attn
  assert type(mha_layer) is attention.family("mha").module
  assert mha_layer.qkv.rope_base is None  # no RoPE
  # Without RoPE, bidirectional attention is permutation-equivariant: permuting the tokens
  # permutes the outputs (RoPE would make each output depend on the positions).
  x = jax.random.normal(jax.random.key(1), (2, 16, config.model.d_model))
  permutation = np.random.default_rng(0).permutation(16)
  ctx = Context.for_inputs(2, 16, causal=False)
  y, _ = mha_layer(x, ctx)
  y_permuted, _ = mha_layer(x[:, permutation], ctx)
  np.testing.assert_allclose(np.asarray(y_permuted), np.asarray(y)[:, permutation], atol=1e-5)
  # The language model's hybrids keep RoPE on.
  config = lm.get_config("attn=lightning,size=test")
  config.model.layer_pattern = "lightning,mha"
  model = models.build(config.model, rngs=nnx.Rngs(0))
  assert model.stack.blocks[1].attn.qkv.rope_base is not None


def test_an_override_reaches_a_non_main_familys_layers():
  args = ("--config=configs/lm.py:attn=lightning,size=test",
          "--config.model.layer_pattern=lightning,routing")
  default = parse_flags(*args)
  config = parse_flags(*args, "--config.model.attention_options.routing.num_clusters=2")
  model = models.build(config.model, rngs=nnx.Rngs(0))
  routing_layer = model.stack.blocks[1].attn
  assert type(routing_layer) is attention.family("routing").module
  assert routing_layer.centroids[...].shape[1] == 2  # [routing heads, clusters, head_dim]
  assert default.model.attention_options.routing.num_clusters == 4
  # The cost model reads the same options: with fewer clusters each is wider (T / num_clusters
  # tokens), so a query attends to more keys.
  assert (provenance.flops_per_token(config)["train_flops_per_token"]
          > provenance.flops_per_token(default)["train_flops_per_token"])


def test_a_misspelled_option_of_another_family_fails():
  with pytest.raises(AttributeError, match="num_clusters"):
    parse_flags("--config=configs/lm.py:attn=lightning,size=test",
                "--config.model.attention_options.routing.num_clutsers=8")
  config = lm.get_config("attn=lightning,size=test")
  with pytest.raises(AttributeError):
    config.model.attention_options.mha.qknorm = True


def test_the_main_familys_options_live_only_in_model_attention():
  config = lm.get_config("attn=mha,size=test")
  assert "mha" not in config.model.attention_options
  with pytest.raises(AttributeError):
    config.model.attention_options.mha = {}


def write_saved_config(workdir, config):
  with open(workdir / train.CONFIG_FILE, "w") as f:
    f.write(config.to_json_best_effort())


def test_unused_families_options_do_not_define_the_run(tmp_path):
  saved = lm.get_config("attn=mha,size=test")
  saved.model.attention_options.routing.num_clusters = 8  # no layer is routing
  write_saved_config(tmp_path, saved)
  workdir_lib.check_workdir(lm.get_config("attn=mha,size=test"), str(tmp_path))  # accepted
  hybrid = lm.get_config("attn=mha,size=test")
  hybrid.model.layer_pattern = "mha,routing"
  saved.model.layer_pattern = "mha,routing"  # now a layer uses the changed option
  write_saved_config(tmp_path, saved)
  with pytest.raises(ValueError, match="use a new --workdir"):
    workdir_lib.check_workdir(hybrid, str(tmp_path))
  # A config saved before the options existed is the same model as today's.
  plain = json.loads(lm.get_config("attn=mha,size=test").to_json_best_effort())
  del plain["model"]["attention_options"]
  (tmp_path / train.CONFIG_FILE).write_text(json.dumps(plain))
  workdir_lib.check_workdir(lm.get_config("attn=mha,size=test"), str(tmp_path))
