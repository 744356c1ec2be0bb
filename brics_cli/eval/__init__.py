"""Evaluation: reconstruction metrics, generative metrics, offline weight files, nearest-neighbour search."""
