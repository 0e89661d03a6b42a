"""The client-CPU benchmark runs end to end on a tiny workload (its figures are not checked:
speed targets live in the benchmark, not in tests)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import client_cpu


def test_client_cpu_benchmark_streams_both_clients(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    assert client_cpu.main(["--samples", "6", "--tokens", "5", "--rounds", "1", "--n", "3",
                            "--in-flight", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    row = report["results"]["n=3"]
    # both clients streamed every word of every sample: 6 samples x 5 tokens
    assert row["words_streamed_last_round"] == {"bare": 30, "solverify": 30}
    assert len(row["ratios"]) == 1 and row["ratios"][0] > 0
    assert report["config"]["in_flight"] == 2
