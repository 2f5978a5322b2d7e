"""The kernel layer: one module per attention operator, apart from the mathematics of the families.

Every operator module has the same interface:

* ``IMPLS``: the names of the ``attention.impl`` vocabulary it implements, in the order ``auto``
  tries them (fastest first, ``reference`` last);
* ``reference(...)``: the float32 oracle, plain and dense, that every other implementation is
  tested against;
* ``supports(impl, ...) -> str | None``: None when ``impl`` can run this call, else the reason;
* ``apply(..., impl=..., site=...)``: resolves ``auto`` through :func:`base.resolve`, which the
  recorder sees, and runs the kernel.

The vocabulary, which family has which implementation, and how to see which one ran:
docs/attention/kernels.md.
"""

from arch_zoo.attention.ops.base import (RENAMED, VOCABULARY, Site, check_impl, recording,
                                         resolve, summarize, summary_line)
from arch_zoo.attention.ops import dynamic_mask, kv_cache, linear, routing, softmax  # noqa: E402

__all__ = ["RENAMED", "VOCABULARY", "Site", "check_impl", "dynamic_mask", "kv_cache", "linear",
           "recording", "resolve", "routing", "softmax", "summarize", "summary_line"]
