"""``solverify bench``: replay, compute-matched and record, end to end on small pools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.cli import main
from benchmarks.pools import load_pool
from benchmarks.record import record
from orchestrator.backends.fake import FakeBackend, FakeReply
from orchestrator.errors import ConfigError, DataError
from orchestrator.types import Problem
from tests.conftest import run_solverify
from tests.helpers import WordTask

RUN_KEYS = {"pool", "policy", "problems", "orders", "accuracy", "accuracy_ci95",
            "tokens_per_problem", "samples_per_problem", "latency_per_problem"}


def write_pool(path: Path, with_p_yes: bool = False) -> Path:
    rows = []
    for i in range(6):
        samples = []
        for j in range(7):
            pred = "a" if (i + j) % 3 else "b"
            s = {"pred": pred, "correct": pred == "a", "tokens": 5 + 3 * j}
            if with_p_yes:
                s["p_yes"] = 0.7 if pred == "a" else 0.4
            samples.append(s)
        rows.append({"id": f"p{i}", "problem": f"q{i}", "answer": "a", "samples": samples})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_replay_writes_the_json_schema_markdown_and_plot(tmp_path, capsys):
    pool = write_pool(tmp_path / "toy.jsonl", with_p_yes=True)
    out, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    rc = main(["replay", "--pool", str(pool), "--policy", "sc:n=all", "--policy", "sc:n=3",
               "--policy", "ac:threshold=0.9", "--policy", "esc:window=3",
               "--policy", "genrm:s=3,v=1", "--orders", "3", "--seed", "1", "--workers", "1",
               "--json", str(out), "--markdown", str(md), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["policy"] for r in report["runs"]] == ["sc:n=all", "sc:n=3", "ac:threshold=0.9",
                                                     "esc:window=3", "genrm:s=3,v=1"]
    for r in report["runs"]:
        assert RUN_KEYS <= set(r)
        assert r["pool"] == "toy" and r["problems"] == 6 and r["orders"] == 3
        lo, hi = r["accuracy_ci95"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1
    assert report["runs"][0]["samples_per_problem"] == 7
    assert report["command"].startswith("solverify bench replay")
    assert "| `ac:threshold=0.9` |" in md.read_text()
    assert png.stat().st_size > 1000
    assert "sc:n=all" in capsys.readouterr().out


def test_replay_with_a_concurrency_cap_and_several_pools(tmp_path):
    a = write_pool(tmp_path / "one.jsonl")
    b = write_pool(tmp_path / "two.jsonl")
    out = tmp_path / "r.json"
    rc = main(["replay", "--pool", str(a), "--pool", str(b), "--policy", "sc:n=4",
               "--policy", "ac", "--orders", "2", "--concurrency", "1", "--workers", "1",
               "--json", str(out), "--quiet"])
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["pool"], r["policy"]) for r in runs] == [
        ("one", "sc:n=4"), ("one", "ac"), ("two", "sc:n=4"), ("two", "ac")]
    assert all(r["concurrency"] == 1 for r in runs)


def test_replay_errors_are_config_or_data_errors(tmp_path):
    pool = write_pool(tmp_path / "toy.jsonl")
    with pytest.raises(ConfigError, match="unknown policy"):
        main(["replay", "--pool", str(pool), "--policy", "magic", "--quiet"])
    with pytest.raises(ConfigError, match="needs verifications"):
        main(["replay", "--pool", str(pool), "--policy", "genrm:s=2,v=1", "--quiet"])
    with pytest.raises(DataError, match="not found"):
        main(["replay", "--pool", str(tmp_path / "nope.jsonl"), "--policy", "sc:n=1"])
    with pytest.raises(SystemExit):
        main(["replay", "--pool", str(pool), "--policy", "sc:n=1", "--orders", "0"])


def test_compute_matched_cli(tmp_path, capsys):
    pool = write_pool(tmp_path / "toy.jsonl")
    out, md, png = tmp_path / "c.json", tmp_path / "c.md", tmp_path / "c.png"
    rc = main(["compute-matched", "--pool", str(pool), "--simulated-verifier",
               "--sim-vmax", "4", "--bootstrap", "20", "--json", str(out),
               "--markdown", str(md), "--plot", str(png)])
    assert rc == 0
    (res,) = json.loads(out.read_text())["results"]
    assert res["simulated_verifier"] and res["grid"] == {"S": [1, 2, 4, 7], "V": [1, 2, 4]}
    assert "simulated" in md.read_text() and png.stat().st_size > 1000
    assert "crossover" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no verifications"):
        main(["compute-matched", "--pool", str(pool), "--quiet"])


def test_replay_warns_when_a_horizon_exceeds_the_pool(tmp_path, capsys):
    """``sc:n=100`` on a 7-sample pool replays as ``sc:n=all``: said on stderr (found by
    review: only the samples column showed it)."""
    pool = write_pool(tmp_path / "toy.jsonl")
    assert main(["replay", "--pool", str(pool), "--policy", "sc:n=100", "--policy",
                 "sc:n=7", "--orders", "1", "--workers", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "sc:n=100 may draw 100 samples a problem, but pool toy holds at most 7" in err
    assert "sc:n=7 " not in err


async def test_record_writes_a_replayable_pool_and_resumes(tmp_path):
    def respond(req, i):
        if req.kind == "verify":
            return FakeReply.text("yes" if req.prompt.endswith("|seven") else "no")
        return FakeReply.text("so seven", "so seven", "a b eight")

    problems = [Problem(id=f"p{i}", problem=f"q{i}", answer="seven") for i in range(3)]
    out = tmp_path / "rec.jsonl"
    first = await record(problems[:2], FakeBackend(respond), WordTask(), out, samples=3,
                         verifications=2, model="fake")
    assert (first.recorded, first.skipped, first.samples, first.verifications) == (2, 0, 6, 12)
    again = await record(problems, FakeBackend(respond), WordTask(), out, samples=3,
                         verifications=2, model="fake")
    assert (again.recorded, again.skipped) == (1, 2)
    pool = load_pool(out)
    assert [p.id for p in pool.problems] == ["p0", "p1", "p2"]
    s = pool.problems[0].samples
    assert sorted(x.pred for x in s) == ["eight", "seven", "seven"]
    assert all(x.correct == (x.pred == "seven") for x in s)
    assert all(len(x.verifications) == 2 for x in s)
    assert {v.p_yes for x in s for v in x.verifications} == {0.0, 1.0}
    assert pool.problems[0].problem.meta["model"] == "fake"
    # and it replays: the verifier prefers "seven"
    rc = main(["replay", "--pool", str(out), "--policy", "genrm:s=all,v=2", "--policy",
               "sc:n=1", "--orders", "2", "--workers", "1", "--quiet",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert runs[0]["accuracy"] == 1.0


async def test_record_does_not_write_a_problem_whose_samples_kept_failing(tmp_path):
    """Its pool line would hold fewer samples than asked for: it counts as an error (not
    written, so a rerun retries it), with the first error for the summary."""
    from orchestrator.errors import StreamBroken

    def respond(req, i):
        if req.prompt.endswith("q1"):
            return FakeReply.text("so seven", fail_after=0, error=StreamBroken("server fell over"))
        return FakeReply.text("so seven")

    problems = [Problem(id=f"p{i}", problem=f"q{i}", answer="seven") for i in range(3)]
    out = tmp_path / "rec.jsonl"
    got = await record(problems, FakeBackend(respond), WordTask(), out, samples=2)
    assert (got.recorded, got.errors) == (2, 1)
    assert got.first_error is not None and got.first_error.startswith("p1: ")
    assert "server fell over" in got.first_error
    assert [p.id for p in load_pool(out).problems] == ["p0", "p2"]


# ---- record against a real local OpenAI-compatible server, through `solverify bench` --------


def test_bench_record_then_replay_from_the_command_line(server_url, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} plus {i}?",
                                            "answer": str(2 * i)}) + "\n" for i in range(3)))
    pool = tmp_path / "pool.jsonl"
    args = ("bench", "record", "--base-url", server_url, "--model", "test-model",
            "--problems", str(problems), "--out", str(pool), "--samples", "4",
            "--verifications", "2")
    r = run_solverify(*args)
    assert r.returncode == 0, r.stderr
    assert "recorded 3 problems" in r.stdout
    loaded = load_pool(pool)
    assert len(loaded) == 3
    for p in loaded.problems:
        assert len(p.samples) == 4
        for s in p.samples:
            assert s.tokens and s.tokens > 0 and s.correct is not None
            if s.key is not None:
                assert len(s.verifications) == 2
                assert all(v.p_yes is not None and v.tokens for v in s.verifications)
    refused = run_solverify(*args)  # a non-empty --out needs --resume or --overwrite
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    again = run_solverify(*args, "--resume")
    assert again.returncode == 0 and "recorded 0 problems (3 already" in again.stdout
    out = tmp_path / "r.json"
    r = run_solverify("bench", "replay", "--pool", str(pool), "--policy", "sc:n=all",
                  "--policy", "genrm:s=all,v=2", "--policy", "ac", "--orders", "2",
                  "--workers", "1", "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert [x["policy"] for x in json.loads(out.read_text())["runs"]] == [
        "sc:n=all", "genrm:s=all,v=2", "ac"]
    bad = run_solverify("bench", "replay", "--pool", str(pool), "--policy", "nope")
    assert bad.returncode == 2 and "unknown policy" in bad.stderr


def test_bench_record_against_an_unreachable_endpoint_is_one_line_and_touches_nothing(
        tmp_path):
    """Exit 2 with one ``solverify: error:`` line, before the pool file is changed (it
    used to exit 1 with no error message, found by review, and ``--overwrite`` emptied
    the pool first)."""
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "q", "problem": "1+1?", "answer": "2"}) + "\n")
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"id": "old", "problem": "x", "answer": "1", "samples": []}\n')
    r = run_solverify("bench", "record", "--base-url", "http://127.0.0.1:9/v1", "--model",
                      "m", "--problems", str(problems), "--out", str(pool), "--samples", "2",
                      "--overwrite", "--timeout", "2")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("solverify: error: cannot reach") == 1
    assert pool.read_text().startswith('{"id": "old"')


def test_plot_without_matplotlib_fails_before_any_work(tmp_path, monkeypatch):
    """--plot without the optional matplotlib: a ConfigError naming the extra, raised before
    the replay runs (nothing written), not after a long sweep."""
    from benchmarks import plots

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    pool = write_pool(tmp_path / "toy.jsonl")
    out = tmp_path / "r.json"
    with pytest.raises(ConfigError, match=r"solverify\[plot\]"):
        main(["replay", "--pool", str(pool), "--policy", "sc:n=3", "--orders", "2",
              "--json", str(out), "--plot", str(tmp_path / "r.png")])
    assert not out.exists()


def test_replay_on_the_contested_problems_only(tmp_path):
    from benchmarks.calibrate import pool_group

    pool = write_pool(tmp_path / "src_data_model.jsonl")  # majority shares 4/7 and 5/7
    out = tmp_path / "r.json"
    rc = main(["replay", "--pool", str(pool), "--contested", "0.6", "--policy", "sc:n=all",
               "--orders", "2", "--workers", "1", "--quiet", "--json", str(out)])
    assert rc == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["pool"] == "src_data_model+contested0.6" and run["problems"] == 2
    # the same dataset fold, and every pool of a model in one model fold still
    assert pool_group(run["pool"], "dataset") == "data"
    assert pool_group(run["pool"], "model") == "model+contested0.6"
    with pytest.raises(SystemExit):
        main(["replay", "--pool", str(pool), "--contested", "0", "--policy", "sc:n=all"])


def _labels_pool(path: Path, label) -> Path:
    """write_pool's pool with ``label(i, j, sample)`` as each sample's "correct"."""
    rows = [json.loads(x) for x in write_pool(path).read_text().splitlines()]
    for i, row in enumerate(rows):
        for j, sample in enumerate(row["samples"]):
            sample["correct"] = label(i, j, sample)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_answers_without_a_label_are_ungraded_in_every_engine(tmp_path):
    """The vectorised engine graded an answer without a label as wrong where the lean and
    direct engines and the runtime leave it ungraded, so one policy scored differently
    by engine (found by review)."""
    pool = _labels_pool(tmp_path / "partial.jsonl",
                        lambda i, j, s: None if s["pred"] == "b" and i % 2 else
                        s["pred"] == "a")
    got = {}
    for engine in ("auto", "lean"):
        out = tmp_path / f"{engine}.json"
        assert main(["replay", "--pool", str(pool), "--policy", "sc:n=all", "--policy",
                     "sc:n=2", "--orders", "4", "--engine", engine, "--workers", "1",
                     "--json", str(out), "--quiet"]) == 0
        got[engine] = [(r["policy"], r["accuracy"], r["engine"])
                       for r in json.loads(out.read_text())["runs"]]
    assert [x[:2] for x in got["auto"]] == [x[:2] for x in got["lean"]]
    assert {x[2] for x in got["auto"]} == {"vectorised"}


def test_a_pool_without_labels_or_two_pools_of_one_name_are_refused(tmp_path):
    """An unlabelled pool replayed as accuracy 0.000 for every policy, and two files of one
    name (reports and folds go by name) were merged silently (found by review)."""
    bare = _labels_pool(tmp_path / "bare.jsonl", lambda i, j, s: None)
    with pytest.raises(ConfigError, match="no answered sample has a 'correct' label"):
        main(["replay", "--pool", str(bare), "--policy", "sc:n=all", "--quiet"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = write_pool(tmp_path / "a" / "toy.jsonl"), write_pool(tmp_path / "b" / "toy.jsonl")
    with pytest.raises(ConfigError, match="two pools are named 'toy'"):
        main(["replay", "--pool", str(one), "--pool", str(two), "--policy", "sc:n=all",
              "--quiet"])
    with pytest.raises(ConfigError, match="two pools are named 'toy'"):  # folds too
        main(["calibrate", "--folds", "model", "--pool", str(one), "--pool", str(two),
              "--candidate", "sc:n=2", "--candidate", "sc:n=4"])


def test_bench_refuses_an_unwritable_output_before_the_sweep(tmp_path, capsys, monkeypatch):
    """A --json that was a folder failed after the whole sweep, and the table was lost with
    it (found by review); the paths are checked first, and the table is printed before
    the files are written."""
    import benchmarks.replay as replay

    pool = write_pool(tmp_path / "toy.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    called = []
    monkeypatch.setattr(replay, "sweep", lambda *a, **k: called.append(1) or {})
    with pytest.raises(ConfigError, match=r"--json .* is a folder"):
        main(["replay", "--pool", str(pool), "--policy", "sc:n=2", "--json", str(out)])
    assert not called
    monkeypatch.undo()

    def broken(path, obj):
        raise OSError("disk full")

    import benchmarks.cli as bench_cli

    monkeypatch.setattr(bench_cli, "_write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["replay", "--pool", str(pool), "--policy", "sc:n=2", "--orders", "2",
                    "--json", str(out / "r.json")])
    table = capsys.readouterr().out
    assert "sc:n=2" in table and "wall time" in table
