"""Tests of orchestrator.tasks: request building, validation, task choice."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.grading import MathGrader, TextGrader
from orchestrator.tasks import (
    DEFAULT_CAPITAL_EXAMPLES,
    DEFAULT_CAPITAL_VERIFY_EXAMPLES,
    Example,
    Task,
    task_for,
)
from orchestrator.types import Problem, Solution, TokenLogprob
from orchestrator.verification import VERDICT_QUESTION, VerificationExample

MATH_PROBLEM = Problem(id="m1", problem="What is $1+1$?", answer="2")
CAPITAL = Problem(
    id="c1", problem="What is the capital of Japan?", answer="Tokyo", aliases=("Tokyo",)
)


def _solution(text: str, answer: str | None) -> Solution:
    return Solution(
        id=0,
        index=0,
        text=text,
        answer=answer,
        key=answer,
        finish_reason="stop",
        completion_tokens=5,
        started_at=0.0,
        finished_at=1.0,
        request_id=0,
    )


# ---- Task.math -----------------------------------------------------------------------------


def test_math_chat_solve_request() -> None:
    task = Task.math()
    request = task.solve_request(MATH_PROBLEM, n=4)
    assert request.kind == "solve" and request.endpoint == "chat"
    assert request.n == 4 and request.max_tokens == task.max_tokens
    assert request.temperature == task.temperature and request.top_logprobs is None
    assert request.messages is not None
    system, user = request.messages
    assert system["role"] == "system" and "\\boxed{}" in system["content"]
    assert user == {"role": "user", "content": "What is $1+1$?"}
    assert isinstance(task.grader, MathGrader)


def test_math_chat_verify_request_shows_the_solution_and_asks_for_logprobs() -> None:
    task = Task.math()
    solution = _solution("1+1 is 2, so \\boxed{2}.", "2")
    request = task.verify_request(MATH_PROBLEM, solution, n=3)
    assert request.kind == "verify" and request.endpoint == "chat" and request.n == 3
    assert request.top_logprobs == 20
    assert request.max_tokens == task.verify_max_tokens == 1024
    assert request.messages is not None
    user = request.messages[-1]["content"]
    assert user.endswith(VERDICT_QUESTION)
    assert "1+1 is 2, so \\boxed{2}." in user and "What is $1+1$?" in user


def test_math_chat_reads_the_last_verdict() -> None:
    task = Task.math()
    logprobs = [TokenLogprob("Yes", math.log(0.5)), TokenLogprob(" No", math.log(0.8))]
    assert task.parse_verdict("Yes... No", logprobs) == (False, pytest.approx(0.2), "logprobs")


def test_math_completions_variant() -> None:
    task = Task.math(
        endpoint="completions", examples=[Example("What is 2+3?", "2+3=5. \\boxed{5}")]
    )
    request = task.solve_request(MATH_PROBLEM, n=2)
    assert request.endpoint == "completions" and request.prompt is not None
    assert request.prompt.endswith("Problem: What is $1+1$?\nSolution:")
    assert "Problem: What is 2+3?\nSolution: 2+3=5. \\boxed{5}\n\n" in request.prompt
    assert request.stop == ("\nProblem:",)
    verify = task.verify_request(MATH_PROBLEM, _solution("So \\boxed{2}", "2"), n=1)
    assert verify.prompt is not None
    assert verify.prompt.endswith(f"Proposed solution: So \\boxed{{2}}\n{VERDICT_QUESTION}")
    assert verify.max_tokens == 4 and verify.stop == ("\n",)
    # completions verdict is the first token after the question
    logprobs = [
        TokenLogprob(" Yes", math.log(0.6), ((" Yes", math.log(0.6)), (" No", math.log(0.2))))
    ]
    logprobs.append(TokenLogprob(" No", 0.0))
    assert task.parse_verdict(" Yes No", logprobs) == (True, pytest.approx(0.75), "logprobs")


# ---- Task.short_answer ---------------------------------------------------------------------


def test_short_answer_prompt() -> None:
    task = Task.short_answer()
    request = task.solve_request(CAPITAL, n=8)
    assert request.kind == "solve" and request.endpoint == "completions"
    assert request.max_tokens == 12 and request.stop == ("\n",) and request.n == 8
    shots = "".join(f"Q: {e.question}\nA: {e.answer}\n\n" for e in DEFAULT_CAPITAL_EXAMPLES)
    assert request.prompt == f"{shots}Q: What is the capital of Japan?\nA:"
    assert len(DEFAULT_CAPITAL_EXAMPLES) == 3
    assert isinstance(task.grader, TextGrader)


def test_short_answer_verify_prompt_shows_the_answer() -> None:
    task = Task.short_answer()
    request = task.verify_request(CAPITAL, _solution(" Tokyo, Japan", "Tokyo"), n=1)
    assert request.kind == "verify" and request.top_logprobs == 20
    assert request.prompt is not None
    assert request.prompt.endswith(
        f"Q: What is the capital of Japan?\nProposed answer: Tokyo\n{VERDICT_QUESTION}"
    )
    assert request.prompt.count(VERDICT_QUESTION) == len(DEFAULT_CAPITAL_VERIFY_EXAMPLES) + 1
    assert request.prompt.count(f"{VERDICT_QUESTION} Yes") == 2
    assert request.prompt.count(f"{VERDICT_QUESTION} No") == 2
    first = [TokenLogprob(" No", math.log(0.6), ((" No", math.log(0.6)), (" Yes", math.log(0.4))))]
    assert task.parse_verdict(" No", first) == (False, pytest.approx(0.4), "logprobs")


def test_default_shots_are_not_test_questions() -> None:
    env = os.environ.get("SOLVERIFY_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    path = base / "live" / "capitals.jsonl"
    if not path.is_file():
        pytest.skip("live/capitals.jsonl not found: set SOLVERIFY_DATA or provide ../shared/data")
    with path.open(encoding="utf-8") as handle:
        questions = {json.loads(line)["problem"] for line in handle if line.strip()}
    shots = {e.question for e in DEFAULT_CAPITAL_EXAMPLES}
    shots |= {e.problem for e in DEFAULT_CAPITAL_VERIFY_EXAMPLES}
    assert not shots & questions


# ---- task_for ------------------------------------------------------------------------------


def test_task_for() -> None:
    assert task_for([CAPITAL]).endpoint == "completions"
    assert isinstance(task_for([CAPITAL]).grader, TextGrader)
    assert task_for([MATH_PROBLEM]).endpoint == "chat"
    assert isinstance(task_for([MATH_PROBLEM]).grader, MathGrader)


def test_task_is_frozen() -> None:
    task = Task.math()
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.max_tokens = 5  # type: ignore[misc]


# ---- validation ----------------------------------------------------------------------------


def _base(**overrides: object) -> Task:
    fields: dict[str, object] = {
        "grader": MathGrader(),
        "endpoint": "chat",
        "max_tokens": 100,
        "temperature": 0.7,
        "verify_max_tokens": 10,
    }
    fields.update(overrides)
    return Task(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_tokens": 0}, "Task.max_tokens must be an integer >= 1, got 0"),
        ({"max_tokens": 2.5}, "Task.max_tokens must be an integer >= 1, got 2.5"),
        ({"verify_max_tokens": -1}, "Task.verify_max_tokens must be an integer >= 1, got -1"),
        ({"temperature": -0.1}, "Task.temperature must be a finite number >= 0, got -0.1"),
        ({"temperature": math.nan}, "Task.temperature must be a finite number >= 0, got nan"),
        ({"verify_temperature": math.inf}, "Task.verify_temperature must be a finite number"),
        ({"top_p": 0}, "Task.top_p must be None or in (0, 1], got 0"),
        ({"verify_top_logprobs": 21}, "Task.verify_top_logprobs must be None or an integer from 0"),
        ({"solve_top_logprobs": -1}, "Task.solve_top_logprobs must be None or an integer from 0"),
        ({"stop": ["\n"]}, "Task.stop must be a tuple of non-empty strings, got ['\\n']"),
        ({"verify_stop": ("",)}, "Task.verify_stop must be a tuple of non-empty strings"),
        ({"endpoint": "responses"}, "Task.endpoint must be 'chat' or 'completions'"),
        ({"grader": object()}, "Task.grader must have extract(), key() and is_correct()"),
        ({"verify_shows": "both"}, "Task.verify_shows must be 'text' or 'answer'"),
        ({"examples": ("Q",)}, "Task.examples must be a tuple of Example"),
        (
            {"endpoint": "completions", "verify_step_by_step": True},
            "Task.verify_step_by_step=True needs endpoint='chat'",
        ),
        (
            {"verify_examples": (VerificationExample("q", "a", True),)},
            "Task.verify_examples are used only by the completions endpoint",
        ),
    ],
)
def test_validation_messages(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _base(**overrides)
    assert str(info.value).startswith(message)


def test_constructors_validate_too() -> None:
    with pytest.raises(ConfigError, match="max_tokens"):
        Task.short_answer(max_tokens=0)
    with pytest.raises(ConfigError, match="verify_step_by_step"):
        Task.math(endpoint="completions", verify_step_by_step=True)


def test_verify_temperature_defaults_to_temperature() -> None:
    task = Task.short_answer(temperature=0.3)
    assert task.verify_request(CAPITAL, _solution("Tokyo", "Tokyo"), 1).temperature == 0.3
    task = Task.short_answer(temperature=0.3, verify_temperature=1.0)
    assert task.verify_request(CAPITAL, _solution("Tokyo", "Tokyo"), 1).temperature == 1.0
