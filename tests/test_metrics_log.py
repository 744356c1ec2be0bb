"""Pieces of the shared training loop (brics_cli/train/metrics_log.py) tested on their own."""

from __future__ import annotations

import json

import pytest

from brics_cli.train.metrics_log import MetricsLog, Throughput


def test_throughput_counts_what_each_window_processed() -> None:
    ticks = iter([10.0, 14.0, 15.0])  # start, first read, second read
    rate = Throughput(clock=lambda: next(ticks))
    for _ in range(2):  # a short window, e.g. the first after a resume: 2 steps of a 50-step log_every
        rate.add(8)
    assert rate.read() == 16 / 4.0
    rate.add(3)  # the next window starts at the read
    assert rate.read() == 3 / 1.0


def test_truncate_after_drops_torn_lines_with_one_warning_and_keeps_whole_records(tmp_path, capsys) -> None:
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False)
    for step in (2, 4, 6):
        log.write(step, {"l2": 0.5})
    whole = (tmp_path / "metrics.jsonl").read_text()
    record = json.dumps({"step": 8, "time": 1.0, "l2": 0.25})
    # A torn append (no newline) with the next append glued to it, then a torn last line.
    (tmp_path / "metrics.jsonl").write_text(whole + record[:9] + record + "\n" + record[:20])
    log.truncate_after(4)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    [warning] = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"warning: {tmp_path / 'metrics.jsonl'}: dropped 2 partial") and "line 4, 5" in warning
    log.truncate_after(4)  # a clean log: no warning
    assert capsys.readouterr().err == ""


def test_tensorboard_gets_the_sample_grids_and_no_stale_steps_after_a_resume(tmp_path, tiny_shards):
    import subprocess
    import sys

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import TINY_RECIPE

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "brics_cli", "ae-train", str(TINY_RECIPE), f"data.shards={tiny_shards}", "--out", str(run),
           "ae.train.log_every=2", "ae.train.sample_every=4", "ae.train.checkpoint_every=4", "ae.train.keep=5"]
    first = subprocess.run(cmd + ["ae.train.steps=6"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    # As if the run had died after logging step 6 but before checkpointing it: the rerun resumes at 4.
    (run / "checkpoints" / "step-000006.safetensors").unlink()
    second = subprocess.run(cmd + ["ae.train.steps=8"], capture_output=True, text=True)
    assert second.returncode == 0 and "from step 4" in second.stderr, second.stderr
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("l2")]
    assert steps == [2, 4, 6, 8], steps  # step 6 once: the first run's value was purged
    logged = {r["step"]: r["l2"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert [round(e.value, 5) for e in events.Scalars("l2")] == [round(logged[s], 5) for s in steps]
    assert [e.step for e in events.Images("samples")] == [4, 8]
