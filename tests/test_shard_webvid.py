"""`brics shard webvid` on real mp4 clips written here with PyAV (Webvid-Frames200k, Suppl. L)."""

import io
import json
import random
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from brics_cli.data.sources import webvid
from brics_cli.core.images import ImageSkip, crop_resize
from test_shard import read_shards, run_cli

ORDER_2M = ["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"]
ORDER_10M = ["videoid", "contentUrl", "duration", "page_dir", "name"]
NOISE = np.random.default_rng(0).integers(-6, 7, (64, 64)).astype(np.int16)  # texture: a wrong crop box shows


def level(i: int) -> int:
    """Mean grey level of frame i: 20 apart, so a neighbouring frame is never within tolerance."""
    return 12 + 20 * i


def write_video(path: Path, n: int, w: int, h: int, codec: str, bframes: bool) -> None:
    """n frames, frame i a grey level(i) plus fixed noise; keyframe every 4 frames, so seeking matters."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "8", "x264-params": f"keyint=4:min-keyint=4:scenecut=0:bframes={2 if bframes else 0}:b-adapt=0"}
        else:
            stream.bit_rate = 4_000_000
            stream.options = {"g": "4", "bf": "2" if bframes else "0"}
        for i in range(n):
            grey = np.clip(level(i) + NOISE[:h, :w], 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.repeat(grey[..., None], 3, axis=-1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"
GOOD = {  # videoid -> (page_dir, frames, width, height, codec, bframes)
    "1001": ("000001_000050", 12, 48, 32, CODEC, True),
    "1002": ("000001_000050", 11, 40, 56, CODEC, False),
    "1003": ("000051_000100", 10, 32, 40, "mpeg4", True),
    "1004": ("000051_000100", 12, 48, 32, CODEC, True),
}
BAD = {"2001": ("000001_000050", "empty_video"), "2002": ("000051_000100", "bad_video"), "2003": ("000051_000100", "missing_video")}


def make_webvid(root: Path) -> Path:
    videos = root / "videos"
    for videoid, (page_dir, n, w, h, codec, bframes) in GOOD.items():
        (videos / page_dir).mkdir(parents=True, exist_ok=True)
        write_video(videos / page_dir / f"{videoid}.mp4", n, w, h, codec, bframes)
    (videos / BAD["2001"][0] / "2001.mp4").write_bytes(b"")  # placeholder of a clip that failed to download
    (videos / BAD["2002"][0] / "2002.mp4").write_bytes(np.random.default_rng(1).bytes(4000))
    return videos


def write_csv(path: Path, columns: list[str], rows: list[tuple[str, str]]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for videoid, page_dir in rows:
            values = {"videoid": videoid, "page_dir": page_dir, "name": f'Clip {videoid}, "stock" footage',
                      "page_idx": "1", "duration": "PT00H00M01S", "contentUrl": f"https://example.com/{videoid}.mp4"}
            writer.writerow([values[c] for c in columns])
    return path


TRAIN_ROWS = [(v, GOOD[v][0]) for v in ("1001", "1002", "1003")] + [(v, BAD[v][0]) for v in BAD] + [("1004", GOOD["1004"][0])]
VAL_ROWS = [("1004", GOOD["1004"][0]), ("1001", GOOD["1001"][0])]


def sequential_frames(path: Path) -> list[Image.Image]:
    """The reference: every frame, decoded from the start in order."""
    with av.open(str(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("webvid")
    videos = make_webvid(root)
    return {
        "videos": videos,
        "csv_2m": write_csv(root / "results_2M_train.csv", ORDER_2M, TRAIN_ROWS),
        "csv_10m": write_csv(root / "results_10M_train.csv", ORDER_10M, TRAIN_ROWS),
        "val": write_csv(root / "results_2M_val.csv", ORDER_2M, VAL_ROWS),
    }


ARGS = ("--frames", 40, "--resolution", 24, "--shard-size", 8)


def test_frames_counts_content_and_val(clips, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, "shard", "webvid", clips["csv_2m"], "--videos", clips["videos"],
                                "--out", out, *ARGS, "--val-csv", clips["val"], "--val-frames", 6, "--json")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    # The plan: 40 draws, uniformly with replacement, of the CSV's 7 rows (random.Random(seed).randrange).
    rng = random.Random(0)
    draws = [TRAIN_ROWS[rng.randrange(len(TRAIN_ROWS))][0] for _ in range(40)]
    drawn = Counter(draws)
    expected_failures = Counter()
    for videoid, (_, category) in BAD.items():
        expected_failures[category] += drawn[videoid]
    assert sum(expected_failures.values()) > 0 and len(set(draws) & set(GOOD)) == len(GOOD)  # the fixture covers both
    assert manifest["failures"] == {k: v for k, v in sorted(expected_failures.items()) if v}
    assert manifest["counts"] == {"train": 40 - sum(expected_failures.values()), "val": 6}
    assert manifest["source"]["rows"] == {"train": 7, "val": 2}
    assert manifest["source"]["frames_planned"] == {"train": 40, "val": 6}
    assert json.loads(stdout.strip().splitlines()[-1])["counts"] == manifest["counts"]

    samples = read_shards(out)
    frames = {videoid: sequential_frames(clips["videos"] / GOOD[videoid][0] / f"{videoid}.mp4") for videoid in GOOD}
    indices = set()
    for key, files in samples.items():
        split, index = key.split("/")
        meta = json.loads(files["json"])
        k = int(meta["source_id"].split("-")[0])
        assert int(index) == k and meta["videoid"] == meta["source_id"].split("-")[1]
        if split == "train":
            assert meta["videoid"] == draws[k]
        else:
            assert meta["videoid"] in {"1001", "1004"}
        page_dir, n, w, h, _, _ = GOOD[meta["videoid"]]
        assert meta["frame_count"] == n and meta["original_size"] == [w, h] and 0 <= meta["frame_index"] < n
        left, top, right, bottom = meta["crop_box"]
        assert right - left == bottom - top == min(w, h) and 0 <= left <= w - min(w, h) and 0 <= top <= h - min(w, h)
        decoded = np.asarray(Image.open(io.BytesIO(files["png"])))
        assert decoded.shape == (24, 24, 3)
        # The content says which frame it is: the recorded frame index, not a neighbour.
        assert abs(decoded.mean() - level(meta["frame_index"])) < 7, (key, meta, decoded.mean())
        # And it is exactly that frame of a sequential decode, with the recorded crop.
        reference = crop_resize(frames[meta["videoid"]][meta["frame_index"]], tuple(meta["crop_box"]), 24, "lanczos")
        np.testing.assert_array_equal(decoded, np.asarray(reference), err_msg=key)
        indices.add((meta["videoid"], meta["frame_index"]))
    assert len(indices) > 10  # the frame is drawn per sample, not fixed per clip


def test_csv_orders_and_workers_do_not_change_a_byte(clips, tmp_path, monkeypatch, capsys):
    runs = {"2m-w1": ("csv_2m", 1), "10m-w1": ("csv_10m", 1), "2m-w2": ("csv_2m", 2)}
    for name, (csv_key, workers) in runs.items():
        code, _, err = run_cli(monkeypatch, capsys, "shard", "webvid", clips[csv_key], "--videos", clips["videos"],
                               "--out", tmp_path / name, *ARGS, "--workers", workers)
        assert code == 0, err
    shards = {name: {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("*.tar"))} for name in runs}
    assert len(shards["2m-w1"]) == 5 and not any(p.name.startswith("val") for p in (tmp_path / "2m-w1").glob("*.tar"))
    assert shards["10m-w1"] == shards["2m-w1"], "the CSV's column order changed the shards"
    assert shards["2m-w2"] == shards["2m-w1"], "--workers changed the shards"


@pytest.mark.parametrize("videoid", sorted(GOOD))
def test_seek_lands_on_the_frame_sequential_decoding_gives(clips, videoid, monkeypatch):
    path = clips["videos"] / GOOD[videoid][0] / f"{videoid}.mp4"
    reference = sequential_frames(path)
    with av.open(str(path)) as container:
        keyframes = sum(p.is_keyframe for p in container.demux(video=0) if p.size)
    assert len(reference) == GOOD[videoid][1] and keyframes >= 3  # several GOPs: the seek is exercised

    def no_fallback(path, index):
        raise AssertionError(f"the seek missed frame {index} and fell back to decoding from the start")

    monkeypatch.setattr(webvid, "_decode_from_start", no_fallback)
    for i in range(len(reference)):
        image, index, n = webvid.read_frame(str(path), lambda n: i)
        assert (index, n) == (i, len(reference))
        np.testing.assert_array_equal(np.asarray(image), np.asarray(reference[i]), err_msg=f"frame {i}")
    # The fallback (decode from the start) gives the same frames.
    monkeypatch.undo()
    monkeypatch.setattr(webvid, "_seek_decode", lambda *args: None)
    for i in (0, len(reference) - 1):
        np.testing.assert_array_equal(np.asarray(webvid.read_frame(str(path), lambda n: i)[0]), np.asarray(reference[i]))


def test_bad_videos_are_skipped_by_category(clips):
    for videoid, (page_dir, category) in BAD.items():
        with pytest.raises(ImageSkip) as info:
            webvid.read_frame(str(clips["videos"] / page_dir / f"{videoid}.mp4"), lambda n: 0)
        assert info.value.category == category


def test_csv_without_the_needed_columns_is_one_line_exit_2(clips, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,url,duration\n1001,https://example.com/1001.mp4,PT00H00M01S\n")
    code, _, err = run_cli(monkeypatch, capsys, "shard", "webvid", bad, "--videos", clips["videos"], "--out", tmp_path / "out")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert str(bad) in err and "videoid" in err and "page_dir" in err and "id, url, duration" in err


def test_csv_values_leaving_the_videos_folder_are_never_opened(clips, tmp_path):
    (tmp_path / "secret.mp4").write_bytes(b"not for us")
    rows = [("1001", GOOD["1001"][0]), ("secret", ".."), ("x/../../secret", GOOD["1001"][0]), ("1002", "/abs")]
    csv_path = write_csv(tmp_path / "evil.csv", ["videoid", "page_dir"], rows)
    items, _ = webvid.draw_frames(csv_path, clips["videos"], 40, random.Random(0))
    from brics_cli.data.shards import ShardOptions

    options, categories = ShardOptions(resolution=16), set()
    for item in items:
        if item.videoid == "1001":
            assert item.path
            continue
        assert item.path == ""
        with pytest.raises(ImageSkip) as info:
            webvid.process_frame(item, options, random.Random(0))
        categories.add(info.value.category)
    assert categories == {"unsafe_path"}
