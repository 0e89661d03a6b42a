"""The CLI end to end, as a user runs it: a subprocess against the local test server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_solverify
from tests.conftest_data import DATA, needs_data


def problems_file(tmp_path: Path, n: int = 3) -> Path:
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} plus {i}?",
                                     "answer": str(2 * i)}) + "\n" for i in range(n)))
    return p


@needs_data
def test_run_gsm8k_first_20_prints_summary(server_url, tmp_path):
    out = tmp_path / "results.jsonl"
    r = run_solverify("run", "--base-url", server_url, "--model", "test-model",
                  "--problems", str(DATA / "gsm8k_test.jsonl"), "--limit", "20",
                  "--policy", "sc:n=4", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "over 20 graded" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 20 and {row["policy"] for row in rows} == {"sc:n=4"}
    assert all(row["completion_tokens"] > 0 and len(row["solutions"]) == 4 for row in rows)


def test_run_genrm_reports_measured_lambda(server_url, tmp_path):
    out = tmp_path / "r.jsonl"
    r = run_solverify("run", "--base-url", server_url, "--model", "test-model",
                  "--problems", str(problems_file(tmp_path)), "--policy", "genrm:s=3,v=2",
                  "--out", str(out), "--no-progress", "--budget-tokens", "100000")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("lambda"))
    assert float(line.split()[-1]) > 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(len(row["verifications"]) == 6 for row in rows)
    # verifications share the problem+solution prefix: the server reports cache hits
    cached = sum(row["cached_prompt_tokens"] for row in rows)
    assert all(row["cached_prompt_tokens"] <= row["prompt_tokens"] for row in rows)
    assert cached > 0 and f"({cached} served from the prefix cache)" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--policy", "best:n=3"), "unknown policy 'best'"),
        (("--policy", "sc:n=0"), "sc: n must be an integer >= 1"),
        (("--model", "no-such-model"), "model 'no-such-model' is not served"),
        (("--base-url", "http://127.0.0.1:9/v1"), "cannot reach http://127.0.0.1:9/v1"),
        (("--problems", "pyproject.toml"), "invalid JSON"),
        (("--problems", "nope.jsonl"), "problem file not found"),
    ],
)
def test_bad_input_is_one_clear_line(server_url, tmp_path, args, message):
    base = {"--base-url": server_url, "--model": "test-model",
            "--problems": str(problems_file(tmp_path)), "--policy": "sc:n=2",
            "--out": str(tmp_path / "o.jsonl")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["run", "--no-progress"] + [x for kv in base.items() for x in kv]
    r = run_solverify(*argv)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("solverify: error:")]
    assert len(errors) == 1


def test_policies_lists_the_grammar():
    r = run_solverify("policies")
    assert r.returncode == 0 and "sc:n=16" in r.stdout and "genrm" in r.stdout


def test_run_against_a_llamacpp_like_server_counts_http_requests_and_streams(tmp_path):
    """``--max-streams`` caps the HTTP streams of an emulated n; the summary says how many
    HTTP requests the logical ones took and how the streams went."""
    import socket
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.openai_server", "--port", str(port), "--model",
         "test-model", "--llamacpp"], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        out = tmp_path / "results.jsonl"
        r = run_solverify("run", "--base-url", f"http://127.0.0.1:{port}/v1", "--model",
                          "test-model", "--problems", str(problems_file(tmp_path)),
                          "--policy", "sc:n=4", "--out", str(out), "--no-progress",
                          "--concurrency", "4", "--max-streams", "2")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    http = sum(row["http_requests"] for row in rows)
    assert http >= 4 * sum(row["requests"] for row in rows)
    assert f"({http} HTTP requests)" in r.stdout
    streams = next(line for line in r.stdout.splitlines() if line.startswith("streams"))
    peak = int(streams.split("at most ")[1].split()[0])
    assert peak <= 2 and "(limit 2)" in streams
    # counted with the server's tokenizer: chat prompts from their message text (flagged)
    assert all(row["prompt_tokens"] > 0 for row in rows)
    assert {s for row in rows for s in row["tokens_estimated_from"]} <= {"tokenize-text",
                                                                         "tokenize-stop"}

