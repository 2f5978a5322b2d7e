"""A family defined only in the test tree (tests/families/sliding_window.py) is usable everywhere
through ``plugins=``, with no file of arch_zoo touched: the registry contract, train.py as an LM
and as a ViT, eval.py, run_info.json's FLOPs and state size, and a compare.py sweep. A family
without its cost is refused at registration. docs/adding_a_family.md walks through this test."""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import compare
from arch_zoo import attention, plugins
from configs import lm
from tests.test_registry import check_family_contract

PLUGIN = "tests/families/sliding_window.py"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config.train.steps=4", "--config.train.log_every=2", "--config.train.eval_every=0",
        "--config.train.checkpoint_every=0", "--config.train.progress=False"]


@pytest.fixture(scope="module")
def sliding_window():
  plugins.load(PLUGIN)
  plugins.load(PLUGIN)  # loading again is harmless: the family is registered once
  return attention.family("sliding_window")


def run(*args: str) -> str:
  proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


def test_the_plugin_family_meets_the_registry_contract(sliding_window):
  assert "sliding_window" in attention.names()
  check_family_contract("sliding_window")


def test_each_output_sees_exactly_the_keys_in_its_window(sliding_window):
  """Perturbing the input at position s changes the output at t iff s is in t's window."""
  length, window, t = 12, 4, 7
  layer = attention.build("sliding_window", rngs=nnx.Rngs(0), d_model=16, num_heads=2,
                          window=window)
  x = jax.random.normal(jax.random.key(0), (1, length, 16))
  for causal, visible in ((True, lambda s: t - window < s <= t),
                          (False, lambda s: abs(t - s) < window)):
    ctx = attention.Context.for_inputs(1, length, causal=causal)
    base = np.asarray(layer(x, ctx)[0][0, t])
    for s in range(length):
      moved = np.asarray(layer(x.at[0, s].add(1.0), ctx)[0][0, t])
      assert (not np.array_equal(moved, base)) == visible(s), (causal, s)


def test_flops_and_state_follow_the_window(sliding_window):
  dims = attention.Dims(d_model=64, num_heads=4)
  mha = attention.family("mha")

  def flops(name, seq_len, causal, **options):
    return attention.family(name).flops_per_token(
        dims, attention.make_options(name, **options), seq_len, causal)

  for causal in (True, False):  # a window over the whole sequence is multi-head attention
    assert flops("sliding_window", 64, causal, window=64) == flops("mha", 64, causal)
    assert flops("sliding_window", 1024, causal, window=64) < flops("mha", 1024, causal)
  # Beyond the window a causal query attends to `window` keys: 4 H D per key, whatever T.
  projections = mha.flops_per_token(dims, attention.make_options("mha"), 0, True)
  np.testing.assert_allclose(flops("sliding_window", 10**6, True, window=64) - projections,
                             4 * 4 * 16 * 64, rtol=1e-3)
  # Decoding keeps K and V of the last `window` tokens: 2 x 4 heads x 16 x window, fixed.
  state = sliding_window.state_size(dims, attention.make_options("sliding_window", window=64))
  assert state == attention.StateSize(per_token=0, fixed=2 * 4 * 16 * 64)


