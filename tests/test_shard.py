"""`brics shard folder|demo|verify` end to end on fixtures built here (issue 3)."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from brics_cli.cli import main


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["brics", *map(str, args)])
    monkeypatch.delenv("BRICS_DEBUG", raising=False)
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path) -> dict[str, Image.Image]:
    """Good images of several shapes (returned, as RGB) plus every kind of bad input."""
    rng = np.random.default_rng(0)
    good = {}
    for i, (w, h) in enumerate([(40, 34), (34, 50), (64, 64), (33, 47), (80, 41), (36, 36), (50, 90)]):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        name = f"sub{i % 2}/img{i}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / name)
        good[name] = img
    cmyk = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).convert("CMYK")
    cmyk.save(root / "cmyk.jpg", quality=95)
    good["cmyk.jpg"] = Image.open(root / "cmyk.jpg").convert("RGB")
    gray16 = Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16))
    gray16.save(root / "gray16.png")
    good["gray16.png"] = Image.fromarray((np.asarray(Image.open(root / "gray16.png"), dtype=np.uint32) >> 8).astype(np.uint8)).convert("RGB")
    # Grayscale, palette and alpha inputs are converted to RGB (alpha over white).
    gray = Image.fromarray(rng.integers(0, 256, (36, 44), dtype=np.uint8))
    gray.save(root / "gray.png")
    good["gray.png"] = gray.convert("RGB")
    palette = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).quantize(16)
    palette.save(root / "palette.png")
    good["palette.png"] = palette.convert("RGB")
    rgba = np.concatenate([rng.integers(0, 256, (40, 40, 3)), np.full((40, 40, 1), 255)], axis=-1).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "opaque_rgba.png")
    good["opaque_rgba.png"] = Image.fromarray(rgba[..., :3])
    # Bad inputs: each skipped and counted.
    bomb = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    bomb[16:24] = struct.pack(">II", 30000, 30000)  # IHDR claims 30000 x 30000 (900 Mpx)
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))
    (root / "bomb.png").write_bytes(bytes(bomb))
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / "truncated.png").write_bytes(png_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:300])
    Image.new("RGB", (20, 20), "red").save(root / "tiny.png")  # smaller than the resolution: skipped
    (root / ".hidden.png").write_bytes(b"ignored")
    return good


def reference(img: Image.Image, resolution: int) -> np.ndarray:
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(img.crop(box).resize((resolution, resolution), Image.LANCZOS, reducing_gap=None))


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(f"{tar_path.name.split('-')[0]}/{key}", {})[ext] = tar.extractfile(member).read()
    return samples


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_folder_round_trip_with_bad_inputs(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    good = make_folder(src)
    code, stdout, err = run_cli(monkeypatch, capsys, "shard", "folder", src, "--out", out, "--resolution", 32,
                                "--shard-size", 3, "--val-count", 2, "--json")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == summary["counts"]
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == len(good)  # val: 2 of the 14 files
    assert manifest["failures"] == {"empty": 1, "not_image": 1, "too_large": 1, "too_small": 1, "truncated": 1}
    assert set(manifest["shards"]) == {p.name for p in out.glob("*.tar")}
    samples = read_shards(out)
    assert len(samples) == len(good)
    for key, files in samples.items():
        assert "." not in key.split("/")[1]
        meta = json.loads(files["json"])
        decoded = np.asarray(Image.open(io.BytesIO(files["png"])))
        assert decoded.shape == (32, 32, 3)
        np.testing.assert_array_equal(decoded, reference(good[meta["source_id"]], 32), err_msg=meta["source_id"])
        assert meta["original_size"] == list(good[meta["source_id"]].size)


def test_workers_do_not_change_a_byte_and_verify_passes(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src)
    for workers in (1, 2):
        code, _, err = run_cli(monkeypatch, capsys, "shard", "folder", src, "--out", tmp_path / f"w{workers}",
                               "--resolution", 32, "--shard-size", 2, "--workers", workers)
        assert code == 0, err
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")
    assert len(shard_bytes(tmp_path / "w1")) >= 4
    code, stdout, _ = run_cli(monkeypatch, capsys, "shard", "verify", tmp_path / "w2", "--json")
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["problems"] == []


def test_changed_options_are_refused_unless_overwrite(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    make_folder(src)
    assert run_cli(monkeypatch, capsys, "shard", "folder", src, "--out", out, "--resolution", 32)[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, "shard", "folder", src, "--out", out, "--resolution", 24)
    assert code == 2 and "--overwrite" in err and "options" in err
    assert run_cli(monkeypatch, capsys, "shard", "folder", src, "--out", out, "--resolution", 24, "--overwrite")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["options"]["resolution"] == 24


def test_verify_reports_a_damaged_shard(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run_cli(monkeypatch, capsys, "shard", "demo", "--out", out, "--train-count", 6, "--val-count", 2,
                   "--resolution", 16, "--shard-size", 4)[0] == 0
    shard = sorted(out.glob("train-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first image
    shard.write_bytes(bytes(data))
    code, stdout, err = run_cli(monkeypatch, capsys, "shard", "verify", out, "--json")
    report = json.loads(stdout.strip().splitlines()[-1])
    assert code == 1 and any("sha256" in p for p in report["problems"]) and "problems" in err


def test_demo_uses_held_out_photos_for_val(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, "shard", "demo", "--out", out, "--train-count", 12,
                                "--val-count", 4, "--resolution", 24, "--shard-size", 5, "--json")
    assert code == 0, err
    samples = read_shards(out)
    train = [json.loads(f["json"])["source_id"] for k, f in samples.items() if k.startswith("train/")]
    val = [json.loads(f["json"])["source_id"] for k, f in samples.items() if k.startswith("val/")]
    assert len(train) == 12 and len(val) == 4
    assert {s.split("/")[1] for s in val} == {"retina", "stereo_motorcycle"}
    assert not {s.split("/")[1] for s in train} & {"retina", "stereo_motorcycle"}
    sizes = {Image.open(io.BytesIO(f["png"])).size for f in samples.values()}
    assert sizes == {(24, 24)}


def test_kill_9_then_rerun_is_byte_identical(tmp_path):
    args = ["shard", "demo", "--train-count", "400", "--val-count", "8", "--resolution", "32", "--shard-size", "8"]
    clean = subprocess.run([sys.executable, "-m", "brics_cli", *args, "--out", str(tmp_path / "clean")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "brics_cli", *args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((killed / ".brics-shard").glob("*.done.json"))) < 5:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((killed / ".brics-shard").glob("*.done.json")))
    assert 5 <= finished < 51, "the kill must land in the middle of the run"
    rerun = subprocess.run([sys.executable, "-m", "brics_cli", *args, "--out", str(killed)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert shard_bytes(killed) == shard_bytes(tmp_path / "clean")
    assert not list(killed.glob("*.tmp"))
