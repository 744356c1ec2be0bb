"""`brics demo --quick`'s report (OUT/report.html and OUT/report.md), read as a newcomer reads it: the title
says quick, every number sits beside the full demo's and the paper's, every figure it shows exists, the
gallery's PSNR and the neighbours' distances are those of the files, and headless Chromium renders it.
One quick demo runs for the whole module."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A finished quick demo, run from its parent folder with a relative --out, as a user would type it.
    (Not `--out demo`: outside a checkout the recipe is the preset `demo`, and a folder of that name shadows it.)"""
    root = tmp_path_factory.mktemp("report")
    proc = subprocess.run([sys.executable, "-m", "brics_cli", "demo", "--quick", "--out", "quick", "--json"], cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "quick"


class Page(HTMLParser):
    """The report's HTML as data: its <img> tags, its tables (rows of cell texts) and its gallery figures."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.tables: list[list[list[str]]] = []
        self.cells: list[list[dict]] = []  # per table: cells with their text and images
        self.pairs: list[dict] = []  # gallery figures: {"psnr": data-psnr, "images": [src, src], "caption": text}
        self.h1 = ""
        self._text: list[str] | None = None
        self._where: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
            if self.pairs and self._where and self._where[-1] == "pair":
                self.pairs[-1]["images"].append(attrs["src"])
            if self.cells and "td" in self._where:
                self.cells[-1][-1][-1]["images"].append(attrs["src"])
        elif tag == "table":
            self.tables.append([])
            self.cells.append([])
        elif tag == "tr":
            self.tables[-1].append([])
            self.cells[-1].append([])
        elif tag in ("td", "th"):
            self._text = []
            self.cells[-1][-1].append({"images": []})
            self._where.append("td")
        elif tag == "figure" and "pair" in (attrs.get("class") or ""):
            self.pairs.append({"psnr": attrs["data-psnr"], "images": [], "caption": ""})
            self._where.append("pair")
        elif tag == "figcaption" and self._where and self._where[-1] == "pair":
            self._text = []
        elif tag == "h1":
            self._text = []
        elif tag == "br" and self._text is not None:
            self._text.append(" ")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            text = " ".join("".join(self._text).split())
            self.tables[-1][-1].append(text)
            self.cells[-1][-1][-1]["text"] = text
            self._text = None
            self._where.pop()
        elif tag == "figcaption" and self._where and self._where[-1] == "pair":
            self.pairs[-1]["caption"] = "".join(self._text)
            self._text = None
        elif tag == "figure" and self._where and self._where[-1] == "pair":
            self._where.pop()
        elif tag == "h1":
            self.h1, self._text = "".join(self._text), None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def table(self, first_header: str) -> list[list[str]]:
        return next(t for t in self.tables if t and t[0] and t[0][0] == first_header)


def decode(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,"), src[:60]
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    return image.convert("RGB")


def md_table(md: str, first_header: str) -> list[list[str]]:
    """The Markdown table whose first header cell is `first_header`: rows of cells (header row first)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def psnr_uint8(a: Image.Image, b: Image.Image) -> float:
    """The textbook PSNR of two 8-bit images (peak 255): the reference for `recon_metrics.psnr`."""
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_the_title_says_quick_and_what_the_run_trained(demo):
    page, md = Page((demo / "report.html").read_text()), (demo / "report.md").read_text()
    assert page.h1.startswith("brics demo report: quick run") and md.startswith("# brics demo report: quick run")
    ae = yaml.safe_load((demo / "run" / "ae" / "config.yaml").read_text())["ae"]["train"]
    diffusion = yaml.safe_load((demo / "run" / "diffusion" / "config.yaml").read_text())["diffusion"]["train"]
    full = yaml.safe_load((Path(__file__).parents[1] / "brics_cli" / "recipes" / "demo.yaml").read_text())
    lead = md.split("\n\n")[1]
    assert f"{ae['steps']} autoencoder steps (batch {ae['batch']})" in lead
    assert f"{diffusion['steps']} diffusion steps (batch {diffusion['batch']})" in lead
    assert "256 training and 64 held-out 64x64 crops" in lead and "16 samples, ddim with 10 steps" in lead
    assert f"trains {full['ae']['train']['steps']} + {full['diffusion']['train']['steps']} steps" in lead


def test_every_number_sits_beside_the_full_demos_and_the_papers(demo):
    from brics_cli.recipe import paper_rows, preset_header, presets

    page, md = Page((demo / "report.html").read_text()), (demo / "report.md").read_text()
    recon = json.loads((demo / "recon" / "metrics.json").read_text())
    paper = paper_rows()["church-64x64x4"].paper
    expected = preset_header(presets()["demo"])["Expected"]
    rows = {row[0]: row for row in page.table("metric")}
    assert rows["metric"] == ["metric", "this run", "quick demo, measured", "full demo, expected", "paper"]
    assert md_table(md, "metric")[0] == rows["metric"]
    psnr, ssim = rows["PSNR"], rows["SSIM"]
    assert psnr[1] == f"{recon['psnr']['mean']:.2f} ± {recon['psnr']['std']:.2f} dB"
    assert ssim[1] == f"{recon['ssim']['mean']:.4f} ± {recon['ssim']['std']:.4f}"
    full_psnr, full_ssim = re.fullmatch(r"~([\d.]+) dB", psnr[3]).group(1), re.fullmatch(r"~([\d.]+)", ssim[3]).group(1)
    assert f"PSNR ~{full_psnr} dB" in expected and f"SSIM ~{full_ssim}" in expected  # the recipe's own words
    for label, key, unit in (("PSNR", "psnr", " dB"), ("SSIM", "ssim", ""), ("LPIPS", "lpips", ""), ("FID", "fid", ""),
                             ("CLIP-FID", "clip_fid", "")):
        assert float(rows[label][4].removesuffix(unit)) == paper[key], label
    # A quick run near its measured value is what the sentence under the table promises.
    assert abs(float(re.fullmatch(r"~([\d.]+) dB", psnr[2]).group(1)) - recon["psnr"]["mean"]) < 3
    assert "What to expect" in md and "not a bug" in md and "not comparable with it 1:1" in md
    assert "LSUN-Church at 256x256" in md


def test_every_image_the_report_shows_exists_and_decodes(demo):
    page, md = Page((demo / "report.html").read_text()), (demo / "report.md").read_text()
    assert page.images and all(decode(img["src"]).size[0] > 0 for img in page.images)  # all inline: self-contained
    linked = re.findall(r'<img src="([^"]+)"', md) + re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(linked) > 64
    for rel in linked:
        assert not Path(rel).is_absolute() and (demo / rel).is_file(), rel
        Image.open(demo / rel).verify()
    for img in page.images:  # shown at least twice their size, pixels kept square -- or a plot at its size
        natural = decode(img["src"]).size[0]
        assert int(img["width"]) >= 2 * natural or natural >= 1000, (img["alt"], natural, img["width"])
        assert "image-rendering:pixelated" in img["style"]


def test_the_gallery_shows_every_reconstruction_with_its_psnr(demo):
    from brics_cli.core.images import load_image
    from brics_cli.eval.recon_metrics import psnr

    page, md = Page((demo / "report.html").read_text()), (demo / "report.md").read_text()
    count = json.loads((demo / "recon" / "manifest.json").read_text())["count"]
    assert count == 64 and len(page.pairs) == count
    md_rows = md_table(md, "crop")[1:]
    assert len(md_rows) == count
    for i, (pair, row) in enumerate(zip(page.pairs, md_rows)):
        name = f"{i:06d}"
        inp, rec = demo / "recon" / "inputs" / f"{name}.png", demo / "recon" / "recon" / f"{name}.png"
        expected = psnr(load_image(rec)[None], load_image(inp)[None]).item()
        shown_in, shown_rec = (decode(src) for src in pair["images"])
        assert np.array_equal(np.asarray(shown_in), np.asarray(Image.open(inp).convert("RGB")))  # the pair it names
        assert psnr_uint8(shown_rec, shown_in) == pytest.approx(expected, abs=1e-4)
        assert pair["caption"] == f"{name}: {expected:.2f} dB" and float(pair["psnr"]) == pytest.approx(expected, abs=1e-4)
        assert row[0] == name and row[3] == f"{expected:.2f}"
    values = torch.tensor([float(p["psnr"]) for p in page.pairs])
    recon = json.loads((demo / "recon" / "metrics.json").read_text())
    assert values.mean().item() == pytest.approx(recon["psnr"]["mean"], abs=0.01)  # PNG rounding moves it a little


def test_each_neighbour_is_labelled_with_its_key_and_distance(demo):
    page, md = Page((demo / "report.html").read_text()), (demo / "report.md").read_text()
    nn = json.loads((demo / "nn" / "nn.json").read_text())
    grid = next(cells for cells in page.cells if cells and len(cells[0]) == 1 + nn["k"] and cells[0][0]["images"])
    md_rows = md_table(md, "sample")[1:]
    assert len(grid) == len(md_rows) == len(nn["queries"]) == 8
    for query, row, md_row in zip(nn["queries"], grid, md_rows):
        assert row[0]["text"] == f"sample {Path(query['sample']).stem}" and md_row[0] == f"`{Path(query['sample']).stem}`"
        for i, (neighbour, cell, md_cell) in enumerate(zip(query["neighbours"], row[1:], md_row[1:])):
            rank, key, distance = cell["text"].split()
            assert rank == f"#{i + 1}" and key == neighbour["key"] and md_cell.startswith(f"`{key}` ")
            assert float(distance) == pytest.approx(neighbour["distance"], rel=1e-3)
            assert float(md_cell.split()[1]) == pytest.approx(neighbour["distance"], rel=1e-3)
            assert decode(cell["images"][0]).size == Image.open(demo / "samples" / query["sample"]).size


def test_the_sampler_settings_are_the_manifests(demo):
    page = Page((demo / "report.html").read_text())
    manifest = json.loads((demo / "samples" / "manifest.json").read_text())
    step = json.loads((demo / "run" / "diffusion" / "result.json").read_text())["step"]
    rows = dict(page.table("sampler setting")[1:])
    assert rows["sampler"] == manifest["sampler"] and int(rows["steps"]) == manifest["steps"] == 10
    assert float(rows["eta"]) == manifest["eta"] and int(rows["seed"]) == manifest["seed"]
    assert int(rows["checkpoint step"]) == step and rows["images"] == str(manifest["count"])
    assert rows["diffusion checkpoint"] == f"run/diffusion/checkpoints/step-{step:06d}.safetensors"  # relative to the report


def test_the_full_scale_commands_carry_hardware_time_and_target(demo):
    from brics_cli.demo.report import FULL_SCALE
    from brics_cli.recipe import paper_rows, preset_header, presets

    page = Page((demo / "report.html").read_text())
    church, paper = preset_header(presets()["church"]), paper_rows()["church-64x64x4"].paper
    rows = {row[0]: row for row in page.table("command")[1:]}
    assert list(rows) == [command for command, *_ in FULL_SCALE]
    ae = rows["brics ae-train recipes/church.yaml --device cuda"]
    assert church["Hardware"] in ae[1] and f"PSNR {paper['psnr']:g} dB, SSIM {paper['ssim']:g}, LPIPS {paper['lpips']:g}" == ae[2]
    diffusion = next(row for command, row in rows.items() if "diffusion-train" in command)
    assert diffusion[1] == church["Expected"] and "7 days" in diffusion[1]
    assert rows["brics eval all --samples samples/church"][2] == f"FID {paper['fid']:g}, CLIP-FID {paper['clip_fid']:g}"


def test_paths_in_the_report_are_relative(demo):
    for name in ("report.html", "report.md"):
        text = (demo / name).read_text()
        assert str(demo.parent) not in text, name
    md = (demo / "report.md").read_text()
    assert "`brics reconstruct --from quick/run/ae --input quick/shards --out quick/recon" in md


def test_a_full_run_is_titled_full_and_drops_the_quick_column(demo, tmp_path, monkeypatch):
    from brics_cli.demo import plan, write_report

    # The finished folder, without what the report does not read, under the same relative name.
    shutil.copytree(demo, tmp_path / "quick", ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "codes"))
    monkeypatch.chdir(tmp_path)
    saved = {s["name"]: s for s in json.loads(Path("quick/report.json").read_text())["stages"]}
    stages = plan(Path("quick"), quick=False)
    for stage in stages:
        stage.status, stage.seconds = saved[stage.name]["status"], saved[stage.name]["seconds"]
    write_report(Path("quick"), stages, quick=False, total=1.0)
    page, md = Page(Path("quick/report.html").read_text()), Path("quick/report.md").read_text()
    assert page.h1.startswith("brics demo report: full run") and "**Full run** (`brics demo`)" in md
    assert page.table("metric")[0] == ["metric", "this run", "full demo, expected", "paper"]
    assert "quick run stops" not in md and "lands near the full demo's expected values" in md


def chromium() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_headless_chromium_renders_the_report(demo, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium not installed")
    shot = tmp_path / "report.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1280,4000", (demo / "report.html").resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (4000, 1280)
    assert pixels.std() > 20  # text, tables and photos, not a blank page
    assert (pixels[:, 640:] < 250).mean() > 0.05  # the gallery and tables reach the right half of the page
