"""Backbones. ``build(config.model, rngs=...)`` dispatches on ``config.model.name``."""

from __future__ import annotations

from flax import nnx
from ml_collections import ConfigDict

from arch_zoo.models.lm import LanguageModel
from arch_zoo.models.vit import VisionTransformer
from arch_zoo.registry import Registry

BACKBONES: Registry[type] = Registry("model name")
BACKBONES.add("lm", LanguageModel)
BACKBONES.add("vit", VisionTransformer)


def build(cfg: ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  return BACKBONES.get(cfg.name)(cfg, rngs=rngs)


__all__ = ["BACKBONES", "LanguageModel", "VisionTransformer", "build"]
