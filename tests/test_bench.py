"""The benchmark still runs end to end (a small N; its figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "relay_bench.py"


def test_bench_runs_every_contender_and_reports_targets(tmp_path: Path) -> None:
    """A 300-message run relays all 300 with each contender, measures latency, names targets."""
    output = tmp_path / "bench.json"
    command = [sys.executable, str(BENCH), "--messages", "300", "--paced-seconds", "0.5"]
    result = subprocess.run(
        [*command, "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout
    figures = json.loads(output.read_text())
    rows = {entry["key"]: entry for entry in figures["results"]}
    assert set(rows) == {
        "naive",
        "faststream-httpx",
        "faststream-aiohttp",
        "relay",
        "relay-x2",
        "broker",
        "http",
    }
    for key in ("naive", "faststream-httpx", "faststream-aiohttp", "broker", "http"):
        assert rows[key]["messages"] == 300, key
    # The relays may have relayed a few before the bench saw them consuming: counted before.
    assert rows["relay"]["sim_stats"]["accepted"] >= 300
    assert rows["relay"]["paced_latency"]["count"] >= 10
    assert rows["relay"]["cpu_seconds_per_1k"] > 0
    assert rows["relay"]["peak_rss_mb"] > 10
    names = " ".join(target["name"] for target in figures["targets"])
    assert "1/(1/B + 1/H)" in names
    assert "naive baseline" in names
    assert "FastStream" in names


def test_outbox_bench_runs_and_prints_its_figures(tmp_path: Path) -> None:
    """A small outbox benchmark relays every row and measures both latencies."""
    output = tmp_path / "outbox.json"
    script = BENCH.parent / "outbox_bench.py"
    command = [sys.executable, str(script), "--rows", "300", "--paced", "20", "--rate", "40"]
    result = subprocess.run(
        [*command, "--poll", "0.2", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(output.read_text())
    assert figures["throughput"]["rows"] == 300
    assert figures["latency_notify"]["arrived"] == 20
    assert figures["latency_polling"]["arrived"] == 20