def test_trains_as_lm_and_vit_with_its_flops_and_state_in_run_info(sliding_window, tmp_path,
                                                                  austen_data_dir,
                                                                  fashion_mnist_data_dir):
  lm_dir, vit_dir = str(tmp_path / "lm"), str(tmp_path / "vit")
  out = run("train.py", f"--config=configs/lm.py:attn=sliding_window,size=test,plugins={PLUGIN}",
            f"--workdir={lm_dir}", "--config.model.attention.window=8", *FAST)
  assert "step 4: validation loss" in out, out
  run("train.py", f"--config=configs/vit.py:attn=sliding_window,size=test,plugins={PLUGIN}",
      f"--workdir={vit_dir}", "--config.model.attention.window=8",
      "--config.data.train_split=train[:512]", "--config.data.eval_split=test[:128]", *FAST)
  # eval.py rebuilds the model from config.json, which names the plugin.
  record = json.loads(run("eval.py", f"--workdir={lm_dir}", "--max_batches=2").splitlines()[-1])
  assert record["attention"] == "sliding_window" and record["step"] == 4
  assert np.isfinite(record["results"]["perplexity"]["loss"])

  # run_info.json, by hand from the definition. Both models: d_model 32, 2 heads of 16, 2 layers,
  # window 8; q, k, v and output projections 4 x 2 x 32 x 32 FLOPs per token, and 4 x 2 x 16
  # FLOPs per key attended to (QK^T and AV).
  projections, per_key = 4 * 2 * 32 * 32, 4 * 2 * 16
  lm_info = json.load(open(os.path.join(lm_dir, "run_info.json")))
  assert lm_info["config"]["plugins"] == PLUGIN
  assert lm_info["config"]["model"]["attention"]["name"] == "sliding_window"
  # LM, T = 32: the first 8 causal queries count 8^2/2 keys (mha's convention), the other 24 see
  # 8 each: 7 keys per token. GELU MLP 32 -> 128 -> 32, tied head to 256 bytes; train = 3 x fwd.
  layer = projections + per_key * (8 * 8 / 2 + 24 * 8) / 32 + 2 * 2 * 32 * 128
  assert lm_info["flops"]["train_flops_per_token"] == 3 * (2 * layer + 2 * 32 * 256)
  # Decoding keeps K and V (2 heads of 16) of the last 8 tokens per layer, whatever seq_len.
  state = lm_info["state_elements"]
  assert state["per_layer_per_token"] == 0 and state["per_layer_fixed"] == 2 * 2 * 16 * 8
  assert state["at_seq_len"] == 2 * (2 * 2 * 16 * 8)
  # ViT: 16 patches of 7 x 7 x 1, no RoPE; |t - s| < 8 keeps 184 of the 256 pairs (92 in each
  # half of the 4 x 4 raster order); MLP 32 -> 64 -> 32; patch embedding and a 10-class head.
  vit_info = json.load(open(os.path.join(vit_dir, "run_info.json")))
  assert vit_info["config"]["model"]["attention"]["rope"] is False
  layer = projections + per_key * 184 / 16 + 2 * 2 * 32 * 64
  forward = 16 * 2 * layer + 16 * 2 * 49 * 32 + 2 * 32 * 10
  assert vit_info["flops"]["forward_flops_per_image"] == forward
  assert vit_info["state_elements"]["per_layer_fixed"] == 2 * 2 * 16 * 8


def test_appears_in_a_compare_sweep(sliding_window, tmp_path):
  corpus = tmp_path / "corpus.txt"
  words = np.random.default_rng(0).choice(["the", "window", "slides", "over", "keys"], 6000)
  corpus.write_text(" ".join(words))
  sweep = tmp_path / "sweep.py"
  sweep.write_text(
      "def get_sweep():\n"
      "  return [dict(name='lm', config='configs/lm.py',\n"
      f"               arg='size=test,data=text:{corpus},plugins={PLUGIN}',\n"
      "               variants=['mha', 'sliding_window'], seeds=[0],\n"
      "               overrides={'train.steps': 4, 'train.log_every': 2,\n"
      "                          'train.checkpoint_every': 0, 'train.eval_every': 0},\n"
      "               attention_overrides={'sliding_window': {'model.attention.window': 8}},\n"
      "               suite=None)]\n")
  md_path, failed = compare.run_sweep(str(sweep), str(tmp_path / "runs"),
                                      out_dir=str(tmp_path / "out"))
  assert failed == []
  with open(tmp_path / "out" / "comparison.csv") as f:
    rows = {row["variant"]: row for row in csv.DictReader(f)}
  assert set(rows) == {"mha", "sliding_window"}
  # The table's state column comes from the record: a KV cache for mha, a window for this one.
  assert float(rows["mha"]["state_per_token_per_layer"]) == 2 * 32
  assert float(rows["sliding_window"]["state_per_token_per_layer"]) == 0
  assert float(rows["sliding_window"]["state_fixed_per_layer"]) == 2 * 32 * 8
  assert float(rows["sliding_window"]["train_flops_per_token"]) < float(
      rows["mha"]["train_flops_per_token"])
  assert "sliding_window" in open(md_path).read()


def test_a_family_without_its_cost_is_refused_at_registration(tmp_path):
  plugin = tmp_path / "costless.py"
  plugin.write_text(
      "import dataclasses\n"
      "from flax import nnx\n"
      "from arch_zoo import attention\n\n"
      "@dataclasses.dataclass(frozen=True)\n"
      "class Options:\n"
      "  window: int = 16\n\n"
      "@attention.register('costless', options=Options, bidirectional=True, scannable=True,\n"
      "                    state_size=attention.kv_cache_state_size)\n"
      "class Costless(nnx.Module):\n"
      "  \"\"\"Sliding-window attention that forgot its flops_per_token.\"\"\"\n")
  with pytest.raises(ValueError) as err:
    lm.get_config(f"attn=costless,size=test,plugins={plugin}")
  message = str(err.value)
  assert "'costless'" in message and "flops_per_token" in message, message
  assert "state_size" not in message and "scannable" not in message  # only what is missing
  assert "costless" not in attention.names()
