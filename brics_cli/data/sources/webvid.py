"""`brics shard webvid CSV --videos DIR`: Webvid-Frames200k (paper, Suppl. L): frames of WebVid-10M clips.

"We randomly cropped 200k of images from random video clips ... in the training split as our training
dataset and 5k images from the validation split as our test dataset." Here: N draws, uniformly with
replacement, of a row of the training CSV; from each drawn clip one uniformly random frame, randomly
cropped to a square of its short side and resized to `--resolution`. The val split is drawn the same
way from the validation CSV.

The plan (which clip each sample comes from) is drawn in the parent from `random.Random(seed)`; the
frame and the crop are drawn in the worker from the item's own stream (`item_rng`). Neither depends
on the number of workers, so the shards are byte-identical whatever `--workers` is.

Frame index i means the i-th frame in presentation order. Instead of decoding from the start, the
reader seeks to the last keyframe at or before the target's timestamp and decodes from there; when
timestamps are missing or the target does not come out, it falls back to decoding from the start.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from brics_cli.core.images import ImageSkip, crop_resize, random_crop_box
from brics_cli.data.shards import ShardOptions
from brics_cli.data.sources.base import Plan, Source, argument, option, sample_files
from brics_cli.errors import ConfigError
from brics_cli.registry import SOURCES

# Two column orders circulate (results_2M_*.csv and results_10M_*.csv); only these two are needed.
REQUIRED_COLUMNS = ("videoid", "page_dir")


@dataclass(frozen=True)
class FrameItem:
    id: str  # f"{k:07d}-{videoid}": draw k of the plan, so two draws of one clip are distinct items
    path: str  # <videos>/<page_dir>/<videoid>.mp4
    videoid: str


def csv_rows(path: Path) -> Iterator[tuple[str, str]]:
    """(videoid, page_dir) of every row of a WebVid CSV, columns found by name, values kept as strings."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")  # utf-8-sig: a spreadsheet may have added a BOM
    except OSError as exc:
        raise ConfigError(f"cannot read WebVid CSV {path}: {exc.strerror or exc}") from exc
    with f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            found = ", ".join(header) if header else "no header"
            raise ConfigError(
                f"{path} is not a WebVid CSV: it needs columns {' and '.join(REQUIRED_COLUMNS)} "
                f"(missing {', '.join(missing)}); found columns: {found}"
            )
        i_video, i_dir = header.index("videoid"), header.index("page_dir")
        for row in reader:
            if row:  # a blank line (e.g. a trailing one) is not a clip
                yield row[i_video], row[i_dir]


def draw_frames(csv_path: Path, videos: Path, n: int, rng: random.Random) -> tuple[list[FrameItem], int]:
    """`n` clips drawn uniformly with replacement from the CSV's rows -> (items in draw order, row count).

    Two passes over the CSV (count, then fetch the drawn rows) keep memory at O(n), not O(rows):
    results_10M_train.csv has 10.7M rows.
    """
    rows = sum(1 for _ in csv_rows(csv_path))
    if rows == 0 and n > 0:
        raise ConfigError(f"{csv_path} has a header but no clips")
    draws = [rng.randrange(rows) for _ in range(n)]
    drawn: dict[int, tuple[str, str] | None] = dict.fromkeys(draws)
    for r, row in enumerate(csv_rows(csv_path)):
        if r in drawn:
            drawn[r] = row
    items = []
    for k, r in enumerate(draws):
        videoid, page_dir = drawn[r]
        # A CSV value that would leave the videos folder ('..', absolute, separators) is never opened.
        unsafe = Path(page_dir).is_absolute() or ".." in Path(page_dir).parts or "/" in videoid or "\\" in videoid or ".." in videoid
        path = "" if unsafe else str(videos / page_dir / f"{videoid}.mp4")
        items.append(FrameItem(f"{k:07d}-{videoid}", path, videoid))
    return items, rows


def plan_webvid(
    csv_path: Path, videos: Path, frames: int, seed: int, val_csv: Path | None = None, val_frames: int = 5000
) -> tuple[dict[str, list[FrameItem]], dict[str, int]]:
    """The Webvid-Frames200k plan -> ({"train": items[, "val": items]}, CSV row count per split)."""
    train, train_rows = draw_frames(csv_path, videos, frames, random.Random(seed))
    splits, rows = {"train": train}, {"train": train_rows}
    if val_csv is not None:
        # A string seed is its own stream (hashed with sha512), unlike seed + 1 = the next run's train seed.
        splits["val"], rows["val"] = draw_frames(val_csv, videos, val_frames, random.Random(f"webvid-val:{seed}"))
    return splits, rows


