"""Prepares the offline default datasets as TFDS array_record datasets, and tokenizers.

    python -m arch_zoo.data.prepare austen fashion_mnist_debian [--data_dir DIR]
    python -m arch_zoo.data.prepare tokenizer --corpus austen --vocab_size 8192 [--kind bpe|unigram]
        [--out PATH] [--data_dir DIR]
    python -m arch_zoo.data.prepare tiktoken [--out DIR]     # needs a network: GPT-2's files
    python -m arch_zoo.data.prepare text --corpus austen+kjv --out .data/docs [--data_dir DIR]

Datasets: fetches the Debian package (see :mod:`arch_zoo.data.debian`; a package already installed
system-wide is used where it is), then builds the custom TFDS dataset
into ``DIR`` (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Safe to re-run: a
prepared dataset is left as it is.

``tokenizer`` trains a tokenizer offline on a corpus's training split (``austen`` or
``text:GLOB``, all of each file) and prints the ``data.tokenizer=...`` that uses it
(:mod:`arch_zoo.data.tokenizers`). ``tiktoken`` writes GPT-2's vocabulary as ``gpt2.tiktoken``,
the one step that downloads (through tiktoken), for a machine that has a network.

``text`` writes prepared corpora as UTF-8 files, one per corpus and split
(``OUT/austen_train.txt``), their documents joined by the record separator ``\x1e``, for a
machine without TFDS (the GPU machines): ``data=text:OUT/*_train.txt`` with
``data.doc_separator='\x1e'`` reads the same documents (and holds out its own validation part).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib
import os
import sys
import time

from arch_zoo.data import DATASETS, default_data_dir, is_prepared

TEXT_CORPORA = ("austen", "kjv")  # the prepared text datasets
# Joins the documents of an exported corpus: a control character no prepared text contains.
DOCUMENT_SEPARATOR = "\x1e"


def prepare(name: str, data_dir: str | None = None) -> str:
  import tensorflow_datasets as tfds

  from arch_zoo.data import debian

  data_dir = data_dir or default_data_dir()
  if name not in DATASETS:
    raise SystemExit(f"Unknown offline dataset {name!r}; known: {', '.join(DATASETS)}.")
  if is_prepared(name, data_dir):
    print(f"{name}: already prepared in {data_dir}")
    return data_dir
  spec = DATASETS[name]
  start = time.time()
  if spec.installed_path and os.path.isdir(spec.installed_path):
    manual_dir = spec.installed_path
  else:
    manual_dir = debian.unpacked(spec.debian_package)
  module = importlib.import_module(f"arch_zoo.data.builders.{name}")
  builder = module.Builder(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
  print(f"{name}: prepared in {data_dir} ({sizes}) in {time.time() - start:.1f}s")
  return data_dir


def corpus_texts(corpus: str, data_dir: str | None = None) -> list[str]:
  """The documents of a corpus's training split: ``austen`` or ``kjv`` (their chapters),
  ``text:GLOB`` (each file whole), or several joined by ``+`` as ``data.name`` joins them."""
  from arch_zoo.data import text

  if "+" in corpus:
    return [doc for part in corpus.split("+") for doc in corpus_texts(part, data_dir)]
  if corpus.startswith("text:"):
    pattern = os.path.expanduser(corpus[len("text:"):])
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
      raise FileNotFoundError(f"--corpus {corpus} matches no files (the glob is expanded from "
                              f"{os.getcwd()}).")
    return [text.read_text_file(p) for p in paths]
  if corpus not in DATASETS or corpus == "fashion_mnist_debian":
    raise ValueError(f"Unknown --corpus {corpus!r}; valid: {', '.join(TEXT_CORPORA)}, text:GLOB, "
                     "or several joined by '+'.")
  return list(text.read_tfds_texts(corpus, "train", data_dir or default_data_dir(), "text"))


def default_tokenizer_path(corpus: str, kind: str, vocab_size: int) -> str:
  from arch_zoo.data import tokenizers

  name = corpus
  if corpus.startswith("text:"):  # a name that a glob cannot break
    name = "text-" + hashlib.sha256(corpus.encode()).hexdigest()[:8]
  extension = "json" if kind == "bpe" else "model"
  return os.path.join(tokenizers.default_dir(), f"{name}-{kind}{vocab_size}.{extension}")


def prepare_tokenizer(corpus: str, vocab_size: int, kind: str = "bpe", out: str | None = None,
                      data_dir: str | None = None) -> str:
  """Trains a ``kind`` tokenizer of ``vocab_size`` tokens on ``corpus``; returns its spelling."""
  from arch_zoo.data import tokenizers

  start = time.time()
  texts = corpus_texts(corpus, data_dir)
  path = os.path.expanduser(out or default_tokenizer_path(corpus, kind, vocab_size))
  spec = tokenizers.train(texts, kind, vocab_size, path)
  tokenizer = tokenizers.build(spec)
  sample = "\n".join(texts[:200])
  ratio = len(sample.encode("utf-8")) / max(len(tokenizer.encode(sample)), 1)
  print(f"{corpus}: trained a {kind} tokenizer of {tokenizer.vocab_size} tokens "
        f"({ratio:.2f} bytes per token) in {time.time() - start:.1f}s; wrote {path}")
  print(f"Use it with: --config.data.tokenizer={spec}")
  return spec


def prepare_tiktoken(out: str | None = None) -> str:
  """GPT-2's vocabulary as ``OUT/gpt2.tiktoken``, through tiktoken (which downloads it)."""
  import base64

  from arch_zoo.data import tokenizers

  directory = os.path.expanduser(out or tokenizers.default_dir())
  path = os.path.join(directory, tokenizers.GPT2_FILES[0])
  if os.path.isfile(path):
    print(f"{path}: already there")
    return path
  from tiktoken_ext import openai_public

  try:
    ranks = openai_public.gpt2()["mergeable_ranks"]
  except Exception as e:  # noqa: BLE001 -- requests' errors, by the network's failure
    raise RuntimeError(f"tiktoken could not fetch GPT-2's files ({type(e).__name__}); run this "
                       "command on a machine with a network, then copy the file over.") from None
  os.makedirs(directory, exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
      f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
  os.replace(path + ".tmp", path)
  print(f"wrote {path}; copy it into the tokenizer directory of the machine without a network "
        f"(${tokenizers.DIR_ENV}, else ~/.cache/arch_zoo/tokenizers) and use "
        "--config.data.tokenizer=tiktoken:gpt2")
  return path


def _tokenizer_main(argv) -> None:
  from arch_zoo.data import tokenizers

  parser = argparse.ArgumentParser(prog="python -m arch_zoo.data.prepare tokenizer",
                                   description="Trains a tokenizer offline on a corpus.")
  parser.add_argument("--corpus", default="austen",
                      help="austen, kjv, text:GLOB, or several joined by '+'")
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--kind", default="bpe", choices=tokenizers.KINDS)
  parser.add_argument("--out", default=None, help="the file to write (default: in "
                      f"${tokenizers.DIR_ENV}, else ~/.cache/arch_zoo/tokenizers)")
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args(argv)
  prepare_tokenizer(args.corpus, args.vocab_size, args.kind, args.out, args.data_dir)


def _tiktoken_main(argv) -> None:
  parser = argparse.ArgumentParser(prog="python -m arch_zoo.data.prepare tiktoken",
                                   description="Writes GPT-2's vocabulary (needs a network).")
  parser.add_argument("--out", default=None, help="the directory to write gpt2.tiktoken into")
  prepare_tiktoken(parser.parse_args(argv).out)


def _datasets_main(argv) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      epilog="Tokenizers: `python -m arch_zoo.data.prepare tokenizer --help` (train one offline) "
             "and `python -m arch_zoo.data.prepare tiktoken --help` (GPT-2's, with a network).")
  parser.add_argument("names", nargs="+", choices=sorted(DATASETS))
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args(argv)
  for name in args.names:
    prepare(name, args.data_dir)




