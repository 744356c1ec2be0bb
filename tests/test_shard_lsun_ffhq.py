"""`brics shard lsun|ffhq` end to end on real LMDB / FFHQ-tree / zip fixtures built here."""

import hashlib
import io
import json
import zipfile
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from brics_cli.core.images import CATEGORIES, ImageSkip
from brics_cli.data.sources.lsun import LmdbItem, process_lmdb
from brics_cli.data.shards import ShardOptions, item_rng
from test_shard import read_shards, run_cli, shard_bytes

RES = 32


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def reference(data: bytes, filter) -> np.ndarray:
    """Decode with PIL, centre crop to the short side, one exact antialiased resize: what the shards must hold."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(img.crop(box).resize((RES, RES), filter, reducing_gap=None))


def make_lmdb(path: Path, n: int, seed: int) -> tuple[dict[str, bytes], list[str]]:
    """n good values (lossy + lossless WebP, JPEG) of different sizes plus a corrupt and a zero-byte one
    -> (every key: value, the good keys sorted)."""
    rng = np.random.default_rng(seed)
    values = {}
    for i in range(n):
        w, h = int(rng.integers(RES, 80)), int(rng.integers(RES, 80))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        data = encoded(img, "JPEG", quality=90) if i % 6 == 5 else encoded(img, "WEBP", lossless=i % 3 == 0, quality=80)
        values[hashlib.sha1(f"{seed}:{i}".encode()).hexdigest()] = data
    good = sorted(values)
    values[hashlib.sha1(f"{seed}:corrupt".encode()).hexdigest()] = b"RIFF\x00\x00\x00\x00WEBPVP8 garbage" * 3
    values[hashlib.sha1(f"{seed}:empty".encode()).hexdigest()] = b""
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, data in values.items():
            txn.put(key.encode(), data)
    env.close()
    return values, good


def samples_by_split(out: Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{split: [(source_id, pixels)] in key order}."""
    result = {"train": [], "val": []}
    for key, files in sorted(read_shards(out).items()):
        result[key.split("/")[0]].append((json.loads(files["json"])["source_id"], np.asarray(Image.open(io.BytesIO(files["png"])))))
    return result


def test_lsun_workers_identical_keys_sorted_pixels_exact(tmp_path, monkeypatch, capsys):
    db = tmp_path / "church_outdoor_train_lmdb"
    values, good = make_lmdb(db, 12, seed=0)
    for workers in (1, 2):  # also: a run after an in-process --workers 1 run must not find the LMDB still open
        code, stdout, err = run_cli(monkeypatch, capsys, "shard", "lsun", db, "--out", tmp_path / f"w{workers}", "--resolution", RES,
                                    "--shard-size", 5, "--val-count", 0, "--workers", workers, "--json")
        assert code == 0, err
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2") and len(shard_bytes(tmp_path / "w1")) == 3
    manifest = json.loads((tmp_path / "w2" / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 12, "val": 0}
    assert manifest["failures"] == {"corrupt": 1, "empty": 1}  # a WebP header with garbage, zero bytes
    assert manifest["options"]["resize_filter"] == "bicubic"  # the lsun default (LDM churches)
    assert manifest["source"]["type"] == "lsun" and manifest["source"]["keys"] == 14
    samples = samples_by_split(tmp_path / "w2")["train"]
    assert [sid for sid, _ in samples] == good  # cursor order = sorted keys, bad values dropped
    for sid, pixels in samples:
        np.testing.assert_array_equal(pixels, reference(values[sid], Image.BICUBIC), err_msg=sid)


def test_lsun_val_lmdb_and_random_split(tmp_path, monkeypatch, capsys):
    train_db, val_db = tmp_path / "train_lmdb", tmp_path / "val_lmdb"
    (_, train_good), (_, val_good) = make_lmdb(train_db, 6, seed=1), make_lmdb(val_db, 3, seed=2)
    code, _, err = run_cli(monkeypatch, capsys, "shard", "lsun", train_db, "--val-lmdb", val_db, "--out", tmp_path / "a", "--resolution", RES)
    assert code == 0, err
    split = {k: [sid for sid, _ in v] for k, v in samples_by_split(tmp_path / "a").items()}
    assert split["train"] == train_good and split["val"] == val_good
    code, _, err = run_cli(monkeypatch, capsys, "shard", "lsun", train_db, "--out", tmp_path / "b", "--resolution", RES, "--val-count", 3)
    assert code == 0, err
    split = {k: [sid for sid, _ in v] for k, v in samples_by_split(tmp_path / "b").items()}
    assert not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == train_good
    code, _, err = run_cli(monkeypatch, capsys, "shard", "lsun", train_db, "--val-lmdb", val_db, "--val-count", 2, "--out", tmp_path / "c")
    assert code == 2 and "--val-lmdb" in err


def test_lsun_missing_key_is_unreadable(tmp_path):
    db = tmp_path / "db"
    make_lmdb(db, 1, seed=3)
    with pytest.raises(ImageSkip) as info:
        process_lmdb(LmdbItem("0" * 40, str(db)), ShardOptions(resolution=RES), item_rng(0, "x"))
    assert info.value.category == "unreadable"


FFHQ_IDS = (0, 1, 1000, 59999, 60000, 69999)


def ffhq_png(n: int) -> bytes:
    rng = np.random.default_rng(n)
    return encoded(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)), "PNG")


