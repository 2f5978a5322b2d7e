"""Text generation from a trained language model: load a run, then sample in one jitted loop.

    from arch_zoo import generate
    run = generate.load_run("runs/demo_lm_mha_S")          # the latest checkpoint
    print(generate.generate_text(run, ["It is a truth"], 200, seed=0)[0])
    ids = generate.generate(run.model, [prompt_ids], 50, temperature=0)  # token ids per row

Decoding follows the decode interface (docs/attention/decoding.md): prompts of different lengths are
LEFT-padded to a common length T, ``prefill`` reads them, then ``decode_step`` feeds one token per
row per step. A model with ``prefill``/``decode_step`` (cached decoding) is used through them;
otherwise, or with ``decoder="reference"``, :class:`ReferenceDecoder` recomputes one plain forward
pass per step. The reference decoder is exact for every family by construction (it is the model's
own forward over each row's unpadded tokens), so it is the oracle the cached decoders are tested
against.

Past the model's training length, ``window`` slides the context (the model reads the last
``window`` tokens, as nanoGPT samples): ``generate_text`` and generate.py do this with the run's
``data.seq_len``, since a model does not extrapolate far beyond the positions it was trained on.

Sampling: logits / temperature, then top-k, then top-p (nucleus) on what is left; temperature 0
is greedy (argmax). The same seed gives the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from arch_zoo import runs, sharding
from arch_zoo.data import tokenizers
from arch_zoo.errors import UserError

DECODERS = ("auto", "cached", "reference")


# ------------------------------------------------------------------------------- loading a run


@dataclasses.dataclass
class Run:
  """A restored language-model run: what generation needs."""

  workdir: str
  config: ConfigDict
  model: nnx.Module  # the LanguageModel with the checkpoint's weights
  tokenizer: Any  # the run's data tokenizer (``arch_zoo.data.tokenizers``)
  step: int

  @property
  def max_len(self) -> int:
    """The longest sequence the model was trained on (``data.seq_len``)."""
    return int(self.config.data.seq_len)


def load_run(workdir: str, step: int | None = None) -> Run:
  """Restores checkpoint ``step`` (default: the latest) of a train.py language-model run."""
  config = runs.load_config(workdir)
  if config.task != "lm":
    raise UserError(f"{workdir} is a {config.task} run; generation needs a language-model run "
                    "(one trained with configs/lm.py, task lm).")
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_for(config.sharding)
  state, graphdef = runs.restore(workdir, config, step, mesh, rules)
  model = nnx.merge(graphdef, state.params, state.model_state)
  return Run(workdir, config, model, tokenizers.build(config.data.tokenizer), int(state.step))


# ---------------------------------------------------------------------------------- decoders


class ReferenceDecoder:
  """The decode interface by recomputation: each call runs ``model(tokens)`` over a fixed-size
  buffer ``[B, width]`` in which row b's tokens are left-ALIGNED (its unpadded sequence from slot
  0, zeros after it). Causality makes the zeros after a row's last token invisible to it, and the
  positions are the unpadded ones, so every logit is the plain forward's over that row alone, for
  every family (lightning takes no segment ids, so masking padding would not be). Fixed shapes:
  jittable, one compile per buffer size. Cost: a whole forward per token.

  ``window``: the longest context the model reads. A row that fills it drops its oldest token
  (the model then reads the last ``window`` tokens at positions 0..window-1, as nanoGPT samples
  past its block size): generation can go on past the training length without the model ever
  reading positions it was not trained on."""

  def __init__(self, model, window: int | None = None):
    self.model = model
    self.window = window

  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    width = max_len if self.window is None else min(max_len, self.window)
    # tokens: the aligned buffer; lengths: each row's tokens so far (its next slot until full).
    return {"tokens": jnp.zeros((batch, width), jnp.int32),
            "lengths": jnp.zeros((batch,), jnp.int32)}

  def _logits(self, buffer: jax.Array) -> jax.Array:
    logits, _ = self.model(buffer, deterministic=True)
    return logits.astype(jnp.float32)

  def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: dict[str, jax.Array]):
    _, t = tokens.shape
    width = cache["tokens"].shape[1]
    if t > width:
      raise ValueError(f"prompts of {t} tokens do not fit the decode buffer of {width}.")
    padding = (t - lengths)[:, None]  # row b's position j sits in slot j + padding_b
    position = jnp.arange(width)[None]
    aligned = jnp.where(position < lengths[:, None],
                        jnp.take_along_axis(tokens, jnp.minimum(position + padding, t - 1), 1), 0)
    logits = self._logits(aligned.astype(jnp.int32))
    slot_position = jnp.clip(jnp.arange(t)[None] - padding, 0, width - 1)  # padding: any
    logits = jnp.take_along_axis(logits, slot_position[..., None], 1)
    return logits, {"tokens": aligned.astype(jnp.int32), "lengths": lengths.astype(jnp.int32)}

  def decode_step(self, tokens: jax.Array, cache: dict[str, jax.Array]):
    buffer, lengths = cache["tokens"], cache["lengths"]
    width = buffer.shape[1]
    full = lengths >= width  # only with a window: slide the row by one token
    buffer = jnp.where(full[:, None], jnp.roll(buffer, -1, axis=1), buffer)
    slot = jnp.minimum(lengths, width - 1)
    rows = jnp.arange(tokens.shape[0])
    buffer = buffer.at[rows, slot].set(tokens.astype(jnp.int32))
    logits = self._logits(buffer)[rows, slot]
    return logits, {"tokens": buffer, "lengths": lengths + 1}


def has_cached_decoding(model) -> bool:
  return all(callable(getattr(model, name, None))
             for name in ("init_cache", "prefill", "decode_step"))


def decoder_for(model, decoder: str = "auto", *, window: int | None = None):
  """The object whose ``init_cache``/``prefill``/``decode_step`` generation calls. ``window``
  (a sliding context, see :class:`ReferenceDecoder`) needs the reference decoder: a cache keeps
  states computed from tokens that would have slid out."""
  if decoder not in DECODERS:
    raise UserError(f"decoder must be one of {', '.join(DECODERS)}; got {decoder!r}.")
  if decoder == "reference" or (decoder == "auto" and (window or not has_cached_decoding(model))):
    return ReferenceDecoder(model, window)
  if window:
    raise UserError(f"a sliding context window of {window} tokens needs decoder='reference' "
                    "(or fewer tokens: prompt plus new ones within the window).")
  if not has_cached_decoding(model):
    raise UserError(f"{type(model).__name__} has no cached decoding (init_cache, prefill, "
                    "decode_step); use decoder='reference'.")
  return model


# ---------------------------------------------------------------------------------- sampling


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if not temperature >= 0:  # also NaN
    raise UserError(f"temperature must be >= 0 (0: greedy, 1: the model's distribution); got "
                    f"{temperature}.")
  if top_k < 0:
    raise UserError(f"top_k must be >= 0 (0 keeps every token); got {top_k}.")
  if not 0 < top_p <= 1:
    raise UserError(f"top_p must be in (0, 1] (1 keeps every token); got {top_p}.")


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """``logits [..., V] / temperature`` with the tokens outside the top ``top_k`` (exactly k, ties
  by index) and then outside the nucleus (the smallest set of most likely tokens whose probability
  reaches ``top_p``) set to -inf. ``temperature`` > 0 here; 0 means greedy (see :func:`sample`)."""
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    _, kept = jax.lax.top_k(logits, top_k)
    keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), kept, True, axis=-1, inplace=False)
    logits = jnp.where(keep, logits, -jnp.inf)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1, stable=True)
    probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, -1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p  # the most likely token always stays
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), -1)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int,
           top_p: float) -> jax.Array:
  """One token id per row of ``logits [B, V]``."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


