"""Jane Austen's six novels (Debian ``r-cran-janeaustenr``), Persuasion held out for validation."""

from arch_zoo.data.builders.austen.austen_dataset_builder import Builder

__all__ = ["Builder"]
