"""One writer per output folder (brics_cli/core/locks.py), with a real second process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from brics_cli.core.locks import RECORD_NAME, FolderBusy, FolderLock

HOLD = """
import sys, time
from brics_cli.core.locks import FolderLock
lock = FolderLock(sys.argv[1], "holder-of-the-test").acquire()
print("locked", flush=True)
time.sleep(60)
"""


def hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def brics(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brics_cli", *args], capture_output=True, text=True, cwd=cwd)


def test_a_second_shard_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "shards"
    holder = hold(out)
    try:
        proc = brics("shard", "demo", "--out", str(out), "--train-count", "8", "--val-count", "2", cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert f"pid {holder.pid} on " in lines[0] and "`holder-of-the-test`" in lines[0] and "choose another folder" in lines[0]
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()  # nothing was written
    # The holder is gone (kill -9): its lock went with it, and the shard run goes through.
    proc = brics("shard", "demo", "--out", str(out), "--train-count", "8", "--val-count", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "taking over the lock of pid" in proc.stderr and (out / "manifest.json").is_file()
    assert not (out / RECORD_NAME).exists()  # released at the end


def test_a_stale_record_of_a_dead_process_is_taken_over(tmp_path):
    holder = hold(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    stale = json.loads((tmp_path / RECORD_NAME).read_text())
    assert stale["pid"] == holder.pid
    with FolderLock(tmp_path, "me") as lock:
        assert lock.took_over["pid"] == holder.pid
        assert json.loads((tmp_path / RECORD_NAME).read_text())["pid"] == os.getpid()


def test_two_locks_in_one_process_exclude_each_other_until_released(tmp_path):
    first = FolderLock(tmp_path, "first").acquire()
    try:
        FolderLock(tmp_path, "second").acquire()
        raise AssertionError("the second lock was granted")
    except FolderBusy as exc:
        assert "`first`" in str(exc) and exc.exit_code == 1
    first.release()
    with FolderLock(tmp_path, "second"):
        pass


def test_a_second_ae_train_on_one_run_folder_is_refused_and_changes_nothing(tmp_path, tiny_shards):
    from conftest import TINY_RECIPE

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "brics_cli", "ae-train", str(TINY_RECIPE), f"data.shards={tiny_shards}", "--out", str(run)]
    first = subprocess.Popen(cmd + ["ae.train.steps=400", "ae.train.checkpoint_every=1000"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    config_before = (run / "config.yaml").read_text()
    second = subprocess.run(cmd + ["ae.loss.l2=1", "ae.train.steps=8"], capture_output=True, text=True)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert second.returncode == 1 and f"is being written by pid {first.pid} on " in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert first.returncode == 0, err
    assert (run / "config.yaml").read_text() == config_before  # the refused run wrote nothing
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step logged twice