def make_ffhq_tree(root: Path) -> Path:
    images = root / "images1024x1024"
    for n in FFHQ_IDS:
        (images / f"{n // 1000 * 1000:05d}").mkdir(parents=True, exist_ok=True)
        (images / f"{n // 1000 * 1000:05d}" / f"{n:05d}.png").write_bytes(ffhq_png(n))
    (root / "LICENSE.txt").write_text("not an image, not under images1024x1024")
    return images


def make_ffhq_zip(path: Path, extra: dict[str, bytes] = {}) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for n in FFHQ_IDS:
            zf.writestr(f"images1024x1024/{n // 1000 * 1000:05d}/{n:05d}.png", ffhq_png(n))
        for name, data in extra.items():
            zf.writestr(name, data)


def test_ffhq_official_split_and_zip_equals_tree(tmp_path, monkeypatch, capsys):
    make_ffhq_tree(tmp_path / "ffhq")
    make_ffhq_zip(tmp_path / "ffhq.zip")
    inputs = {"parent": tmp_path / "ffhq", "images": tmp_path / "ffhq" / "images1024x1024", "zip": tmp_path / "ffhq.zip"}
    for name, path in inputs.items():
        code, _, err = run_cli(monkeypatch, capsys, "shard", "ffhq", path, "--out", tmp_path / name, "--resolution", RES, "--shard-size", 3)
        assert code == 0, err
    assert shard_bytes(tmp_path / "parent") == shard_bytes(tmp_path / "images") == shard_bytes(tmp_path / "zip")
    samples = samples_by_split(tmp_path / "zip")
    assert [sid for sid, _ in samples["train"]] == ["00000", "00001", "01000", "59999"]
    assert [sid for sid, _ in samples["val"]] == ["60000", "69999"]
    for sid, pixels in samples["train"] + samples["val"]:
        np.testing.assert_array_equal(pixels, reference(ffhq_png(int(sid)), Image.BOX), err_msg=sid)
    manifest = json.loads((tmp_path / "zip" / "manifest.json").read_text())
    assert manifest["options"]["resize_filter"] == "box" and manifest["failures"] == {}
    assert manifest["source"] | {"path": None} == {"type": "ffhq", "path": None, "container": "zip", "images": 6, "split": "official"}
    code, _, err = run_cli(monkeypatch, capsys, "shard", "ffhq", inputs["zip"], "--out", tmp_path / "r", "--resolution", RES,
                           "--split", "random", "--val-count", 2, "--workers", 2)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["counts"] == {"train": 4, "val": 2}


def test_ffhq_zip_unsafe_and_badly_named_entries_are_counted_not_read(tmp_path, monkeypatch, capsys):
    assert {"unsafe_path", "bad_name"} <= set(CATEGORIES)
    extra = {"/abs/00005.png": ffhq_png(5), "../00006.png": ffhq_png(6), "images1024x1024/00000/notanumber.png": ffhq_png(7)}
    make_ffhq_zip(tmp_path / "ffhq.zip", extra)
    assert set(extra) <= set(zipfile.ZipFile(tmp_path / "ffhq.zip").namelist())  # zipfile kept the names as given
    opened = []
    real_open = zipfile.ZipFile.open

    def recording_open(self, name, *args, **kwargs):
        opened.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", recording_open)
    code, _, err = run_cli(monkeypatch, capsys, "shard", "ffhq", tmp_path / "ffhq.zip", "--out", tmp_path / "out", "--resolution", RES)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["failures"] == {"bad_name": 1, "unsafe_path": 2}
    assert manifest["counts"] == {"train": 4, "val": 2}
    assert sorted(opened) == sorted(f"images1024x1024/{n // 1000 * 1000:05d}/{n:05d}.png" for n in FFHQ_IDS)


def test_bad_paths_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    cases = [
        ("lsun", tmp_path / "missing", "data.mdb"),
        ("lsun", tmp_path / "empty", "data.mdb"),
        ("ffhq", tmp_path / "missing", "not found"),
        ("ffhq", tmp_path / "notes.txt", "neither a folder nor a zip"),
        ("ffhq", tmp_path / "empty", "no FFHQ PNGs"),
    ]
    for command, path, expected in cases:
        code, _, err = run_cli(monkeypatch, capsys, "shard", command, path, "--out", tmp_path / "out")
        assert code == 2 and len(err.strip().splitlines()) == 1, (command, path, err)
        assert str(path) in err and expected in err, err
    code, _, err = run_cli(monkeypatch, capsys, "shard", "ffhq", tmp_path / "empty", "--out", tmp_path / "out", "--val-count", 3)
    assert code == 2 and "--split random" in err
