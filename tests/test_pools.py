"""The pool format: reading, validation, the dense view, writing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.pools import (
    PoolArrays,
    estimate_tokens,
    load_pool,
    pool_key,
    pool_line,
    read_pool_ids,
)
from orchestrator.errors import DataError
from orchestrator.types import Problem
from tests.conftest_data import DATA, needs_data


def write_pool(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def row(pid: str, preds: list, correct: list | None = None, tokens: list | None = None,
        **extra) -> dict:
    samples = []
    for j, p in enumerate(preds):
        s: dict = {"pred": p}
        if correct is not None:
            s["correct"] = correct[j]
        if tokens is not None:
            s["tokens"] = tokens[j]
        samples.append(s)
    return {"id": pid, "problem": f"question {pid}", "answer": "4", "samples": samples, **extra}


def test_pool_key_strips_whitespace_and_drops_empty():
    assert pool_key(" 42 ") == "42"
    assert pool_key("") is None and pool_key("   ") is None and pool_key(None) is None


def test_load_pool_and_arrays(tmp_path):
    path = write_pool(tmp_path / "toy.jsonl", [
        row("a", ["5", " 4", "4", None, ""], [False, True, True, False, False],
            [10, 20, 30, 40, 50], model="m"),
        row("b", ["x", "y"], [True, False], [1, 2]),
    ])
    pool = load_pool(path)
    assert pool.name == "toy" and len(pool) == 2
    assert pool.problems[0].problem.meta["model"] == "m"
    assert pool.problems[0].labels == {"5": False, "4": True}
    a = pool.arrays
    assert a.shape == (2, 5)
    # key ids by first occurrence in pool order; -1 = no answer; -2 = padding
    assert a.key[0].tolist() == [0, 1, 1, -1, -1]
    assert a.key[1].tolist() == [0, 1, -2, -2, -2]
    assert a.key_correct[0, :2].tolist() == [False, True]
    assert a.tokens[0].tolist() == [10, 20, 30, 40, 50]
    assert a.n.tolist() == [5, 2] and a.labelled and not a.tokens_estimated


def test_explicit_key_groups_equivalent_answers(tmp_path):
    r = {"id": "a", "problem": "q", "answer": "0.5", "samples": [
        {"pred": "0.5", "key": "1/2", "correct": True, "tokens": 3},
        {"pred": "\\frac{1}{2}", "key": "1/2", "correct": True, "tokens": 3}]}
    pool = load_pool(write_pool(tmp_path / "k.jsonl", [r]))
    assert PoolArrays.from_pool(pool).key[0].tolist() == [0, 0]


def test_tokens_estimated_from_text_when_missing(tmp_path):
    r = {"id": "a", "problem": "q", "answer": "1",
         "samples": [{"pred": "1", "correct": True, "text": "x" * 41}]}
    a = load_pool(write_pool(tmp_path / "t.jsonl", [r])).arrays
    assert a.tokens[0, 0] == estimate_tokens("x" * 41) == 11 and a.tokens_estimated


def test_missing_tokens_and_text_is_a_data_error(tmp_path):
    r = {"id": "a", "problem": "q", "answer": "1", "samples": [{"pred": "1"}]}
    pool = load_pool(write_pool(tmp_path / "t.jsonl", [r]))
    with pytest.raises(DataError, match="no 'tokens' and no 'text'"):
        _ = pool.arrays


@pytest.mark.parametrize(("sample", "message"), [
    ({"correct": True}, "no 'pred'"),
    ({"pred": "1", "tokens": -3}, "'tokens' must be a non-negative integer"),
    ({"pred": "1", "p_yes": 1.5}, r"'p_yes' must lie in \[0, 1\]"),
    ({"pred": "1", "correct": "yes"}, "'correct' must be true, false or null"),
    ({"pred": "1", "verifications": [{"p_yes": "high"}]}, "'p_yes' must be a finite number"),
])
def test_bad_samples_name_file_line_and_field(tmp_path, sample, message):
    r = {"id": "a", "problem": "q", "answer": "1", "samples": [sample]}
    path = write_pool(tmp_path / "bad.jsonl", [r])
    with pytest.raises(DataError, match=message) as info:
        load_pool(path)
    assert "bad.jsonl:1" in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_pool(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no problems"):
        load_pool(tmp_path / "empty.jsonl")
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="invalid JSON"):
        load_pool(tmp_path / "junk.jsonl")
    dup = write_pool(tmp_path / "dup.jsonl", [row("a", ["1"], tokens=[1]),
                                               row("a", ["1"], tokens=[1])])
    with pytest.raises(DataError, match="duplicate id"):
        load_pool(dup)
    nosamples = write_pool(tmp_path / "ns.jsonl", [{"id": "a", "problem": "q", "samples": []}])
    with pytest.raises(DataError, match="'samples' must be a non-empty list"):
        load_pool(nosamples)


def test_pool_line_round_trip_and_resume_ids(tmp_path):
    prob = Problem(id="cap-1", problem="Capital of France?", answer="Paris",
                   aliases=("Paris",))
    line = pool_line(prob, [{"pred": "Paris", "correct": True, "tokens": 2,
                             "verifications": [{"p_yes": 0.8, "tokens": 1}]}], model="m")
    path = tmp_path / "rec.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    pool = load_pool(path)
    s = pool.problems[0].samples[0]
    assert s.verifications[0].p_yes == 0.8 and pool.problems[0].problem.aliases == ("Paris",)
    assert read_pool_ids(path) == {"cap-1"} and read_pool_ids(tmp_path / "none") == set()


@needs_data
def test_every_shipped_pool_loads():
    files = sorted((DATA / "pools").glob("*.jsonl"))
    assert len(files) >= 20
    for f in files:
        pool = load_pool(f)
        a = pool.arrays
        assert a.labelled
        # the shipped pools never disagree on a key's label
        for pp in pool.problems:
            seen: dict = {}
            for smp in pp.samples:
                if smp.key is not None:
                    assert seen.setdefault(smp.key, smp.correct) == smp.correct
        assert np.all(a.n == [len(p.samples) for p in pool.problems])
    capitals = load_pool(DATA / "pools" / "live_capitals_gemma3-270m.jsonl")
    assert capitals.has_verifications
    assert not load_pool(DATA / "pools" / "boinf_aime2024_Qwen3-4B.jsonl").has_verifications


def test_contested_keeps_the_problems_below_a_majority_share(tmp_path):
    path = write_pool(tmp_path / "boinf_aime_m.jsonl", [
        row("unanimous", ["4", "4", "4", "4"]),
        row("three-of-four", ["4", "4", "4", "5"]),
        row("split", ["4", "5", "4", "5"]),
        row("unanswered", ["4", None, None, None]),  # no answer counts in the total
    ])
    pool = load_pool(path)
    hard = pool.contested(0.75)
    assert [p.id for p in hard.problems] == ["split", "unanswered"]
    assert hard.name == "boinf_aime_m+contested0.75"
    assert [p.id for p in pool.contested(1.0).problems] == ["three-of-four", "split",
                                                             "unanswered"]
    with pytest.raises(DataError, match=r"no problem has a majority share below 0\.25"):
        pool.contested(0.25)
    with pytest.raises(DataError, match=r"in \(0, 1\]"):
        pool.contested(0.0)
