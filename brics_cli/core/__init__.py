"""The ground floor: files, images, checkpoints, runtime and progress.

Everything in brics may import from here; nothing here imports from brics above it (only
`brics_cli.errors` and other `brics_cli.core` modules). `tests/test_layers.py` enforces it.
"""
