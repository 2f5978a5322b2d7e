"""Tokenizers: round trips of every kind, deterministic training, model.vocab_size following the
tokenizer, bits per byte across tokenizers, generation with a subword run, and the error lines."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from arch_zoo import generate, tasks
from arch_zoo.data import prepare, tokenizers
from arch_zoo.errors import message_of
from configs import lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Austen-like paragraphs with the non-ASCII characters of real editions (curly quotes, dashes,
# accents, the pound sign); repeated so that a small BPE finds merges.
PARAGRAPHS = [
    "It was a truth universally acknowledged in the neighbourhood of Highbury, that a young "
    "woman of four-and-twenty, with a fortune of £5000, must be in want of a husband.",
    "“My dear Emma,” said Mr. Knightley, “you have been naïve about Mrs. Élton’s café "
    "society—and I will not pretend otherwise.”",
    "Anne had been forced into prudence in her youth; she learned romance as she grew older: "
    "the natural sequel of an unnatural beginning.",
    "The façade of Pemberley rose before them, and Elizabeth felt—for the first time—that to "
    "be mistress of Pemberley might be something!",
    "“Oh! Mr. Darcy,” cried Miss Bingley, “how very fond you are of reading; I am sure I "
    "should never tire of a library.”",
]
CORPUS = [p for _ in range(20) for p in PARAGRAPHS]
# Held out: unseen words, characters that no training text has (CJK, an emoji), double spaces,
# newlines and the literal end-of-document string, which must stay text.
HELD_OUT = ("Captain Wentworth’s letter—“I can listen no longer in silence.”\n\n  Zoë’s "
            "résumé cost £12;  日本 🎉 <|endoftext|> end.\n")
VOCAB = 400


def write_tiktoken(path, ranks: dict[bytes, int]) -> None:
  with open(path, "wb") as f:
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
      f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def gpt2_release_from_hf(hf_path: str, directory) -> None:
  """GPT-2's encoder.json and vocab.bpe for a byte-level BPE trained by the tokenizers library
  (the same printable-byte alphabet): its vocabulary without <|endoftext|>, ids shifted down."""
  model = json.load(open(hf_path, encoding="utf-8"))["model"]
  encoder = {t: i - 1 for t, i in model["vocab"].items() if t != tokenizers.EOD_TOKEN}
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  (directory / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
  (directory / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """data.tokenizer spellings of every kind, on files made here."""
  root = tmp_path_factory.mktemp("tokenizers")
  specs = {"byte": "byte",
           "bpe": tokenizers.train(CORPUS, "bpe", VOCAB, str(root / "bpe.json")),
           "unigram": tokenizers.train(CORPUS, "unigram", VOCAB, str(root / "unigram.model"))}
  release = root / "gpt2"
  release.mkdir()
  gpt2_release_from_hf(str(root / "bpe.json"), release)
  ranks = tokenizers.read_gpt2_release(str(release / "encoder.json"), str(release / "vocab.bpe"))
  write_tiktoken(root / "bpe.tiktoken", ranks)
  specs["tiktoken"] = f"tiktoken:{root / 'bpe.tiktoken'}"
  return root, specs


@pytest.mark.parametrize("kind", ["byte", "bpe", "unigram", "tiktoken"])
def test_round_trip_on_text_with_unseen_characters(trained, kind):
  tok = tokenizers.build(trained[1][kind])
  ids = tok.encode(HELD_OUT)
  assert ids.dtype == (np.uint8 if kind == "byte" else np.int32)
  assert tok.decode(ids) == HELD_OUT
  assert 0 <= ids.min() and ids.max() < tok.vocab_size and 0 <= tok.eod_id < tok.vocab_size
  assert tok.eod_id not in ids  # "<|endoftext|>" in a text is text
  assert tok.unk_id is None  # byte-level or byte fall-back: every text encodes
  if kind != "byte":
    assert tok.vocab_size == VOCAB  # tiktoken: the 399 ranks of the BPE, then its eod
    seen = "\n\n".join(PARAGRAPHS)
    assert len(tok.encode(seen)) < 0.6 * len(seen.encode("utf-8"))  # subwords, not bytes
  # A model's padding rows (ids past the tokenizer's vocabulary) are dropped when decoding.
  assert tok.decode(np.concatenate([ids, [tok.vocab_size + 3]])) == HELD_OUT


def test_tiktoken_reading_gpt2s_files_encodes_as_the_bpe_it_came_from(trained):
  """An independent oracle: tiktoken's encoder on the converted vocabulary gives the ids of the
  tokenizers library's BPE (shifted by its <|endoftext|> at id 0)."""
  hf, tt = tokenizers.build(trained[1]["bpe"]), tokenizers.build(trained[1]["tiktoken"])
  text = " ".join(PARAGRAPHS) + HELD_OUT
  np.testing.assert_array_equal(tt.encode(text), hf.encode(text) - 1)


