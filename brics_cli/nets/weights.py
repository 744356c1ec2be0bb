"""Pretrained weight files, offline: where each one is expected, whether it is there, whether it is intact.

Nothing here downloads, except `fetch` (the `brics weights fetch` command, for machines with
internet). Every other command calls `require(name)` before doing any work: a missing file stops it
with one line naming the exact file and the folder it belongs in (`WeightsMissing`, exit 1), never a
download attempt inside a library and never a traceback.

Where a file is looked for, first match wins:
1. `$BRICS_WEIGHTS_DIR/<file>` when the variable is set (one flat folder for every file; also where
   messages and `fetch` put a missing file);
2. the library's own place: torchvision and torch-fidelity files in `$TORCH_HOME/hub/checkpoints`
   (TORCH_HOME defaults to `$XDG_CACHE_HOME/torch`, i.e. `~/.cache/torch`); CLIP in `~/.cache/clip`
   (the `clip` package's default); clean-fid's TorchScript Inception in `/tmp` (clean-fid hard-codes
   it); LPIPS's linear layers inside the installed `lpips` wheel.

Checksums are full sha256 values of the published files (torchvision and torch-fidelity names end in
the first 8 hex digits of theirs; CLIP's URL carries its whole sha256). A file whose sha256 differs is
refused (`WeightsMismatch`) unless `BRICS_ALLOW_UNVERIFIED_WEIGHTS=1`, in which case it is used with a
warning and results record its actual sha256. A file whose publisher gives no checksum (DINOv2's
`dinov2_vitl14_pretrain.pth`: its URL and name carry none) has `sha256=None`: it is used as found,
`brics weights status` shows its actual sha256 to compare by hand, and results record that sha256
with `"verified": null`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from brics_cli.core.files import sha256_file
from brics_cli.errors import BricsError, Missing

ALLOW_UNVERIFIED_ENV = "BRICS_ALLOW_UNVERIFIED_WEIGHTS"
WEIGHTS_DIR_ENV = "BRICS_WEIGHTS_DIR"


class WeightsMissing(BricsError):
    """A pretrained file a command needs is not on this machine: a missing prerequisite (exit 2)."""

    exit_code = 2


class WeightsMismatch(BricsError):
    """A pretrained file is there but its sha256 is not the published one."""


@dataclass(frozen=True)
class WeightFile:
    name: str  # what commands ask for: require("vgg16")
    filename: str
    home: str  # "torch-hub" | "clip" | "cleanfid" | "lpips-wheel": which library's place it lives in
    sha256: str | None  # None: the publisher gives no checksum
    url: str
    used_by: tuple[str, ...]
    description: str
    size: int | None = None  # bytes, where known


CATALOGUE: dict[str, WeightFile] = {
    w.name: w
    for w in (
        WeightFile(
            "alexnet", "alexnet-owt-7be5be79.pth", "torch-hub",
            "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            ("brics reconstruct (LPIPS)", "brics eval recon", "brics nn-search --metric lpips"),
            "torchvision AlexNet (ImageNet): the LPIPS-AlexNet backbone", 244_408_911,
        ),
        WeightFile(
            "vgg16", "vgg16-397923af.pth", "torch-hub",
            "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
            "https://download.pytorch.org/models/vgg16-397923af.pth",
            ("brics ae-train (perceptual loss)", "brics eval prc|all"),
            "torchvision VGG16 (ImageNet): LPIPS-VGG / VGG-L1 loss backbone and torch-fidelity's precision/recall features",
            553_433_881,
        ),
        WeightFile(
            "inception-fidelity", "weights-inception-2015-12-05-6726825d.pth", "torch-hub",
            "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
            "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
            ("brics eval fid|is|kid|all",),
            "torch-fidelity's InceptionV3 (TF FID weights): FID, IS and KID features",
        ),
        WeightFile(
            "clip-vit-b-32", "ViT-B-32.pt", "clip",
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
            "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
            ("brics eval clip-fid|all",),
            "OpenAI CLIP ViT-B/32: clean-fid's CLIP-FID features",
        ),
        WeightFile(
            "inception-cleanfid", "inception-2015-12-05.pt", "cleanfid",
            "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4",
            "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
            ("clean-fid's own FID only (brics eval takes FID from torch-fidelity, as the paper did)",),
            "StyleGAN2-ADA TorchScript InceptionV3: clean-fid's FID features",
            95_607_719,
        ),
        WeightFile(
            "lpips-lin-alex", "alex.pth", "lpips-wheel",
            "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
            "shipped in the lpips wheel (pip install lpips)",
            ("brics reconstruct (LPIPS)", "brics eval recon", "brics nn-search --metric lpips"),
            "LPIPS v0.1 linear layers for AlexNet",
        ),
        WeightFile(
            "lpips-lin-vgg", "vgg.pth", "lpips-wheel",
            "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
            "shipped in the lpips wheel (pip install lpips)",
            ("brics ae-train (LPIPS-VGG loss)",),
            "LPIPS v0.1 linear layers for VGG16",
        ),
        WeightFile(
            "dinov2-vit-l-14", "dinov2_vitl14_pretrain.pth", "torch-hub",
            None,  # not published; torch.hub's own name for the file, as its hub entry `dinov2_vitl14` downloads it
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
            ("brics eval fd-dinov2|all|stats",),
            "DINOv2 ViT-L/14 (LVD-142M): FD-DINOv2 features, as EDM2 and dgm-eval",
        ),
    )
}


LPIPS_WEIGHTS = {"alex": ("alexnet", "lpips-lin-alex"), "vgg": ("vgg16", "lpips-lin-vgg")}  # net -> (backbone, linear layers)


def torch_hub_checkpoints() -> Path:
    """`$TORCH_HOME/hub/checkpoints`, computed as torch.hub does (without importing torch)."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    torch_home = os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(torch_home) / "hub" / "checkpoints"


