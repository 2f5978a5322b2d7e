"""The King James Bible (Debian ``bible-kjv-text``) by chapter; Job and Acts held out."""

from arch_zoo.data.builders.kjv.kjv_dataset_builder import Builder

__all__ = ["Builder"]
