"""A train.py run on disk: its saved config and its checkpoints, restored without training code.

``eval.py`` and ``arch_zoo.generate`` both start here: ``load_config`` reads the run's config
(importing the plugins it used), ``restore`` rebuilds the model once and restores a checkpoint
into it.
"""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from arch_zoo import checkpoint, optim, perf, plugins, train_state, workdir as workdir_lib


def load_config(workdir: str) -> ConfigDict:
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a train.py workdir (one whose "
                            "training has started)?")
  saved = workdir_lib.read_json(path)
  plugins.load(saved.get("plugins", ""))  # the families the run's config imported
  saved = workdir_lib.upgrade_config(saved)
  config = ConfigDict(saved)
  perf.resolve_auto_settings(config, saved)  # an `auto` that an older config.json implies
  if config.get("train") is not None:
    perf.resolve_xla_flags(config)  # a config.json not written by train.py may still say auto
  return config


def restore(workdir: str, config: ConfigDict, step: int | None, mesh, rules):
  """``(state, graphdef)`` of checkpoint ``step`` (default: the latest)."""
  tx, _ = optim.build(config.optim, config.train.steps)
  blueprint = train_state.trace(config, mesh, rules, tx)  # the one build of the model
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  if ckpt.latest_step() is None:
    raise checkpoint.CheckpointError(f"no checkpoint in {ckpt.directory}; train first (or wait "
                                     "for the run's first checkpoint).")
  state, _ = ckpt.restore(blueprint.abstract, step)
  ckpt.close()
  return state, blueprint.graphdef
