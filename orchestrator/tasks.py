"""A :class:`Task` bundles what the runtime needs for one kind of problem: how to ask for
solutions, how to ask for verifications, how to read verdicts and how to grade answers.

Two ready-made kinds: :meth:`Task.math` (step-by-step solutions with a ``\\boxed{}``
answer, chat by default) and :meth:`Task.short_answer` (few-shot ``Q:``/``A:`` prompts
through the completions endpoint, for one-line text answers such as capital cities).
:func:`task_for` picks one for a problem set.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from orchestrator import defaults
from orchestrator.backends.base import GenerationRequest
from orchestrator.errors import ConfigError
from orchestrator.grading import Grader, MathGrader, TextGrader
from orchestrator.types import Problem, Solution, TokenLogprob, is_count
from orchestrator.verification import (
    DEFAULT_VERIFIER_SYSTEM,
    VerdictSource,
    VerificationExample,
    parse_verdict,
    verification_messages,
    verification_prompt,
)

__all__ = [
    "DEFAULT_CAPITAL_EXAMPLES",
    "DEFAULT_CAPITAL_VERIFY_EXAMPLES",
    "MATH_INSTRUCTION",
    "MATH_VERIFY_INSTRUCTION",
    "Endpoint",
    "Example",
    "Task",
    "task_for",
]

Endpoint = Literal["chat", "completions"]

MAX_TOP_LOGPROBS = defaults.MAX_TOP_LOGPROBS
"""The most alternatives an OpenAI-compatible server returns per token (vLLM's default)."""

#: the placeholders of a ``verify_template``
_PLACEHOLDER = re.compile(r"\{(problem|solution)\}")

MATH_INSTRUCTION = (
    "Work through the problem one step at a time, showing your reasoning. When you are "
    "done, state the final answer once, written inside \\boxed{}."
)

MATH_VERIFY_INSTRUCTION = (
    "Each proposed solution below is checked and marked Yes if its final answer is right, "
    "No otherwise."
)


@dataclass(frozen=True, slots=True)
class Example:
    """A few-shot example: a question and the answer text that should follow it."""

    question: str
    answer: str


# Countries that are not among the questions of live/capitals.jsonl, so the shots leak
# no test answer.
DEFAULT_CAPITAL_EXAMPLES: tuple[Example, ...] = (
    Example("What is the capital of Liechtenstein?", "Vaduz"),
    Example("What is the capital of Mauritius?", "Port Louis"),
    Example("What is the capital of Eritrea?", "Asmara"),
)

DEFAULT_CAPITAL_VERIFY_EXAMPLES: tuple[VerificationExample, ...] = (
    VerificationExample("What is the capital of Wales?", "Cardiff", correct=True),
    VerificationExample("What is the capital of Scotland?", "Glasgow", correct=False),
    VerificationExample("What is the capital of the Gambia?", "Dakar", correct=False),
    VerificationExample("What is the capital of Lesotho?", "Maseru", correct=True),
)


def _check_positive_int(name: str, value: object) -> None:
    if not is_count(value):
        raise ConfigError(f"Task.{name} must be an integer >= 1, got {value!r}")


def _check_temperature(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"Task.{name} must be a finite number >= 0, got {value!r}")


def _check_top_logprobs(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ConfigError(
            f"Task.{name} must be None or an integer from 0 to {MAX_TOP_LOGPROBS}, got {value!r}"
        )


def _check_stops(name: str, value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(s, str) and s for s in value):
        raise ConfigError(f"Task.{name} must be a tuple of non-empty strings, got {value!r}")


@dataclass(frozen=True, slots=True)
class Task:
    """Everything the runtime needs for one kind of problem.

    Solving: ``endpoint`` picks chat messages (``instruction`` as the system message,
    ``examples`` as earlier turns) or a completions prompt (``instruction`` as a header,
    then ``examples`` and the problem as ``"<question_label>: ...\\n<answer_label>:"``).

    Verifying: chat uses :func:`~orchestrator.verification.verification_messages`
    (``verify_step_by_step`` lets the verifier reason before its verdict); completions use
    :func:`~orchestrator.verification.verification_prompt` with ``verify_examples``. The
    verifier is shown the solution's full text (``verify_shows="text"``) or only its
    extracted answer (``"answer"``). ``verify_temperature=None`` means ``temperature``.
    ``verify_template`` replaces the built-in verification prompt: its ``{problem}`` and
    ``{solution}`` are replaced by the problem and what the verifier is shown (the
    completions prompt, or the chat user message after ``verify_system``); end it with
    the question the verdict answers (e.g. ``Is the answer correct (Yes/No)?``).
    ``verify_max_tokens`` is what every verification request reserves of a token budget.
    """

    grader: Grader
    endpoint: Endpoint
    max_tokens: int
    temperature: float
    verify_max_tokens: int
    stop: tuple[str, ...] = ()
    verify_top_logprobs: int | None = MAX_TOP_LOGPROBS
    examples: tuple[Example, ...] = ()
    verify_examples: tuple[VerificationExample, ...] = ()
    instruction: str | None = None
    question_label: str = "Problem"
    answer_label: str = "Solution"
    top_p: float | None = None
    solve_top_logprobs: int | None = None
    verify_temperature: float | None = None
    verify_stop: tuple[str, ...] = ()
    verify_step_by_step: bool = False
    verify_shows: Literal["text", "answer"] = "text"
    verify_system: str | None = DEFAULT_VERIFIER_SYSTEM
    verify_instruction: str | None = None
    verify_solution_label: str = "Proposed solution"
    verify_template: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.grader, Grader):
            raise ConfigError(
                "Task.grader must have extract(), key() and is_correct() methods, "
                f"got {type(self.grader).__name__}"
            )
        if self.endpoint not in ("chat", "completions"):
            raise ConfigError(
                f"Task.endpoint must be 'chat' or 'completions', got {self.endpoint!r}"
            )
        _check_positive_int("max_tokens", self.max_tokens)
        _check_positive_int("verify_max_tokens", self.verify_max_tokens)
        _check_temperature("temperature", self.temperature)
        if self.verify_temperature is not None:
            _check_temperature("verify_temperature", self.verify_temperature)
        if self.top_p is not None and not (
            isinstance(self.top_p, int | float) and 0 < self.top_p <= 1
        ):
            raise ConfigError(f"Task.top_p must be None or in (0, 1], got {self.top_p!r}")
        _check_top_logprobs("verify_top_logprobs", self.verify_top_logprobs)
        _check_top_logprobs("solve_top_logprobs", self.solve_top_logprobs)
        _check_stops("stop", self.stop)
        _check_stops("verify_stop", self.verify_stop)
        if not all(isinstance(e, Example) for e in self.examples):
            raise ConfigError("Task.examples must be a tuple of Example")
        if not all(isinstance(e, VerificationExample) for e in self.verify_examples):
            raise ConfigError("Task.verify_examples must be a tuple of VerificationExample")
        if self.verify_shows not in ("text", "answer"):
            raise ConfigError(
                f"Task.verify_shows must be 'text' or 'answer', got {self.verify_shows!r}"
            )
        if self.endpoint == "completions" and self.verify_step_by_step:
            raise ConfigError(
                "Task.verify_step_by_step=True needs endpoint='chat': a completions "
                "verification prompt ends with the question, so the verdict comes first"
            )
        if self.verify_template is not None and (
                not isinstance(self.verify_template, str)
                or "{problem}" not in self.verify_template
                or "{solution}" not in self.verify_template):
            raise ConfigError("Task.verify_template must be a string containing {problem} and "
                              f"{{solution}}, got {self.verify_template!r:.80}")
        if self.endpoint == "chat" and self.verify_examples:
            raise ConfigError(
                "Task.verify_examples are used only by the completions endpoint; "
                "leave them empty for endpoint='chat'"
            )

    # ---- constructors ----------------------------------------------------------------

    @classmethod
    def math(
        cls,
        *,
        endpoint: Endpoint = "chat",
        max_tokens: int = 2048,
        temperature: float = 0.7,
        top_p: float | None = None,
        verify_max_tokens: int | None = None,
        verify_top_logprobs: int | None = MAX_TOP_LOGPROBS,
        verify_step_by_step: bool | None = None,
        verify_temperature: float | None = None,
        instruction: str = MATH_INSTRUCTION,
        examples: Sequence[Example] = (),
        multiple_choice: bool = False,
        stop: Sequence[str] | None = None,
    ) -> Task:
        """A math task graded by :class:`~orchestrator.grading.MathGrader`.

        Chat (default): ``instruction`` is the system message; the verifier reviews step
        by step and ends on its verdict (``verify_max_tokens`` defaults to 1024).
        Completions: ``instruction`` heads a ``Problem: ...\\nSolution:`` prompt that
        stops before a next ``Problem:``; the verifier answers right after the question
        (``verify_max_tokens`` defaults to 4, stop at a newline).
        """
        chat = endpoint == "chat"
        step_by_step = chat if verify_step_by_step is None else verify_step_by_step
        if verify_max_tokens is None:
            verify_max_tokens = 1024 if step_by_step else 4
        if stop is None:
            stop = () if chat else ("\nProblem:",)
        return cls(
            grader=MathGrader(multiple_choice=multiple_choice),
            endpoint=endpoint,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=tuple(stop),
            verify_max_tokens=verify_max_tokens,
            verify_top_logprobs=verify_top_logprobs,
            verify_temperature=verify_temperature,
            verify_step_by_step=step_by_step,
            verify_stop=() if step_by_step else ("\n",),
            instruction=instruction,
            examples=tuple(examples),
            question_label="Problem",
            answer_label="Solution",
            verify_shows="text",
            verify_instruction=None if chat else MATH_VERIFY_INSTRUCTION,
            verify_solution_label="Proposed solution",
        )

    @classmethod
    def short_answer(
        cls,
        *,
        examples: Sequence[Example] = DEFAULT_CAPITAL_EXAMPLES,
        verify_examples: Sequence[VerificationExample] = DEFAULT_CAPITAL_VERIFY_EXAMPLES,
        max_tokens: int = 12,
        temperature: float = 1.0,
        verify_max_tokens: int = 2,
        verify_top_logprobs: int | None = MAX_TOP_LOGPROBS,
        verify_temperature: float | None = None,
    ) -> Task:
        """A one-line text-answer task through the completions endpoint, graded by
        :class:`~orchestrator.grading.TextGrader`.

        Solving prompt: the ``examples`` as ``Q: <question>\\nA: <answer>`` blocks, then
        ``Q: <question>\\nA:``, stopping at a newline. Verifying prompt: the
        ``verify_examples`` as ``Q: ...\\nProposed answer: ...\\nIs the answer correct
        (Yes/No)? Yes`` blocks, then the candidate, ending with the question.
        """
        return cls(
            grader=TextGrader(),
            endpoint="completions",
            max_tokens=max_tokens,
            temperature=temperature,
            stop=("\n",),
            verify_max_tokens=verify_max_tokens,
            verify_top_logprobs=verify_top_logprobs,
            verify_temperature=verify_temperature,
            # no stop string: the verdict is read from the first token's logprobs, and a
            # sampled leading "\n" that matched a stop came back with no logprobs at all
            # (1 in 320 live verifications); verify_max_tokens bounds the reply anyway
            verify_stop=(),
            examples=tuple(examples),
            verify_examples=tuple(verify_examples),
            question_label="Q",
            answer_label="A",
            verify_shows="answer",
            verify_solution_label="Proposed answer",
        )

    # ---- requests ----------------------------------------------------------------------

    def solve_prompt(self, problem: Problem) -> str:
        """The completions prompt for solving ``problem``."""
        parts = [self.instruction.strip()] if self.instruction else []
        q_label, a_label = self.question_label, self.answer_label
        parts.extend(
            f"{q_label}: {ex.question.strip()}\n{a_label}: {ex.answer.strip()}"
            for ex in self.examples
        )
        parts.append(f"{self.question_label}: {problem.problem.strip()}\n{self.answer_label}:")
        return "\n\n".join(parts)

    def solve_messages(self, problem: Problem) -> tuple[dict[str, str], ...]:
        """The chat messages for solving ``problem``."""
        messages: list[dict[str, str]] = []
        if self.instruction:
            messages.append({"role": "system", "content": self.instruction})
        for ex in self.examples:
            messages.append({"role": "user", "content": ex.question})
            messages.append({"role": "assistant", "content": ex.answer})
        messages.append({"role": "user", "content": problem.problem})
        return tuple(messages)

    def solve_request(self, problem: Problem, n: int) -> GenerationRequest:
        """A request for ``n`` solutions of ``problem``."""
        prompt, messages = None, None
        if self.endpoint == "chat":
            messages = self.solve_messages(problem)
        else:
            prompt = self.solve_prompt(problem)
        return GenerationRequest(
            kind="solve",
            max_tokens=self.max_tokens,
            prompt=prompt,
            messages=messages,
            n=n,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop,
            top_logprobs=self.solve_top_logprobs,
        )

    def shown_solution(self, solution: Solution) -> str:
        """What the verifier is shown of ``solution``: its text, or its answer."""
        if self.verify_shows == "answer" and solution.answer is not None:
            return solution.answer
        return solution.text.strip()

    def verify_request(self, problem: Problem, solution: Solution, n: int) -> GenerationRequest:
        """A request for ``n`` verifications of ``solution``, with logprobs of the top
        ``verify_top_logprobs`` alternatives (``None``: text verdicts only)."""
        shown = self.shown_solution(solution)
        prompt, messages = None, None
        if self.verify_template is not None:
            fill = {"problem": problem.problem.strip(), "solution": shown}
            # one pass: a problem or solution that itself contains "{solution}" (LaTeX's
            # \text{solution}) is left as it is
            text = _PLACEHOLDER.sub(lambda m: fill[m.group(1)], self.verify_template)
            if self.endpoint == "chat":
                system = ({"role": "system", "content": self.verify_system},
                          ) if self.verify_system else ()
                messages = (*system, {"role": "user", "content": text})
            else:
                prompt = text
        elif self.endpoint == "chat":
            messages = verification_messages(
                problem.problem,
                shown,
                step_by_step=self.verify_step_by_step,
                system=self.verify_system,
            )
        else:
            prompt = verification_prompt(
                problem.problem,
                shown,
                examples=self.verify_examples,
                instruction=self.verify_instruction,
                problem_label=self.question_label,
                solution_label=self.verify_solution_label,
            )
        return GenerationRequest(
            kind="verify",
            max_tokens=self.verify_max_tokens,
            prompt=prompt,
            messages=messages,
            n=n,
            temperature=(
                self.temperature if self.verify_temperature is None else self.verify_temperature
            ),
            top_p=self.top_p,
            stop=self.verify_stop,
            top_logprobs=self.verify_top_logprobs,
        )

    def parse_verdict(
        self, text: str, logprobs: Sequence[TokenLogprob]
    ) -> tuple[bool | None, float | None, VerdictSource]:
        """The verdict of a verification reply (see
        :func:`~orchestrator.verification.parse_verdict`): the last Yes/No when the
        verifier reasons first, else the first token after the question."""
        verdict_at = "last" if self.verify_step_by_step else "first"
        return parse_verdict(text, logprobs, verdict_at=verdict_at)


def task_for(problems: Sequence[Problem]) -> Task:
    """:meth:`Task.short_answer` when any problem carries ``aliases`` (the same rule as
    :func:`~orchestrator.grading.grader_for`), else :meth:`Task.math`."""
    if any(problem.aliases for problem in problems):
        return Task.short_answer()
    return Task.math()