def test_trained_tokenizers_are_deterministic(tmp_path, trained, capsys):
  root, specs = trained
  for kind, name in [("bpe", "bpe.json"), ("unigram", "unigram.model")]:
    again = tokenizers.train(CORPUS, kind, VOCAB, str(tmp_path / name))
    assert open(again.split(":", 1)[1], "rb").read() == open(root / name, "rb").read()
  # The prepare command, on text files (one document each), prints what to pass.
  for i, paragraph in enumerate(PARAGRAPHS):
    (tmp_path / f"doc{i}.txt").write_text(paragraph * 20, encoding="utf-8")
  out = tmp_path / "cli.json"
  argv = ["tokenizer", "--corpus", f"text:{tmp_path}/doc*.txt", "--vocab_size", "300",
          "--out", str(out)]
  assert prepare.main(argv) == 0
  assert f"--config.data.tokenizer=hf:{out}" in capsys.readouterr().out
  first = out.read_bytes()
  assert prepare.main(argv) == 0 and out.read_bytes() == first
  assert tokenizers.build(f"hf:{out}").vocab_size == 300


def resolved_vocab(size: str, tokenizer: str, **model) -> int:
  config = lm.get_config(f"size={size}")
  config.data.tokenizer = tokenizer
  config.model.update(model)
  tasks.get("lm").resolve(config)
  return config.model.vocab_size


def test_model_vocab_follows_the_tokenizer_unless_set(trained):
  bpe = trained[1]["bpe"]
  assert resolved_vocab("S", "byte") == 256 and resolved_vocab("124M", "byte") == 50304
  assert resolved_vocab("test", bpe) == 512  # 400 rounded up to 4 x 128
  assert resolved_vocab("124M", bpe) == 50304  # a smaller vocabulary keeps the GPT-2 shape
  assert resolved_vocab("test", bpe, vocab_size=1000) == 1000  # set, and it fits
  with pytest.raises(ValueError) as error:
    resolved_vocab("test", bpe, vocab_size=384)
  assert message_of(error.value) == (
      f"model.vocab_size=384 is smaller than the vocabulary of data.tokenizer={bpe} (400 "
      "tokens); set --config.model.vocab_size=512 or leave it unset to follow the tokenizer.")


def test_bits_per_byte_divides_by_the_bytes_of_the_text(tmp_path, trained):
  """bits/byte = nats per token x tokens / UTF-8 bytes / ln 2, for a tokenizer whose tokens are
  several bytes each."""
  from arch_zoo.data.text import LanguageModelingData
  from arch_zoo.evaluators import perplexity

  (tmp_path / "book.txt").write_text("\n\n".join(CORPUS) + HELD_OUT, encoding="utf-8")
  config = lm.get_config("size=test")
  config.data.update(name=f"text:{tmp_path}/book.txt", tokenizer=trained[1]["bpe"], seq_len=16,
                     val_fraction=0.2)
  data = LanguageModelingData(config.data, seed=0)
  tokens = data.validation.tokens
  text = data.tokenizer.decode(tokens[tokens != data.tokenizer.eod_id])
  # Each end-of-document token counts as one byte: the newline that used to join the documents
  # (docs/data/documents_and_packing.md).
  num_bytes = len(text.encode("utf-8")) + int((tokens == data.tokenizer.eod_id).sum())
  assert num_bytes > 2 * len(tokens)
  nats = 1.7  # every scored token costs this many nats

  def eval_step(params, model_state, batch):
    weights = float(batch["weights"].sum())
    return {"nll_sum": nats * weights, "weight_sum": weights, "correct_sum": 0.0}

  state = type("State", (), {"params": None, "model_state": None})()
  got = perplexity.evaluate(eval_step, state, data, batch_size=4)
  assert got["bits_per_byte"] == pytest.approx(nats * len(tokens) / num_bytes / math.log(2),
                                               rel=1e-12)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, trained):
  from train import train_and_evaluate

  root = tmp_path_factory.mktemp("bpe_run")
  (root / "book.txt").write_text("\n\n".join(CORPUS), encoding="utf-8")
  config = lm.get_config("attn=mha,size=test")
  config.data.update(name=f"text:{root}/book.txt", tokenizer=trained[1]["bpe"], seq_len=16)
  config.train.update(progress=False, steps=3, eval_every=0, checkpoint_every=0, batch_size=8)
  workdir = str(root / "run")
  final = train_and_evaluate(config, workdir)
  assert math.isfinite(final["bits_per_byte"])
  return workdir