def export_text(corpus: str, out: str, data_dir: str | None = None) -> list[str]:
  """Writes every split of each prepared corpus of ``corpus`` (``austen+kjv``) as one UTF-8 file
  of documents joined by :data:`DOCUMENT_SEPARATOR`; returns the paths."""
  from arch_zoo.data import text

  names = [name for name in corpus.split("+") if name]
  unknown = [name for name in names if name not in TEXT_CORPORA]
  if unknown or not names:
    raise ValueError(f"--corpus names {unknown or corpus!r}; give prepared text corpora joined "
                     f"by '+': {'+'.join(TEXT_CORPORA)}.")
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
  os.makedirs(out, exist_ok=True)
  paths = []
  for name in names:
    for split in ("train", "validation"):
      docs = text.read_tfds_texts(name, split, data_dir, "text")
      if any(DOCUMENT_SEPARATOR in doc for doc in docs):
        raise ValueError(f"{name} {split} contains the separator {DOCUMENT_SEPARATOR!r}.")
      path = os.path.join(out, f"{name}_{split}.txt")
      with open(path + ".partial", "w", encoding="utf-8") as f:
        f.write(DOCUMENT_SEPARATOR.join(docs))
      os.replace(path + ".partial", path)
      paths.append(path)
      print(f"wrote {path} ({len(docs)} documents)")
  print(f"use: --config.data.name='text:{out}/*_train.txt' "
        "--config.data.doc_separator='\\x1e'")
  return paths


def _text_main(argv) -> None:
  parser = argparse.ArgumentParser(prog="python -m arch_zoo.data.prepare text",
                                   description="Writes prepared corpora as text files.")
  parser.add_argument("--corpus", default="austen+kjv")
  parser.add_argument("--out", required=True, help="the directory to write into")
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args(argv)
  export_text(args.corpus, args.out, args.data_dir)


COMMANDS = {"tokenizer": _tokenizer_main, "tiktoken": _tiktoken_main, "text": _text_main}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  command = COMMANDS.get(argv[0]) if argv else None
  try:
    if command:
      command(argv[1:])
    else:
      _datasets_main(argv)
  except Exception as e:  # a setup step: print the actionable message, not a traceback
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
