"""The GPU sweeps, planned on the CPU (every member's config built and checked, nothing trained):
configs/sweeps/zoology_fig2.py, whose asserted numbers are Zoology's own configuration
(zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py), and
configs/sweeps/lm_gpu.py."""

import numpy as np

from arch_zoo import attention
from arch_zoo.compare import spec
from configs.sweeps import zoology_fig2

SWEEP = "configs/sweeps/zoology_fig2.py"
LM_SWEEP = "configs/sweeps/lm_gpu.py"


def test_the_grid_is_zoologys_and_every_member_builds():
  groups, claims = spec.load_sweep(SWEEP)
  assert [g["name"] for g in groups] == ["T64_kv4", "T128_kv8", "T256_kv16"]
  np.testing.assert_allclose(groups[0]["learning_rates"], [1e-4, 4.6416e-4, 2.1544e-3, 1e-2],
                             rtol=1e-4)
  families = attention.names_supporting(True)
  planned = spec.plan(groups)
  for group in groups:
    found = planned[group["name"]]
    assert len(found) == len(families) * 4 * 4  # families x widths x learning rates, one seed
    steps = {m["steps"] for m in found}
    batch = 512 if group["name"] != "T256_kv16" else 256
    assert steps == {zoology_fig2.EPOCHS * 100_000 // batch}  # equal budgets, whole epochs
  assert {c.group for c in claims} <= {g["name"] for g in groups}


def test_a_member_has_zoologys_data_model_and_optimiser():
  groups, _ = spec.load_sweep(SWEEP)
  group = groups[2]
  member = next(m for m in spec.members(group) if m["variant"] == "lightning_d256")
  config = spec.check_member(member, set())
  assert (config.data.train_slices, config.data.test_slices) == ("256:16", "256:16")
  assert config.data.vocab_size == config.model.vocab_size == 8192
  assert (config.data.train_examples, config.data.test_examples) == (100_000, 3_000)
  assert config.data.random_non_queries is False and config.data.power_a == 0.01
  assert (config.model.num_layers, config.model.d_model) == (2, 256)
  assert config.model.mlp == "none"  # Zoology's blocks: attention only
  assert config.model.attention.name == "lightning"
  assert (config.optim.weight_decay, config.optim.b2, config.optim.warmup_steps,
          config.optim.min_lr_ratio, config.optim.grad_clip) == (0.1, 0.999, 0, 0.0, 0.0)
  assert config.train.batch_size == 256
  # Zoology's early stopping, validated on every test example once per epoch.
  assert config.train.stop_when == "accuracy>=0.99"
  assert config.train.eval_batches * config.eval.batch_size >= 3_000
  assert config.train.eval_every == 100_000 // 256


def test_the_lm_comparison_matches_parameters_with_equal_budgets():
  groups, claims = spec.load_sweep(LM_SWEEP)
  (group,) = groups
  found = spec.plan(groups)["lm_M"]
  families = attention.names_supporting(True)
  assert len(found) == len(families) * 4 * 3  # learning rates x seeds
  assert {m["steps"] for m in found} == {900}
  totals = {}
  for member in found:
    config = spec.check_member(member, set())
    assert (config.data.packing, config.data.tokenizer) == (
        "pack", "hf:.data/tokenizers/austen_kjv_bpe8192.json")
    assert config.data.seq_len == 512 and config.train.batch_size == 16
    totals[member["variant"]] = spec.count_params(config.model)["total"]
  reference = totals["mha"]
  assert 25e6 < reference < 35e6
  for family, total in totals.items():
    assert abs(total - reference) <= spec.MATCH_TOLERANCE * reference, (family, total)
  # The papers' claims, one per built-in family (a plugin another test registered may add a
  # variant, never a claim).
  assert {c.variant for c in claims} == {"moh", "lightning", "masa", "dynamic_mask", "routing"}
