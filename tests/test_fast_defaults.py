"""The `auto` performance settings (issue 26): what they resolve to per backend and sharding, that
the resolved value is what config.json records, and that runs saved before them still resume and
evaluate with the parameters they were trained with."""

import json

import pytest

import eval as eval_lib
import train
from arch_zoo import perf, runs
from arch_zoo.attention.parts import fused_qkv_for
from configs import lm, vit


@pytest.mark.parametrize("backend,sharding,want", [
    ("gpu", "dp", True), ("gpu", "fsdp", True), ("gpu", "fsdp_tp", False),
    ("cpu", "dp", False), ("tpu", "dp", False)])
def test_fused_qkv_auto_per_backend_and_sharding(backend, sharding, want):
  config = lm.get_config("attn=mha,size=test")
  config.sharding = sharding
  resolved = perf.resolve_auto_settings(config, backend=backend)
  assert config.model.attention.fused_qkv is want
  assert config.model.attention_options.moh.fused_qkv is want  # a hybrid's moh layers too
  assert resolved["model.attention.fused_qkv"] is want
  assert json.loads(config.to_json_best_effort())["model"]["attention"]["fused_qkv"] is want


def test_explicit_fused_qkv_is_kept_and_bad_values_are_refused():
  config = lm.get_config("attn=moh,size=test")
  config.model.attention.fused_qkv = False
  assert "model.attention.fused_qkv" not in perf.resolve_auto_settings(config, backend="gpu")
  assert config.model.attention.fused_qkv is False
  assert fused_qkv_for(True, backend="cpu", rules=None) is True
  with pytest.raises(ValueError, match="auto, True or False"):
    fused_qkv_for("yes", backend="gpu", rules=None)
  from arch_zoo import attention
  with pytest.raises(ValueError, match="fused_qkv must be auto, True or False"):
    attention.make_options("mha", fused_qkv="yes")


def test_fused_qkv_override_parses_true_false_and_auto_from_the_command_line():
  from ml_collections import config_flags
  from absl import flags
  for text, want in (("True", True), ("false", False), ("auto", "auto")):
    argv = ["train.py", "--config=configs/lm.py:attn=mha,size=test",
            f"--config.model.attention.fused_qkv={text}"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    values(argv)
    assert values.config.model.attention.fused_qkv == want
    assert type(values.config.model.attention.fused_qkv) is type(want)


def test_a_resumed_run_keeps_the_layout_it_was_saved_with():
  """A run saved on a GPU (fused) resumed on a CPU, and one saved before `auto` existed (False, or
  no key at all) resumed on a GPU: the saved layout wins over this device's choice."""
  for saved_value, backend in ((True, "cpu"), (False, "gpu"), (None, "gpu"), ("auto", "gpu")):
    saved = json.loads(lm.get_config("attn=mha,size=test").to_json_best_effort())
    if saved_value is None:
      del saved["model"]["attention"]["fused_qkv"]
    else:
      saved["model"]["attention"]["fused_qkv"] = saved_value
    config = lm.get_config("attn=mha,size=test")
    perf.resolve_auto_settings(config, saved, backend=backend)
    assert config.model.attention.fused_qkv is (saved_value is True)


@pytest.mark.parametrize("norm,cuda,want", [
    ("rmsnorm", True, "cublas"), ("layernorm", True, "cublas,cudnn_ln"),
    ("rmsnorm", False, ""), ("layernorm", False, "")])
def test_xla_flags_auto_per_backend_and_norm(norm, cuda, want):
  assert perf.auto_xla_flags(norm, cuda) == want


def test_xla_flags_auto_is_resolved_into_the_config_and_explicit_sets_are_kept(monkeypatch):
  monkeypatch.setattr(perf, "cuda_expected", lambda environ=None: True)
  config = lm.get_config("attn=mha,size=124M")
  assert config.train.xla_flags == "auto"
  assert perf.resolve_xla_flags(config) == "cublas" == config.train.xla_flags
  config = vit.get_config("attn=mha,size=B/16")
  assert perf.resolve_xla_flags(config) == "cublas,cudnn_ln"
  config = vit.get_config("attn=mha,size=S")  # the CPU demo names its set
  assert perf.resolve_xla_flags(config) == "cpu2"
  with pytest.raises(ValueError, match="resolve it first"):
    perf.xla_flags_for("auto")


def test_cuda_is_expected_only_with_a_cuda_plugin_and_platforms_that_allow_it(monkeypatch):
  import importlib.metadata

  class Entry:
    def __init__(self, name):
      self.name = name

  monkeypatch.setattr(importlib.metadata, "entry_points",
                      lambda group: [Entry("xla_cuda12")] if group == "jax_plugins" else [])
  assert perf.cuda_expected({}) is True
  assert perf.cuda_expected({"JAX_PLATFORMS": "cuda,cpu"}) is True
  assert perf.cuda_expected({"JAX_PLATFORMS": "cpu"}) is False
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
  import sys
  monkeypatch.setitem(sys.modules, "jax_plugins", None)  # no plugin package either
  assert perf.cuda_expected({}) is False


def test_train_records_resolved_values_and_resumes_a_fused_run_on_this_cpu(austen_data_dir,
                                                                           tmp_path):
  """A run trained with fused QKV (as `auto` picks on a GPU) resumes here, where `auto` alone
  would pick separate projections, and eval.py rebuilds it: config.json holds the resolved
  values, never `auto`."""
  config = lm.get_config("attn=mha,size=test")
  config.model.attention.fused_qkv = True
  config.train.update(steps=4, progress=False)
  train.train_and_evaluate(config, str(tmp_path))
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["model"]["attention"]["fused_qkv"] is True
  assert saved["model"]["attention_options"]["moh"]["fused_qkv"] is False  # this CPU's choice
  assert saved["train"]["xla_flags"] == ""
  resumed = lm.get_config("attn=mha,size=test")  # every setting on auto
  resumed.train.update(steps=6, progress=False)
  assert train.train_and_evaluate(resumed, str(tmp_path))["step"] == 6
  assert runs.load_config(str(tmp_path)).model.attention.fused_qkv is True
  assert eval_lib.evaluate_run(str(tmp_path))["step"] == 6
