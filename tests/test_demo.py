"""The demo's pieces: its table, CIs and plot, and a run against the local test server."""

import json

import pytest

from orchestrator.demo import Row, bootstrap_ci, plot, run_demo, table
from tests.openai_server import MathResponder, OpenAIServer


def test_bootstrap_ci_brackets_the_mean():
    lo, hi = bootstrap_ci([True] * 30 + [False] * 10)
    assert lo < 0.75 < hi and 0.5 < lo and hi < 0.95
    assert bootstrap_ci([]) is None


def test_table_reports_savings_against_the_first_policy():
    rows = [Row("sc:n=16", 0.8, (0.7, 0.9), 1600, 10, 12.0, 0),
            Row("adaptive:max=16", 0.79, (0.69, 0.89), 400, 40, 6.0, 0)]
    text = table(rows)
    assert "4.00x fewer" in text and "sc:n=16" in text.splitlines()[0]


def test_plot_writes_a_png(tmp_path):
    rows = [Row("a", 0.5, (0.4, 0.6), 100, 1, 1.0, 0), Row("b", None, None, 0, 0, 1.0, 1)]
    plot(rows, tmp_path / "x.png", "t")
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


async def test_demo_runs_three_policies_against_a_real_http_server(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"Count {'w ' * i}",
                                            "answer": str((i + 1) % 7)}) + "\n"
                                for i in range(5)))
    async with OpenAIServer(responder=MathResponder()) as server:
        rows = await run_demo(server.url, "test-model", problems, None,
                              ("sc:n=8", "ac:threshold=0.95,max=8", "adaptive:max=8"),
                              tmp_path / "out", concurrency=8)
    assert [r.policy for r in rows] == ["sc:n=8", "ac:threshold=0.95,max=8", "adaptive:max=8"]
    assert all(r.completion_tokens > 0 and r.errors == 0 for r in rows)
    assert rows[0].requests >= 5
    assert len(list((tmp_path / "out").glob("results_*.jsonl"))) == 3


@pytest.mark.parametrize("argv", [["--base-url", "http://x/v1"], ["--limit", "-1"]])
def test_bad_arguments_are_config_errors(argv):
    from orchestrator.demo import main
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError):
        main([*argv, "--problems", "x.jsonl"])


def test_demo_without_matplotlib_prints_the_table_and_writes_no_figure(
        server_url, tmp_path, monkeypatch, capsys):
    """matplotlib is the optional ``plot`` extra: without it the demo says so once, runs,
    prints its table and writes its results, but no PNG."""
    from benchmarks import plots
    from orchestrator.demo import main

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} + 1?",
                                            "answer": str(i + 1)}) + "\n" for i in range(3)))
    rc = main(["--base-url", server_url, "--model", "test-model", "--problems", str(problems),
               "--policy", "sc:n=2", "--out", str(tmp_path / "out")], fast_exit=False)
    out, err = capsys.readouterr()
    assert rc == 0
    assert "solverify[plot]" in err and "no figure" in err
    assert "sc:n=2" in out and "plot:" not in out
    assert not (tmp_path / "out" / "demo.png").exists()
    assert len(list((tmp_path / "out").glob("results_*.jsonl"))) == 1


async def test_demo_against_an_unreachable_endpoint_leaves_no_folder(tmp_path):
    from orchestrator.errors import EndpointUnreachable

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "q", "problem": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(EndpointUnreachable):
        await run_demo("http://127.0.0.1:9/v1", "m", problems, None, ("sc:n=2",),
                       tmp_path / "out", concurrency=2)
    assert not (tmp_path / "out").exists()


def test_demo_whose_problems_end_on_an_error_exits_1(server_url, tmp_path, monkeypatch,
                                                     capsys):
    """Every stream is cut midway (a fault proxy in front of the test server): the
    samples keep failing, so every problem ends on an error. The table says so, and so
    must the exit status (it was 0; found by review)."""
    from benchmarks import plots
    from orchestrator.demo import main
    from tests.fault_proxy import FaultProxy
    from tests.helpers import Background

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} + 1?",
                                            "answer": str(i + 1)}) + "\n" for i in range(2)))
    bg = Background()
    proxy = FaultProxy(server_url.removesuffix("/v1"), rate=1.0, kinds=("cut",))
    bg.call(proxy.start())
    try:
        rc = main(["--base-url", proxy.url, "--model", "test-model", "--problems",
                   str(problems), "--policy", "sc:n=2", "--out", str(tmp_path / "out")],
                  fast_exit=False)
    finally:
        bg.call(proxy.stop())
        bg.close()
    out, err = capsys.readouterr()
    assert rc == 1
    assert "2 errors" in out
    assert "sc:n=2: 2 of 2 problem(s) ended on an error; first: q" in err
    assert len((tmp_path / "out" / "results_sc_n-2.jsonl").read_text().splitlines()) == 2
