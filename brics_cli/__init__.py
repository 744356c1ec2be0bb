"""brics: Bi-level feature Representation of Image CollectionS, from raw files to the paper's tables."""

__version__ = "0.1.0"
