"""Pieces of the shared training loop (brics_cli/train/metrics_log.py) tested on their own."""

from __future__ import annotations

from brics_cli.train.metrics_log import Throughput


def test_throughput_counts_what_each_window_processed() -> None:
    ticks = iter([10.0, 14.0, 15.0])  # start, first read, second read
    rate = Throughput(clock=lambda: next(ticks))
    for _ in range(2):  # a short window, e.g. the first after a resume: 2 steps of a 50-step log_every
        rate.add(8)
    assert rate.read() == 16 / 4.0
    rate.add(3)  # the next window starts at the read
    assert rate.read() == 3 / 1.0
