"""benchmarks/gpu_check.sh --smoke: the GPU check runs end to end on a CPU, so it works the first time a GPU appears."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_every_measurement(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["smoke"] is True and report["machine"]["device"] == "cpu"
    for stage, rate in (("ae_train", "images_per_s"), ("diffusion_train", "codes_per_s")):
        assert set(report[stage]) == {"fp32", "bf16"}
        assert all(m[rate] > 0 and m["step_s"] > 0 for m in report[stage].values())
    assert set(report["sampling"]) == {"fp32", "bf16"} and report["sampling"]["fp32"]["codes_per_s"] > 0
    assert "passed" in (tmp_path / "cuda_tests.txt").read_text() or "skipped" in (tmp_path / "cuda_tests.txt").read_text()