def _library_dir(home: str) -> Path:
    if home == "torch-hub":
        return torch_hub_checkpoints()
    if home == "clip":
        return Path(os.path.expanduser("~/.cache/clip"))  # clip.load's default download_root
    if home == "cleanfid":
        return Path("/tmp")  # cleanfid.features hard-codes /tmp on Linux and macOS
    if home == "lpips-wheel":
        spec = importlib.util.find_spec("lpips")
        if spec is None or not spec.submodule_search_locations:
            return Path("<lpips not installed>")
        return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1"
    raise ValueError(f"unknown weights home {home!r}")


def candidates(name: str) -> list[Path]:
    """Where `name` is looked for, in order; the first is where it belongs when missing."""
    w = entry(name)
    paths = []
    override = os.environ.get(WEIGHTS_DIR_ENV)
    if override and w.home != "lpips-wheel":  # the wheel's files travel with the package
        paths.append(Path(os.path.expanduser(override)) / w.filename)
    paths.append(_library_dir(w.home) / w.filename)
    return paths


def entry(name: str) -> WeightFile:
    if name not in CATALOGUE:
        raise KeyError(f"unknown weight file {name!r}; known: {', '.join(CATALOGUE)}")
    return CATALOGUE[name]


def locate(name: str) -> Path | None:
    """The first existing candidate path of `name`, or None."""
    return next((p for p in candidates(name) if p.is_file()), None)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def sha256_of(path: Path) -> str:
    """sha256 of a file, remembered for this process while its size and mtime stay the same."""
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _missing_message(names: list[str]) -> str:
    parts = []
    for name in names:
        w = entry(name)
        dest = candidates(name)[0].parent
        parts.append(f"'{w.filename}' ({w.description}) belongs in {dest}/")
    fix = f"copy it there (or point {WEIGHTS_DIR_ENV} at a folder holding it); `brics weights status` lists every file and its URL"
    return "missing pretrained weight file " + "; ".join(parts) + f" -- {fix}"


def missing(names) -> list[Missing]:
    """The files among `names` that are not on this machine, each with where it belongs."""
    out = []
    for name in names:
        if locate(name) is None:
            w = entry(name)
            out.append(Missing(f"weight file {w.filename} ({w.description})",
                               f"copy it to {candidates(name)[0].parent}/ or into ${WEIGHTS_DIR_ENV}; `brics weights status` lists its URL"))
    return out