# -------------------------------------------------------------------------------- generation


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens [B, T] int32, lengths [B] int32)``: row b's prompt in the last ``L_b`` slots."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), int(lengths.max())), np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      tokens[row, -len(prompt):] = np.asarray(prompt, np.int32)
  return tokens, lengths


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos_id", "decoder", "window"))
def _generate(graphdef, state, tokens, lengths, key, *, max_new_tokens: int, temperature: float,
              top_k: int, top_p: float, eos_id: int | None, decoder: str, window: int | None):
  """``(new tokens [B, N], count [B])``: one while loop over the new tokens; a row that wrote
  ``eos_id`` stops (its later slots hold ``eos_id``) and the loop ends when every row has."""
  model = nnx.merge(graphdef, state)
  dec = decoder_for(model, decoder, window=window)
  batch, width = tokens.shape
  draw = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
  cache = dec.init_cache(batch, width + max_new_tokens)
  logits, cache = dec.prefill(tokens, lengths, cache)
  first = draw(logits[:, -1], jax.random.fold_in(key, 0))  # every row's last prompt slot
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
  stop = -1 if eos_id is None else eos_id
  done = first == stop

  def running(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(carry):
    i, previous, cache, out, done = carry
    logits, cache = dec.decode_step(previous, cache)
    token = jnp.where(done, stop, draw(logits, jax.random.fold_in(key, i)))
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
    return i + 1, token, cache, out, done | (token == stop)

  i, _, _, out, _ = jax.lax.while_loop(running, step, (jnp.int32(1), first, cache, out, done))
  out = jnp.where(jnp.arange(max_new_tokens)[None] < i, out, stop)  # rows done before the end
  finished = out == stop
  count = jnp.where(finished.any(-1), jnp.argmax(finished, -1), max_new_tokens)
  return out, count


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, decoder: str = "auto", window: int | None = None
             ) -> list[np.ndarray]:
  """The new token ids of each prompt (a list of int32 arrays; a row that produced ``eos_id``
  ends before it). ``prompts``: token-id sequences of any lengths >= 1. ``decoder``: ``auto``
  (cached decoding where the model has it), ``cached`` or ``reference``. ``window``: the longest
  context the model reads (e.g. its training length); where prompt plus new tokens exceed it, the
  oldest tokens slide out (reference decoder). None: the model reads everything."""
  check_sampling(temperature, top_k, top_p)
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
  if not len(prompts) or any(len(p) == 0 for p in prompts):
    raise UserError("every prompt needs at least one token; got an empty prompt.")
  tokens, lengths = left_pad(prompts)
  if window is not None and tokens.shape[1] > window:
    raise UserError(f"a prompt of {tokens.shape[1]} tokens is longer than the context window "
                    f"{window}; shorten it.")
  if window is not None and tokens.shape[1] + max_new_tokens <= window:
    window = None  # everything fits: no sliding, any decoder
  decoder_for(model, decoder, window=window)  # a clear error now rather than inside the trace
  graphdef, state = nnx.split(model)
  out, count = _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths),
                         jax.random.key(seed), max_new_tokens=int(max_new_tokens),
                         temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                         eos_id=eos_id, decoder=decoder, window=window)
  out, count = np.asarray(out), np.asarray(count)
  return [row[:n] for row, n in zip(out, count)]


