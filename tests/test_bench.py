"""The benchmark still runs end to end (a small N; its figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "relay_bench.py"


def test_bench_relays_every_message_for_both_contenders(tmp_path: Path) -> None:
    """A 300-message run finishes, relays all 300 with the relay and reports both rows."""
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--messages", "300", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout
    figures = json.loads(output.read_text())
    contenders = {entry["contender"]: entry for entry in figures["results"]}
    assert contenders["relay (C=64)"]["messages"] == 300
    assert contenders["naive baseline"]["messages"] == 300
