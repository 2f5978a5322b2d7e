"""Building blocks shared by the attention families and the backbones."""

from arch_zoo.layers.embeddings import Embed, PatchEmbed, apply_rope, sincos_2d_position_embedding
from arch_zoo.layers.linear import Dense
from arch_zoo.layers.mlp import MLP
from arch_zoo.layers.norms import LayerNorm, RMSNorm

__all__ = ["Dense", "Embed", "LayerNorm", "MLP", "PatchEmbed", "RMSNorm", "apply_rope",
           "sincos_2d_position_embedding"]
