"""Backbones. ``build(config.model, rngs=...)`` dispatches on ``config.model.name``.

Their cost models: ``lm.flops_per_token``, ``vit.flops_per_image``, and ``state_sizes`` (the
decode-time state of each layer's attention), all from the families' own.
"""

from __future__ import annotations

from flax import nnx
from ml_collections import ConfigDict

from arch_zoo.models.block import layer_names, state_sizes
from arch_zoo.models.lm import LanguageModel
from arch_zoo.models.vit import VisionTransformer
from arch_zoo.registry import Registry

BACKBONES: Registry[type] = Registry("model name")
BACKBONES.add("lm", LanguageModel)
BACKBONES.add("vit", VisionTransformer)


def build(cfg: ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  return BACKBONES.get(cfg.name)(cfg, rngs=rngs)


def used_config(cfg: dict | None) -> dict | None:
  """A model config (as a dict) without the options of the families that no layer uses: what
  defines the model, so that registering another family leaves saved runs comparable."""
  if not cfg or "attention_options" not in cfg:
    return cfg
  used = set(layer_names(ConfigDict(cfg)))
  out = {k: v for k, v in cfg.items() if k != "attention_options"}
  options = {name: v for name, v in cfg["attention_options"].items() if name in used}
  return {**out, "attention_options": options} if options else out


__all__ = ["BACKBONES", "LanguageModel", "VisionTransformer", "build", "state_sizes",
           "used_config"]
