"""The CLI's conventions: OpenAI's environment variables, URLs checked up front, and help
texts a user can read (``run`` with an example, ``policies`` aligned, ``serve`` naming
itself as the user typed it)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from orchestrator.cliargs import api_key_from, check_base_url, check_output
from orchestrator.errors import ConfigError
from tests.conftest import run_solverify


def test_openai_base_url_is_the_default_base_url(server_url, tmp_path, monkeypatch):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "q", "problem": "What is 1 plus 1?",
                                    "answer": "2"}) + "\n")
    monkeypatch.setenv("OPENAI_BASE_URL", server_url)
    r = run_solverify("run", "--model", "test-model", "--problems", str(problems),
                      "--policy", "sc:n=2", "--out", str(tmp_path / "r.jsonl"),
                      "--no-progress")
    assert r.returncode == 0, r.stderr
    assert server_url in r.stderr  # "endpoint URL model ...: capabilities"


def test_without_base_url_or_openai_base_url_it_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    r = run_solverify("run", "--model", "m", "--problems", "p.jsonl", "--policy", "sc:n=2",
                      "--out", str(tmp_path / "r.jsonl"))
    assert r.returncode == 2 and "--base-url" in r.stderr


def test_openai_api_key_is_sent_unless_another_variable_is_named(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    monkeypatch.setenv("MY_KEY", "sk-mine")
    assert api_key_from(argparse.Namespace(api_key_env=None)) == "sk-from-env"
    assert api_key_from(argparse.Namespace(api_key_env="MY_KEY")) == "sk-mine"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert api_key_from(argparse.Namespace(api_key_env=None)) == "EMPTY"


@pytest.mark.parametrize("url", ["localhost:8000/v1", "127.0.0.1:8000", "ftp://h/v1",
                                 "http://", "http://host:port/v1"])
def test_a_url_that_is_not_http_is_rejected(url):
    with pytest.raises(ConfigError, match="not an http"):
        check_base_url(url)


def test_the_cli_rejects_such_a_url_before_any_request(tmp_path):
    r = run_solverify("run", "--base-url", "localhost:8000/v1", "--model", "m", "--problems",
                      "p.jsonl", "--policy", "sc:n=2", "--out", str(tmp_path / "r.jsonl"))
    assert r.returncode == 2 and "not an http:// or https:// URL" in r.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_http_and_https_urls_pass():
    assert check_base_url("https://api.example.com/v1") == "https://api.example.com/v1"
    assert check_base_url("http://127.0.0.1:8000/v1")


def test_policies_columns_line_up_and_every_default_is_said():
    r = run_solverify("policies")
    assert r.returncode == 0
    assert "see help" not in r.stdout
    param_lines = [ln for ln in r.stdout.splitlines() if ln.startswith("    ")]
    assert param_lines
    starts = {re.match(r"    \S+(?: or 'all')?\s+", ln).end() for ln in param_lines}
    assert len(starts) == 1, starts


def test_help_texts():
    run_help = run_solverify("run", "--help").stdout
    assert "example:" in run_help and "solverify policies" in run_help
    demo_help = run_solverify("demo", "--help").stdout
    assert "`" not in demo_help and "--timeout" in demo_help
    serve_help = run_solverify("serve", "--help").stdout
    assert serve_help.startswith("usage: solverify serve")
    start_help = run_solverify("serve", "start", "--help").stdout
    assert "--timeout" in start_help


def test_the_capitals_task_ships_with_the_package():
    from orchestrator.demo import default_problems
    from orchestrator.problems import load_problems

    with default_problems() as path:
        problems = load_problems(Path(path))
    assert len(problems) == 146
    assert all(p.answer and p.aliases for p in problems)


# ---- output paths: checked before any work, nothing created ----------------------------
def test_an_output_path_that_cannot_be_written_is_refused_by_name(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"--json .* is a folder: give the path of a file"):
        check_output("--json", tmp_path)
    with pytest.raises(ConfigError, match=r"--out .*afile/deeper/o.jsonl: .*afile is a file, "
                                          r"not a folder"):
        check_output("--out", afile / "deeper" / "o.jsonl")
    with pytest.raises(ConfigError, match=r"--out .*afile is a file: give a folder"):
        check_output("--out", afile, folder=True)
    check_output("--out", tmp_path / "new" / "dir" / "o.jsonl")  # to be made: fine
    check_output("--out", tmp_path, folder=True)
    check_output("--json", None)
    check_output("--json", Path("/dev/null"))  # written in place: /dev need not be writable
    check_output("--json", afile)  # an existing writable file, the same
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing created


def test_run_takes_one_policy_and_checks_its_outputs_before_any_request(tmp_path, capsys):
    import asyncio

    from orchestrator.cli import _run, build_parser

    afile = tmp_path / "afile"
    afile.write_text("x")
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"id": "1", "problem": "2+2?", "answer": "4"}\n')
    base = ["run", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--problems",
            str(problems)]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*base, "--policy", "sc:n=4", "--policy", "sc:n=8",
                                   "--out", "o.jsonl"])
    assert exc.value.code == 2 and "--policy given twice" in capsys.readouterr().err
    for flag, value in (("--out", afile / "o.jsonl"), ("--out", tmp_path),
                        ("--trace", afile / "t.jsonl")):
        extra = [] if flag == "--out" else ["--out", str(tmp_path / "o.jsonl")]
        args = build_parser().parse_args([*base, "--policy", "sc:n=4", flag, str(value),
                                          *extra])
        with pytest.raises(ConfigError, match=flag):  # not the unreachable endpoint
            asyncio.run(_run(args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "p.jsonl"]


def test_demo_refuses_an_out_that_is_a_file_before_starting_anything(tmp_path):
    from orchestrator.demo import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"--out .* is a file: give a folder"):
        main(["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(afile)])