def read_frame(path: str, choose: Callable[[int], int]):
    """Decode frame `choose(n)` of the `n` frames of a video -> (RGB PIL image, index, n); ImageSkip if impossible."""
    import av  # in the worker: planning does not need FFmpeg

    try:
        size = os.stat(path).st_size
    except FileNotFoundError as exc:
        raise ImageSkip("missing_video", f"{path} not found") from exc
    except OSError as exc:
        raise ImageSkip("bad_video", f"{path}: {exc}") from exc
    if size == 0:  # WebVid downloads leave zero-byte placeholders for clips that are gone
        raise ImageSkip("empty_video", f"{path}: 0 bytes")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ImageSkip("bad_video", f"{path}: no video stream")
            stream = container.streams.video[0]
            pts, keyframes = _packet_index(container, stream)
            if not pts:
                raise ImageSkip("bad_video", f"{path}: no video frames")
            index = choose(len(pts))
            frame = _seek_decode(container, stream, index, pts, keyframes)
            image = frame.to_image() if frame is not None else None
        if image is None:
            image = _decode_from_start(path, index)
        return image, index, len(pts)
    except ImageSkip:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, IndexError) as exc:
        raise ImageSkip("bad_video", f"{path}: {type(exc).__name__}: {exc}") from exc


def _packet_index(container, stream) -> tuple[list[int | None], list[int]]:
    """Demux (no decoding): the pts of every frame the decoder will output, and the pts of the keyframes.

    Packets flagged discard (before an MP4 edit list's start) are decoded but never output, so they
    are not frames; they can still be keyframes to seek to. Equals `stream.frames` for a plain MP4,
    and also works where the header does not say (stream.frames == 0).
    """
    pts, keyframes = [], []
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        if packet.is_keyframe and packet.pts is not None:
            keyframes.append(packet.pts)
        if not packet.is_discard:
            pts.append(packet.pts)
    return pts, keyframes


def _seek_decode(container, stream, index: int, pts: list[int | None], keyframes: list[int]):
    """Frame `index` (presentation order) via a seek to the last keyframe at or before it; None if that fails."""
    if None in pts:
        return None
    target = sorted(pts)[index]
    start = max((k for k in keyframes if k <= target), default=min(pts + keyframes))
    import av

    try:  # backward=True, any_frame=False: land on a keyframe at or before `start`, never after it
        container.seek(start, stream=stream, backward=True, any_frame=False)
    except av.FFmpegError:  # an unseekable file is still readable from the start
        return None
    for frame in container.decode(stream):
        if frame.pts == target:
            return frame
        if frame.pts is not None and frame.pts > target:  # frames come out in pts order: it was dropped
            return None
    return None


def _decode_from_start(path: str, index: int):
    """Frame `index` by decoding every frame from the start (the slow, always-correct path)."""
    import av

    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return frame.to_image()
    raise ImageSkip("bad_video", f"{path}: frame {index} does not decode")


def process_frame(item: FrameItem, options: ShardOptions, rng: random.Random) -> dict[str, bytes]:
    """One sample: a random frame of the item's clip, randomly cropped to a square of its short side, resized."""
    if not item.path:
        raise ImageSkip("unsafe_path", f"videoid/page_dir of {item.videoid!r} points outside the videos folder")
    image, index, n = read_frame(item.path, rng.randrange)
    w, h = image.size
    box = random_crop_box(w, h, min(w, h), rng)
    out = crop_resize(image.convert("RGB"), box, options.resolution, options.resize_filter, options.small)
    meta: dict[str, Any] = {
        "source_id": item.id,
        "videoid": item.videoid,
        "frame_index": index,
        "frame_count": n,
        "original_size": [w, h],
        "crop_box": list(box),
        "filter": options.resize_filter,
    }
    return sample_files(out, options, meta)


@dataclass
class WebvidOptions:
    csv_path: Path = argument(help="WebVid training CSV (e.g. results_2M_train.csv); columns read by name.")
    videos: Path = option(help="Folder holding <page_dir>/<videoid>.mp4.", before="out")
    frames: int = option(200000, help="Training frames, each from a clip drawn with replacement.", before="resolution")
    val_csv: Optional[Path] = option(None, help="WebVid validation CSV; its frames form the val split.", before="resolution")
    val_frames: int = option(5000, help="Frames drawn from --val-csv.", before="resolution")


@SOURCES.register("webvid")
class WebvidSource(Source):
    help = (
        "WebVid-10M clips -> Webvid-Frames200k (Suppl. L): each sample a random frame of a random clip, randomly "
        "cropped square. Missing, zero-byte placeholder and undecodable videos are skipped and counted."
    )
    Options = WebvidOptions
    helps = {
        "resolution": "Output side in pixels (random square crop of the short side, then resize).",
        "small": "Videos whose short side is below --resolution: skip | upscale.",
    }
    process = staticmethod(process_frame)

    def plan(self, opts: WebvidOptions, options: ShardOptions) -> Plan:
        if not opts.videos.is_dir():
            raise ConfigError(f"--videos folder not found: {opts.videos}")
        if opts.frames < 1 or opts.val_frames < 0:
            raise ConfigError("--frames must be >= 1 and --val-frames >= 0")
        n_val = opts.val_frames if opts.val_csv is not None else 0
        splits, rows = plan_webvid(opts.csv_path, opts.videos, opts.frames, options.seed, opts.val_csv, n_val)
        source = {
            "type": "webvid",
            "csv": str(opts.csv_path.resolve()),
            "val_csv": str(opts.val_csv.resolve()) if opts.val_csv is not None else None,
            "videos": str(opts.videos.resolve()),
            "rows": rows,
            "frames_planned": {split: len(items) for split, items in splits.items()},
        }
        return Plan(splits, source, {"frames": opts.frames, "val_frames": n_val})
