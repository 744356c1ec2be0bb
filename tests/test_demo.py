"""`brics demo --quick`: the whole pipeline end to end, every artifact present, every number sane."""

from __future__ import annotations

import json
import math
import subprocess
import sys


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "brics_cli", "demo", "--quick", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["shard", "ae-train", "reconstruct", "diffusion-train", "sample", "eval-recon",
                            "eval-generative", "nn-search"]
    for name, stage in stages.items():
        if name == "eval-generative" and stage["status"] == "skipped":
            assert "weights" in stage["reason"]  # no metric weights on this machine: said, not hidden
            continue
        assert stage["status"] == "done" and stage["seconds"] > 0, stage
    r = summary["reconstruction"]
    assert 10 < r["psnr"] < 60 and 0 < r["ssim"] <= 1 and r["images"] == 64
    assert all(0 < u <= 1 for u in r["usage"])
    for v in (r["psnr_std"], r["ssim_std"], summary["seconds"]):
        assert math.isfinite(v) and v >= 0
    for rel in ("report.html", "report.md", "report/training-crops.png", "report/loss-curves.png", "recon/grid.png",
                "recon/usage.png", "samples/grid.png", "nn/nn-grid.png", "nn/nn.json", "samples/manifest.json"):
        assert (out / rel).is_file(), rel
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") > 2 * r["images"] and "PSNR" in page  # every pair inline (test_report.py)
    # A rerun resumes: training stages find their finished checkpoints instead of starting over.
    again = subprocess.run([sys.executable, "-m", "brics_cli", "demo", "--quick", "--out", str(out), "--json"],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = {s["name"]: s for s in json.loads(again.stdout.strip().splitlines()[-1])["stages"]}
    assert rerun["ae-train"]["seconds"] < stages["ae-train"]["seconds"]
    assert rerun["diffusion-train"]["seconds"] < stages["diffusion-train"]["seconds"]


def test_a_signal_to_the_demo_reaches_the_running_stage_which_saves_its_state(tmp_path):
    import signal
    import time

    from brics_cli.core.checkpoint import CheckpointDir

    out = tmp_path / "demo"
    # Its own session: the signal reaches the demo alone (as `kill PID` does), so only forwarding can stop the stage.
    proc = subprocess.Popen([sys.executable, "-m", "brics_cli", "demo", "--quick", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log, deadline = out / "run" / "ae" / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and '"step": 10' in log.read_text()):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGINT during ae-train" in err
    steps = CheckpointDir(out / "run" / "ae" / "checkpoints").steps()
    assert steps and steps[0] < 20, steps  # saved where it stopped, before the first periodic checkpoint (20)
    assert not (out / "report.html").exists() and not (out / "run" / "diffusion").exists()