def require(name: str, verify: bool = True) -> Path:
    """The local path of weight file `name`; raises WeightsMissing / WeightsMismatch. Never downloads."""
    return require_all([name], verify=verify)[name]


def require_all(names, verify: bool = True) -> dict[str, Path]:
    """Check several files at once, so a command lists everything it lacks in one message."""
    found = {name: locate(name) for name in names}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise WeightsMissing(_missing_message(missing))
    if verify:
        for name, path in found.items():
            check_checksum(name, path)
    return found  # type: ignore[return-value]


def check_checksum(name: str, path: Path) -> bool | None:
    """True if `path` has the published sha256, None when none is published; a mismatch raises unless
    BRICS_ALLOW_UNVERIFIED_WEIGHTS=1 (then False)."""
    w = entry(name)
    if w.sha256 is None:
        return None
    actual = sha256_of(path)
    if actual == w.sha256:
        return True
    message = (
        f"weight file {path} has sha256 {actual[:16]}..., not the published {w.sha256[:16]}... of {w.filename} "
        f"(a truncated download or another file): replace it (`brics weights fetch {name}` where there is internet) "
        f"or set {ALLOW_UNVERIFIED_ENV}=1 to use it anyway"
    )
    if os.environ.get(ALLOW_UNVERIFIED_ENV, "") not in ("", "0"):
        if os.environ.get("RANK", "0") == "0":  # once per job under torchrun, not once per rank
            print(f"warning: {message.split(':')[0]}; used anyway ({ALLOW_UNVERIFIED_ENV}=1)", file=sys.stderr)
        return False
    raise WeightsMismatch(message)


def describe(name: str, verify: bool = True) -> dict:
    """One file's record for results: name, file, path, sha256 and whether it is the published one."""
    path = locate(name)
    record = {"name": name, "file": entry(name).filename, "path": str(path) if path else None}
    if path is not None and verify:
        record["sha256"] = sha256_of(path)
        published = entry(name).sha256
        record["verified"] = None if published is None else record["sha256"] == published  # None: nothing to check against
    return record


def status(verify: bool = True) -> list[dict]:
    """Every catalogued file: where it is expected, whether present, whether its checksum matches."""
    rows = []
    for name, w in CATALOGUE.items():
        places = candidates(name)
        path = locate(name)
        ok, actual = None, None
        if path is not None and verify:
            actual = sha256_of(path)
            ok = None if w.sha256 is None else actual == w.sha256
        rows.append({
            "name": name,
            "file": w.filename,
            "expected_dir": str(places[0].parent),
            "searched": [str(p) for p in places],
            "path": str(path) if path else None,
            "present": path is not None,
            "sha256_ok": ok,
            "sha256": w.sha256,  # the published one (None: not published)
            "actual_sha256": actual,  # of the file found (with verify)
            "size": w.size,
            "url": w.url,
            "used_by": list(w.used_by),
            "description": w.description,
        })
    return rows


def fetch(name: str, progress=None) -> Path:
    """Download `name` to where it belongs, verify its sha256, then move it into place atomically."""
    w = entry(name)
    if w.home == "lpips-wheel":
        raise BricsError(f"{w.filename} ships inside the lpips wheel: reinstall lpips (`pip install --force-reinstall lpips`)")
    dest = candidates(name)[0]
    if dest.is_file() and (w.sha256 is None or sha256_of(dest) == w.sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{w.filename}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(w.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            while block := response.read(1 << 20):
                out.write(block)
                h.update(block)
                if progress is not None:
                    progress(len(block), total)
            out.flush()
            os.fsync(out.fileno())
        if w.sha256 is not None and h.hexdigest() != w.sha256:
            raise WeightsMismatch(f"downloaded {w.filename} has sha256 {h.hexdigest()[:16]}..., expected {w.sha256[:16]}...; nothing was written")
        os.replace(tmp, dest)
    except OSError as exc:
        raise BricsError(f"could not download {w.url}: {exc}; copy {w.filename} into {dest.parent}/ by hand") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest
