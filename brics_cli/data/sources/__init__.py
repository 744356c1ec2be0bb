"""Sources of `brics shard NAME`: one module per source, all implementing `base.Source`.

`folder` (any image folder), `demo` (crops of scikit-image's bundled photos), `lsun` (an LMDB),
`ffhq` (folder tree or zip) and `webvid` (frames of video clips). Each registers its `Source`
subclass in `brics_cli.registry.SOURCES`; brics' pyproject.toml advertises them as entry points
of the group `brics.sources`, where a third-party distribution adds its own.
"""

from brics_cli.data.sources.base import Plan, Source, argument, held_out, option, sample_files, split_items

__all__ = ["Plan", "Source", "argument", "held_out", "option", "sample_files", "split_items"]
