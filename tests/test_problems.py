"""Problem files: good ones load, bad ones say exactly what is wrong."""

import json

import pytest

from orchestrator.errors import DataError
from orchestrator.problems import load_problems
from tests.conftest_data import DATA, needs_data


def write(tmp_path, lines):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_loads_fields_and_keeps_extras(tmp_path):
    p = write(tmp_path, [
        json.dumps({"id": "a", "problem": "1+1?", "answer": "2", "level": 3}),
        "",
        json.dumps({"id": 7, "problem": "cap?", "answer": 27.0, "aliases": ["x", "y"]}),
    ])
    probs = load_problems(p)
    assert [q.id for q in probs] == ["a", "7"]
    assert probs[0].meta == {"level": 3}
    assert probs[1].answer == "27.0" and probs[1].aliases == ("x", "y")


def test_limit(tmp_path):
    p = write(tmp_path, [json.dumps({"id": str(i), "problem": "q"}) for i in range(5)])
    assert len(load_problems(p, limit=2)) == 2


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["{not json"], r"p.jsonl:1: invalid JSON"),
        ([json.dumps({"problem": "q"})], r"p.jsonl:1: missing field\(s\) id"),
        ([json.dumps({"id": "a", "problem": "  "})], "'problem' must be a non-empty string"),
        ([json.dumps(["a"])], "expected a JSON object"),
        ([json.dumps({"id": "a", "problem": "q"}), json.dumps({"id": "a", "problem": "r"})],
         r"p.jsonl:2: duplicate id 'a' \(first on line 1\)"),
        ([json.dumps({"id": "a", "problem": "q", "answer": True})], "boolean"),
        ([json.dumps({"id": "a", "problem": "q", "aliases": "x"})], "list of strings"),
        (["", "  "], "no problems in file"),
    ],
)
def test_malformed_files_raise_clear_errors(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        load_problems(write(tmp_path, lines))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="problem file not found"):
        load_problems(tmp_path / "nope.jsonl")


@needs_data
def test_shared_problem_sets_load():
    sizes = {f: len(load_problems(DATA / f)) for f in
             ("math500.jsonl", "aime24.jsonl", "aime25.jsonl", "amc23.jsonl",
              "gsm8k_test.jsonl", "live/capitals.jsonl")}
    assert sizes == {"math500.jsonl": 500, "aime24.jsonl": 30, "aime25.jsonl": 30,
                     "amc23.jsonl": 40, "gsm8k_test.jsonl": 1319, "live/capitals.jsonl": 146}
