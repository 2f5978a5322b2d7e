"""Head diagnostics: what every head of every attention family does (docs/heads.md)."""

from arch_zoo.analysis import metrics, probe
from arch_zoo.analysis.core import Analysis

__all__ = ["Analysis", "metrics", "probe"]
