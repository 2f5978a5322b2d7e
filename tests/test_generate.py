"""Generation: sampling filters against NumPy definitions, the reference decoder and the jitted loop
against plain forward passes, and generate.py's one-line errors."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import generate as generate_cli
from tests.helpers import train_tiny_lm
from arch_zoo import generate, models, workdir as workdir_lib
from configs import lm, vit

FAMILIES = ["mha", "moh", "lightning", "routing", "dynamic_mask", "masa"]


def tiny_model(attn="mha", seed=0):
  return models.build(lm.get_config(f"attn={attn},size=test").model, rngs=nnx.Rngs(seed))


def forward_logits(model, tokens):
  """One plain forward pass over one unpadded sequence: logits [T, V] as NumPy."""
  logits, _ = model(jnp.asarray(np.asarray(tokens, np.int32)[None]))
  return np.asarray(logits[0], np.float32)


# ------------------------------------------------------------------------------ sampling filters


def kept(filtered):
  return np.isfinite(np.asarray(filtered))


def test_top_k_keeps_exactly_the_k_largest():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 50)).astype(np.float32)
  for k in (1, 5, 49):
    mask = kept(generate.filter_logits(jnp.asarray(logits), top_k=k))
    expected = np.zeros_like(mask)
    np.put_along_axis(expected, np.argsort(-logits, axis=-1)[:, :k], True, axis=-1)
    np.testing.assert_array_equal(mask, expected)
  ties = np.zeros((2, 10), np.float32)  # every token tied: still exactly k
  assert kept(generate.filter_logits(jnp.asarray(ties), top_k=3)).sum(-1).tolist() == [3, 3]
  assert kept(generate.filter_logits(jnp.asarray(logits), top_k=0)).all()


def nucleus(probs, p):
  """The smallest set of most likely tokens whose probability reaches p (float64)."""
  order = np.argsort(-probs)
  size = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
  keep = np.zeros(len(probs), bool)
  keep[order[:size]] = True
  return keep


def test_top_p_keeps_the_smallest_set_reaching_p():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 40)) * 2
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  for row in range(3):
    mass = np.cumsum(np.sort(probs[row])[::-1])
    # p between two cumulative masses (so float32 rounding cannot move the boundary), and p = 1.
    for p in [(mass[0] + mass[1]) / 2, (mass[4] + mass[5]) / 2, (mass[20] + mass[21]) / 2, 1.0,
              mass[0] / 2]:
      mask = kept(generate.filter_logits(jnp.asarray(logits[row:row + 1], jnp.float32),
                                         top_p=float(p)))[0]
      np.testing.assert_array_equal(mask, nucleus(probs[row], p), err_msg=f"p={p}")


def test_top_p_applies_to_what_top_k_and_temperature_leave():
  logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32))
  # top-k 3 renormalises to 0.588, 0.235, 0.176: p=0.8 needs the first two.
  mask = kept(generate.filter_logits(jnp.asarray(logits), top_k=3, top_p=0.8))
  assert mask.tolist() == [[True, True, False, False, False]]
  # temperature 2 flattens to probs ~ sqrt(p): 0.31, 0.20, 0.17, 0.14, 0.10 -> p=0.5 needs two.
  mask = kept(generate.filter_logits(jnp.asarray(logits), temperature=2.0, top_p=0.5))
  assert mask.tolist() == [[True, True, False, False, False]]


def test_temperature_scales_the_logits():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 30)).astype(np.float32)
  for t in (0.5, 1.0, 3.0):
    got = jax.nn.softmax(generate.filter_logits(jnp.asarray(logits), temperature=t))
    scaled = np.exp(logits / t - (logits / t).max(-1, keepdims=True))
    np.testing.assert_allclose(got, scaled / scaled.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
  # Temperature 0 is greedy.
  picks = generate.sample(jnp.asarray(logits), jax.random.key(0), temperature=0, top_k=0,
                          top_p=1.0)
  np.testing.assert_array_equal(picks, logits.argmax(-1))


def test_samples_follow_the_filtered_distribution():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 4000))
  picks = np.asarray(generate.sample(logits, jax.random.key(0), temperature=1.0, top_k=3,
                                     top_p=1.0))
  freq = np.bincount(picks, minlength=4) / picks.size
  np.testing.assert_allclose(freq, [4 / 9, 3 / 9, 2 / 9, 0], atol=0.03)


# ------------------------------------------------------------------------ the reference decoder


@pytest.mark.parametrize("attn", FAMILIES)
def test_reference_decoder_equals_the_plain_forward_of_each_row(attn):
  """The decode interface's correctness rule: prefill of left-padded rows of different lengths,
  then decode steps, give each row's plain-forward logits at every valid position."""
  model = tiny_model(attn)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(1, 256, n).tolist() for n in (7, 3, 11)]
  fed = rng.integers(1, 256, (3, 4))
  tokens, lengths = generate.left_pad(prompts)
  decoder = generate.ReferenceDecoder(model)
  cache = decoder.init_cache(3, tokens.shape[1] + fed.shape[1])
  prefill, cache = jax.jit(decoder.prefill)(jnp.asarray(tokens), jnp.asarray(lengths), cache)
  steps = []
  for i in range(fed.shape[1]):
    logits, cache = jax.jit(decoder.decode_step)(jnp.asarray(fed[:, i]), cache)
    steps.append(np.asarray(logits))
  for row, prompt in enumerate(prompts):
    full = forward_logits(model, prompt + fed[row].tolist())
    n = len(prompt)
    np.testing.assert_allclose(np.asarray(prefill)[row, -n:], full[:n], rtol=1e-5, atol=1e-5)
    for i, logits in enumerate(steps):
      np.testing.assert_allclose(logits[row], full[n + i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", FAMILIES + ["hybrid"])
def test_cached_decoding_equals_the_reference_decoder(attn):
  """Where the model has cached decoding (the decode interface), its logits equal the reference
  decoder's (each row's plain forward) to 1e-5, and greedy generation picks the same tokens."""
  if attn == "hybrid":
    config = lm.get_config("attn=lightning,size=test")
    config.model.layer_pattern = "lightning,mha"
    model = models.build(config.model, rngs=nnx.Rngs(0))
  else:
    model = tiny_model(attn)
  if not generate.has_cached_decoding(model):
    pytest.skip("this model has no cached decoding (init_cache, prefill, decode_step) yet")
  rng = np.random.default_rng(5)
  prompts = [rng.integers(1, 256, n).tolist() for n in (9, 2, 13)]
  fed = rng.integers(1, 256, (3, 5))
  tokens, lengths = generate.left_pad(prompts)
  outputs = []
  for decoder in (model, generate.ReferenceDecoder(model)):
    cache = decoder.init_cache(3, tokens.shape[1] + fed.shape[1])
    logits, cache = decoder.prefill(jnp.asarray(tokens), jnp.asarray(lengths), cache)
    steps = []
    for i in range(fed.shape[1]):
      step, cache = decoder.decode_step(jnp.asarray(fed[:, i]), cache)
      steps.append(np.asarray(step))
    outputs.append((np.asarray(logits), np.stack(steps)))
  (cached, cached_steps), (reference, reference_steps) = outputs
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(cached[row, -n:], reference[row, -n:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cached_steps, reference_steps, rtol=1e-5, atol=1e-5)
  greedy = [generate.generate(model, prompts, 6, temperature=0, decoder=d)
            for d in ("cached", "reference")]
  assert [r.tolist() for r in greedy[0]] == [r.tolist() for r in greedy[1]]


def test_greedy_generation_is_argmax_of_a_forward_rerun_token_by_token():
  model = tiny_model("mha")
  prompt = [84, 104, 101, 32, 115, 101, 97]
  sequence = list(prompt)
  for _ in range(8):  # the oracle: the whole sequence again for every token
    sequence.append(int(forward_logits(model, sequence)[-1].argmax()))
  got = generate.generate(model, [prompt], 8, temperature=0)
  assert got[0].tolist() == sequence[len(prompt):]


@pytest.mark.parametrize("attn", ["mha", "lightning"])
def test_a_sliding_window_reads_the_last_window_tokens(attn):
  """Past ``window`` tokens, each new token is the argmax of a forward over the last ``window``."""
  model = tiny_model(attn)
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
  window = 8
  got = generate.generate(model, prompts, 10, temperature=0, window=window)
  for prompt, row in zip(prompts, got):
    sequence = list(prompt)
    for _ in range(10):
      sequence.append(int(forward_logits(model, sequence[-window:])[-1].argmax()))
    assert row.tolist() == sequence[len(prompt):]
  with pytest.raises(generate.UserError, match="needs decoder='reference'"):
    generate.generate(model, prompts, 10, window=window, decoder="cached")


@pytest.mark.parametrize("attn", ["mha", "lightning"])
def test_batched_rows_of_different_lengths_equal_each_row_alone(attn):
  model = tiny_model(attn)
  rng = np.random.default_rng(4)
  prompts = [rng.integers(1, 256, n).tolist() for n in (5, 12, 1)]
  batched = generate.generate(model, prompts, 6, temperature=0)
  for prompt, row in zip(prompts, batched):
    alone = generate.generate(model, [prompt], 6, temperature=0)[0]
    assert row.tolist() == alone.tolist()


def test_same_seed_same_tokens_different_seed_different_tokens():
  model = tiny_model("mha")
  prompts = [[1, 2, 3], [7, 8]]
  first = generate.generate(model, prompts, 20, seed=5)
  again = generate.generate(model, prompts, 20, seed=5)
  other = generate.generate(model, prompts, 20, seed=6)
  assert [r.tolist() for r in first] == [r.tolist() for r in again]
  assert [r.tolist() for r in first] != [r.tolist() for r in other]


def test_a_row_stops_at_the_end_token():
  model = tiny_model("mha")
  prompts = [[10, 20, 30], [40]]
  free = generate.generate(model, prompts, 10, temperature=0)
  eos = int(free[0][3])  # row 0's fourth token: row 0 ends before its first occurrence
  stopped = generate.generate(model, prompts, 10, temperature=0, eos_id=eos)
  cut = free[0].tolist().index(eos)
  assert stopped[0].tolist() == free[0].tolist()[:cut]
  row1 = free[1].tolist()
  assert stopped[1].tolist() == (row1[:row1.index(eos)] if eos in row1 else row1)


def test_cached_decoder_is_asked_for_where_the_model_has_none():
  model = tiny_model("mha")
  if generate.has_cached_decoding(model):
    pytest.skip("the model has cached decoding")
  with pytest.raises(generate.UserError, match="decoder='reference'"):
    generate.generate(model, [[1]], 2, decoder="cached")


def test_library_rejects_bad_sampling_settings():
  model = tiny_model("mha")
  for options, match in [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                         ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k")]:
    with pytest.raises(generate.UserError, match=match):
      generate.generate(model, [[1, 2]], 3, **options)
  with pytest.raises(generate.UserError, match="empty prompt"):
    generate.generate(model, [[1, 2], []], 3)


# ------------------------------------------------------------------------------ generate.py CLI


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, austen_data_dir):
  return train_tiny_lm(str(tmp_path_factory.mktemp("lm_run")), austen_data_dir)


def run_main(argv, capsys):
  """generate.py's main in this process: (exit code, stdout, stderr)."""
  try:
    code = generate_cli.main(["generate.py", *argv])
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def test_cli_prints_the_prompt_and_its_continuation_the_same_for_the_same_seed(lm_run, capsys):
  argv = ["--workdir", lm_run, "--prompt", "It is a truth", "--max_new_tokens", "12",
          "--seed", "3", "--num_samples", "2"]
  code, out, _ = run_main(argv, capsys)
  assert code == 0
  samples = out.split("--- sample ")[1:]
  assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("It is a truth")
                                   for s in samples)
  again = run_main(argv, capsys)
  assert again[0] == 0 and again[1] == out
  library = generate.generate_text(generate.load_run(lm_run), ["It is a truth"] * 2, 12, seed=3)
  assert [s.split("\n", 1)[1] for s in samples] == [f"It is a truth{t}\n" for t in library]


def one_error_line(code, err):
  lines = [line for line in err.splitlines() if line.strip()]
  assert code not in (0, None), err
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


@pytest.mark.parametrize("extra, expected", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x" * 33], "longer than the model's maximum length 32"),
    (["--prompt", "caf\udce9"], "cannot encode"),
    (["--prompt", "a", "--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--prompt", "a", "--top_p", "0"], r"--top_p must be in \(0, 1\]"),
    (["--prompt", "a", "--top_p", "1.2"], r"--top_p must be in \(0, 1\]"),
    (["--prompt", "a", "--top_k", "-1"], "--top_k must be >= 0"),
])
def test_cli_bad_input_gets_one_error_line(lm_run, capsys, extra, expected):
  line = one_error_line(*run_main(["--workdir", lm_run, *extra], capsys)[::2])
  assert re.search(expected, line), line


def test_cli_workdir_without_checkpoint_or_not_an_lm(tmp_path, capsys):
  no_checkpoint = tmp_path / "fresh"
  no_checkpoint.mkdir()
  workdir_lib.write_json(str(no_checkpoint / workdir_lib.CONFIG_FILE),
                         workdir_lib.config_dict(lm.get_config("attn=mha,size=test")))
  line = one_error_line(*run_main(["--workdir", str(no_checkpoint), "--prompt", "a"],
                                  capsys)[::2])
  assert "no checkpoint" in line and "train first" in line
  image_run = tmp_path / "vit"
  image_run.mkdir()
  workdir_lib.write_json(str(image_run / workdir_lib.CONFIG_FILE),
                         workdir_lib.config_dict(vit.get_config("attn=mha,size=test")))
  line = one_error_line(*run_main(["--workdir", str(image_run), "--prompt", "a"], capsys)[::2])
  assert "language-model run" in line
  line = one_error_line(*run_main(["--workdir", str(tmp_path / "missing"), "--prompt", "a"],
                                  capsys)[::2])
  assert "config.json does not exist" in line


def test_cli_as_a_process_exits_non_zero_with_one_line(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "generate.py", "--workdir", str(tmp_path), "--prompt",
                         "a", "--top_p", "2"], cwd=root, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode != 0
  assert done.stderr.strip().splitlines() == [
      "error: --top_p must be in (0, 1] (1 keeps every token); got 2.0."]
