"""Attention families, swappable by name.

    >>> from arch_zoo import attention
    >>> attention.names()
    ['mha', ...]
    >>> attn = attention.build("mha", d_model=256, num_heads=4, num_kv_heads=2)

See :mod:`arch_zoo.attention.base` for the contract every family follows.
"""

from arch_zoo.attention.base import (Context, DecodeSlots, Dims, Family, StateSize, build, family,
                                     kv_cache_state_size, make_options, merge_aux, names,
                                     names_decoding, names_scannable, names_supporting,
                                     names_with_weights, register)
from arch_zoo.attention.weights import AttentionWeights

# Importing a family module registers it. One file per family.
from arch_zoo.attention import mha  # noqa: E402,F401
from arch_zoo.attention import dynamic_mask  # noqa: E402,F401
from arch_zoo.attention import lightning  # noqa: E402,F401
from arch_zoo.attention import masa  # noqa: E402,F401
from arch_zoo.attention import moh  # noqa: E402,F401
from arch_zoo.attention import routing  # noqa: E402,F401

__all__ = ["AttentionWeights", "Context", "DecodeSlots", "Dims", "Family", "build", "family",
           "kv_cache_state_size", "make_options", "merge_aux", "names", "names_decoding",
           "names_scannable", "names_supporting", "names_with_weights", "register", "StateSize"]