def test_a_bpe_run_records_its_vocabulary_and_generates_with_its_tokenizer(bpe_run):
  saved = json.load(open(os.path.join(bpe_run, "config.json")))
  assert saved["model"]["vocab_size"] == 512
  run = generate.load_run(bpe_run)
  assert run.model.embed.embedding.value.shape[0] == 512
  prompt = "“My dear Emma,” said"
  text = generate.generate_text(run, [prompt], 6, temperature=0)[0]
  ids = generate.generate(run.model, [run.tokenizer.encode(prompt)], 6, temperature=0)[0]
  assert text == run.tokenizer.decode(ids)

  tokenizer = run.tokenizer

  class EndsAtFirst:  # the run's tokenizer, whose end-of-document token is the greedy first one
    def __getattr__(self, name):
      return getattr(tokenizer, name)
    eod_id = int(ids[0])

  run.tokenizer = EndsAtFirst()
  assert generate.generate_text(run, [prompt], 6, temperature=0) == [""]


def test_prompt_the_tokenizer_cannot_encode(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  word_level = Tokenizer(models.WordLevel(unk_token="[UNK]"))
  word_level.pre_tokenizer = pre_tokenizers.Whitespace()
  word_level.train_from_iterator(CORPUS, trainers.WordLevelTrainer(
      special_tokens=["[UNK]", tokenizers.EOD_TOKEN], show_progress=False))
  word_level.save(str(tmp_path / "words.json"))
  config = lm.get_config("size=test")
  config.data.tokenizer = f"hf:{tmp_path / 'words.json'}"
  run = generate.Run(str(tmp_path), config, None, tokenizers.build(config.data.tokenizer), 0)
  with pytest.raises(generate.UserError, match=r"cannot encode \('Zoë Élinor'\)"):
    generate.encode_prompt(run, "Emma Zoë said Élinor")
  assert len(generate.encode_prompt(run, "Emma said")) == 2


def test_bad_tokenizers_get_one_clear_line(tmp_path, monkeypatch):
  monkeypatch.setenv(tokenizers.DIR_ENV, str(tmp_path))

  def line(spec):
    with pytest.raises((ValueError, FileNotFoundError)) as error:
      tokenizers.build(spec)
    text = message_of(error.value)
    assert "\n" not in str(error.value) and text
    return text

  assert "valid: byte, spm:PATH.model, hf:PATH.json, tiktoken:gpt2" in line("bpe")
  assert f"no file at {os.path.abspath('missing.json')} or {tmp_path}/missing.json" in \
      line("hf:missing.json")
  (tmp_path / "bad.json").write_text("{not json")
  assert "is not a Hugging Face tokenizers file" in line(f"hf:{tmp_path}/bad.json")
  (tmp_path / "bad.model").write_bytes(b"\x00garbage")
  assert "is not a SentencePiece model" in line("spm:bad.model")  # found in the directory
  (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
  assert "line 1: not a tiktoken BPE line" in line(f"tiktoken:{tmp_path}/bad.tiktoken")
  missing = line("tiktoken:gpt2")
  assert all(s in missing for s in (str(tmp_path), "gpt2.tiktoken", "encoder.json and vocab.bpe",
                                    "python -m arch_zoo.data.prepare tiktoken"))
  write_tiktoken(tmp_path / "gpt2.tiktoken", {bytes([b]): b for b in range(256)})
  assert "has 256 tokens, not GPT-2's 50256" in line("tiktoken:gpt2")


def test_train_py_reports_a_vocabulary_too_small_for_the_tokenizer(trained, tmp_path):
  proc = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/lm.py:size=test", "--workdir",
       str(tmp_path / "run"), f"--config.data.tokenizer={trained[1]['unigram']}",
       "--config.model.vocab_size=300"],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: model.vocab_size=300 is smaller than the vocabulary of "
      f"data.tokenizer={trained[1]['unigram']} (400 tokens); set "
      "--config.model.vocab_size=512 or leave it unset to follow the tokenizer."]
  assert not os.path.exists(tmp_path / "run" / "config.json")
