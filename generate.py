r"""Samples text from a trained language-model run and prints it.

    python generate.py --workdir runs/demo_lm_mha_S --prompt "It is a truth" --max_new_tokens 200
    python generate.py --workdir runs/demo_lm_mha_S --prompt "Anne" --temperature 0   # greedy
    python generate.py --workdir runs/demo_lm_mha_S --prompt "Anne" --top_k 20 --top_p 0.9 \
        --seed 3 --num_samples 4

The prompt is printed, then the continuation; with ``--num_samples N`` the N samples (one batch,
one seed) follow each other under a ``--- sample i`` line. The same flags give the same text. The
model reads at most its training length (``data.seq_len``): past it, the oldest tokens slide out
of the context (recomputed with ``arch_zoo.generate.ReferenceDecoder``), as nanoGPT samples.
Library use: ``arch_zoo.generate`` (``load_run``, ``generate``, ``generate_text``).
"""

from __future__ import annotations

import sys

from absl import flags, logging

from arch_zoo import checkpoint, perf
from arch_zoo.errors import fail, message_of, run_cli

FLAGS = flags.FlagValues()  # its own flags: main() can run more than once in one process
flags.DEFINE_string("workdir", None, "Run directory of a train.py language-model run.",
                    flag_values=FLAGS)
flags.DEFINE_string("prompt", None, "Text to continue.", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.", flag_values=FLAGS)
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 is greedy decoding.",
                   flag_values=FLAGS)
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only (0: all).",
                     flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the most likely tokens holding this much "
                   "probability (1: all).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.",
                     flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 1, "Samples of the prompt, generated as one batch.",
                     flag_values=FLAGS)
flags.DEFINE_enum("decoder", "auto", ["auto", "cached", "reference"],
                  "auto: the model's cached decoding where it has one, else recomputation.",
                  flag_values=FLAGS)


def check_flags() -> None:
  """Mistakes found before anything is loaded."""
  if FLAGS.workdir is None:
    fail("--workdir is required: the directory of a train.py language-model run, e.g. python "
         "generate.py --workdir runs/demo_lm_mha_S --prompt \"It is a truth\"", code=2)
  if FLAGS.prompt is None or FLAGS.prompt == "":
    fail("the prompt is empty; give some text to continue, e.g. --prompt \"It is a truth\".",
         code=2)
  if FLAGS.max_new_tokens < 1:
    fail(f"--max_new_tokens must be >= 1; got {FLAGS.max_new_tokens}.", code=2)
  if FLAGS.num_samples < 1:
    fail(f"--num_samples must be >= 1; got {FLAGS.num_samples}.", code=2)
  if not FLAGS.temperature >= 0:
    fail(f"--temperature must be >= 0 (0: greedy, 1: the model's distribution); got "
         f"{FLAGS.temperature}.", code=2)
  if FLAGS.top_k < 0:
    fail(f"--top_k must be >= 0 (0 keeps every token); got {FLAGS.top_k}.", code=2)
  if not 0 < FLAGS.top_p <= 1:
    fail(f"--top_p must be in (0, 1] (1 keeps every token); got {FLAGS.top_p}.", code=2)


def main(argv: list[str]) -> int:
  FLAGS.unparse_flags()
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    fail(message_of(e), code=2)
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}; quote the prompt: --prompt \"It is a truth\".", code=2)
  check_flags()
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  checkpoint.quiet_orbax_errors()

  def work():
    from arch_zoo import generate, runs  # after the flag checks: JAX starts here
    perf.apply_xla_flags(runs.load_config(FLAGS.workdir).train.get("xla_flags", ""))
    run = generate.load_run(FLAGS.workdir, FLAGS.step)
    generate.encode_prompt(run, FLAGS.prompt)  # a bad prompt fails before compiling anything
    texts = generate.generate_text(
        run, [FLAGS.prompt] * FLAGS.num_samples, FLAGS.max_new_tokens,
        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
        decoder=FLAGS.decoder)
    for i, text in enumerate(texts):
      if FLAGS.num_samples > 1:
        print(f"--- sample {i}")
      print(FLAGS.prompt + text)

  return run_cli(work)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
