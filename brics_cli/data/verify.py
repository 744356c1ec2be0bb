"""`brics shard verify`: every shard's sha256 against the manifest, every sample decoded."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from brics_cli.core.images import ImageSkip, decode_check
from brics_cli.core.files import sha256_file
from brics_cli.errors import ConfigError

IMAGE_EXTS = ("png", "jpg", "webp")


def verify_shards(root: Path) -> dict[str, Any]:
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"{manifest_path} not found: is {root} a folder written by `brics shard`?")
    manifest = json.loads(manifest_path.read_text())
    problems: list[str] = []
    samples = 0
    for name, expected in manifest.get("shards", {}).items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if sha256_file(path) != expected:
            problems.append(f"{name}: sha256 differs from manifest.json")
        try:
            samples += _check_tar(path, problems)
        except tarfile.TarError as exc:
            problems.append(f"{name}: not a readable tar ({exc})")
    counted = sum(manifest.get("counts", {}).values())
    if not problems and samples != counted:
        problems.append(f"manifest counts {counted} samples, the shards hold {samples}")
    return {"root": str(root), "shards": len(manifest.get("shards", {})), "samples": samples, "problems": problems}


def _check_tar(path: Path, problems: list[str]) -> int:
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for key, files in groups.items():
        where = f"{path.name}:{key}"
        image_exts = [e for e in files if e in IMAGE_EXTS]
        if len(image_exts) != 1:
            problems.append(f"{where}: expected one image, found {sorted(files)}")
            continue
        try:
            decode_check(files[image_exts[0]], image_exts[0])
        except ImageSkip as exc:
            problems.append(f"{where}: {exc}")
        try:
            json.loads(files.get("json", b""))
        except ValueError:
            problems.append(f"{where}: missing or invalid json")
    return len(groups)