def encode_prompt(run: Run, text: str) -> np.ndarray:
  """``text`` as token ids, with a clear error for what this run cannot read."""
  if not text:
    raise UserError("the prompt is empty; give some text to continue, e.g. --prompt \"It is a "
                    "truth\".")
  try:
    ids = np.asarray(run.tokenizer.encode(text), np.int64)
  except UnicodeError as e:
    bad = text[e.start:e.end] if hasattr(e, "start") else ""
    raise UserError(f"the prompt has characters the {run.config.data.tokenizer} tokenizer cannot "
                    f"encode ({bad!r}); use valid UTF-8 text.") from e
  unk = run.tokenizer.unk_id
  if unk is not None and unk in ids:
    unknown = unencodable(run.tokenizer, text)
    raise UserError(f"the prompt has text the {run.config.data.tokenizer} tokenizer cannot "
                    f"encode ({unknown!r}); leave it out.")
  vocab = int(run.config.model.vocab_size)
  if ids.size and ids.max() >= vocab:
    raise UserError(f"the prompt encodes to token ids >= the model's vocabulary ({vocab}); use "
                    "text the model was trained on.")
  if len(ids) > run.max_len:
    raise UserError(f"the prompt is {len(ids)} tokens, longer than the model's maximum length "
                    f"{run.max_len} (data.seq_len); shorten it to at most {run.max_len} tokens.")
  return ids.astype(np.int32)


def unencodable(tokenizer, text: str) -> str:
  """The words of ``text`` that ``tokenizer`` encodes with its unknown token, in order."""
  words = dict.fromkeys(text.split()) or {text: None}
  return " ".join(w for w in words if tokenizer.unk_id in tokenizer.encode(w))


def generate_text(run: Run, texts: Sequence[str], max_new_tokens: int, **options) -> list[str]:
  """The continuation of each text (prompt excluded), decoded with the run's tokenizer. The
  model reads at most its training length (``window=run.max_len`` unless given): past it, the
  oldest tokens slide out."""
  prompts = [encode_prompt(run, text) for text in texts]
  # A row ends at the tokenizer's end-of-document token (byte: NUL), which is not shown.
  options = {"eos_id": run.tokenizer.eod_id, "window": run.max_len, **options}
  rows = generate(run.model, prompts, max_new_tokens, **options)
  return [run.tokenizer.decode(row) for row in rows]
