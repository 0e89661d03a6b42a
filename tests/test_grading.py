"""Tests of orchestrator.grading: extraction, canonical keys, correctness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchestrator.grading import Grader, MathGrader, TextGrader, grader_for, last_boxed, math_key
from orchestrator.types import Problem


def _data_dir() -> Path | None:
    """The shared data folder: $SOLVERIFY_DATA, else ../shared/data next to the repo."""
    env = os.environ.get("SOLVERIFY_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return next((path for path in candidates if path.is_dir()), None)


def _read_jsonl(name: str) -> list[dict]:
    data = _data_dir()
    if data is None or not (data / name).is_file():
        pytest.skip(f"{name} not found: set SOLVERIFY_DATA or provide ../shared/data")
    with (data / name).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


MATH = MathGrader()
TEXT = TextGrader()


def _problem(answer: str | None, aliases: tuple[str, ...] = ()) -> Problem:
    return Problem(id="p", problem="?", answer=answer, aliases=aliases)


# ---- MathGrader.key: equivalences ---------------------------------------------------------


@pytest.mark.parametrize(
    "group",
    [
        ["0.5", r"\frac{1}{2}", r"\dfrac12", "1/2", r"\tfrac{1}{2}", "$\\frac12$", ".5"],
        ["025", "25", "25.0", "+25"],
        ["27.0", "27"],
        ["2,125", "2125", "2125.00"],
        [r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", r"(3, \pi/2)"],
        [r"90^\circ", "90", r"90^{\circ}"],
        [r"\text{Evelyn}", "Evelyn", "evelyn", r"\textbf{Evelyn}"],
        [r"11,\! 111,\! 111,\! 100", "11111111100", "11,111,111,100"],
        ["x=5", "5", "x = 5"],
        [r"\text{(C)}", "(C)", "C"],
        ["6 - 5i", "6-5i", "-5i+6"],
        [r"-\frac{\pi}{6}", r"\frac{-\pi}{6}"],
        [r"\frac{\sqrt{3}}{3}", r"\sqrt{3}/3", r"\frac{1}{\sqrt{3}}"],
        [r"\{1, 2\}", "1,2", "2, 1"],
        [r"10\%", "10"],
        [r"\$18.90", "18.9"],
        ["5.", "5"],
        [r"\begin{pmatrix} 1 \\ -2 \\ 3 \end{pmatrix}", "(1,-2,3)", r"\left(1, -2, 3\right)"],
    ],
)
def test_equivalent_answers_share_one_key(group: list[str]) -> None:
    keys = {answer: math_key(answer) for answer in group}
    assert None not in keys.values()
    assert len(set(keys.values())) == 1, keys


def test_half_as_fraction_and_decimal_is_one_vote() -> None:
    assert MATH.key(r"\frac{1}{2}") == MATH.key("0.5") == "1/2"


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("1/2", "1/3"),
        ("0.3333", r"\frac{1}{3}"),
        ("25", "26"),
        ("(1,2)", r"\{1,2\}"),
        ("C", "D"),
        (r"\text{Evelyn}", r"\text{Emily}"),
        ("y=2x+3", "2x+3"),  # an equation with variables on the right keeps its left side
        ("x^2+2x+1", "(x+1)^2"),  # keys do not expand/simplify
        ("-2", "2"),
    ],
)
def test_different_answers_get_different_keys(left: str, right: str) -> None:
    assert math_key(left) != math_key(right)


@pytest.mark.parametrize("answer", ["", "   ", "$", "$$", r"\text{ }", r"\,", "."])
def test_empty_answers_have_no_key(answer: str) -> None:
    assert math_key(answer) is None


def test_key_is_deterministic_and_cached() -> None:
    math_key.cache_clear()
    first = math_key(r"\frac{3\sqrt{3}}{4}")
    assert math_key(r"\frac{3\sqrt{3}}{4}") == first
    assert math_key.cache_info().hits >= 1


def test_key_works_outside_the_main_thread() -> None:
    """math_verify's signal alarm only works in the main thread; keys must not depend on it."""
    answers = [r"\frac{7}{13}", r"(4, \frac{\pi}{3})", r"\sqrt{17}+2"]
    expected = [math_key(a) for a in answers]
    math_key.cache_clear()
    results: list[str | None] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.extend(math_key(a) for a in answers)
            results.append(str(MATH.is_correct(r"\sqrt{17} + 2", _problem("2+\\sqrt{17}"))))
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors
    assert results == [*expected, "True"]


async def test_key_works_inside_an_asyncio_task() -> None:
    math_key.cache_clear()
    assert MATH.key(r"\dfrac{9}{12}") == "3/4"


# ---- MathGrader.extract --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"So we get \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"First \boxed{3}, then corrected: \boxed{4}", "4"),
        (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        (r"The answer is \fbox{12}.", "12"),
        (r"$\boxed 7$", "7"),
        (r"\boxed{5} and then a cut-off \boxed{\frac{1", "5"),
        ("Final Answer: The final answer is $42$. I hope it is correct.", "42"),
        ("final answer: 3.5.", "3.5"),
        (r"The final answer is $\frac{2}{3}$", r"\frac{2}{3}"),
        ("Thus the final answer is 17\nThat is all", "17"),
        (r"The final answer is 3, but \boxed{4}", "4"),
        ("I think it is 12.", None),
        ("", None),
        (r"\boxed{}", None),
    ],
)
def test_math_extract(text: str, expected: str | None) -> None:
    assert MATH.extract(text) == expected


def test_last_boxed_keeps_nested_braces() -> None:
    assert last_boxed(r"x \boxed{\frac{a^{2}}{b_{1}}} y") == r"\frac{a^{2}}{b_{1}}"


def test_multiple_choice_letter() -> None:
    options = "(A) 1 (B) 2 (C) 3 (D) 4"
    assert MATH.extract(f"{options}\nSo the answer is (C).") == "C"
    assert MATH.extract(f"{options}\nAnswer: B") == "B"
    assert MATH.extract("So the answer is C.") is None  # no options listed, flag off
    assert MathGrader(multiple_choice=True).extract("So the answer is C.") == "C"
    assert MathGrader(multiple_choice=True).extract("the answer is Also unknown") is None
    assert MATH.extract(f"{options}\n\\boxed{{D}} answer is (C)") == "D"


# ---- MathGrader.is_correct -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "gold", "expected"),
    [
        ("0.5", r"\frac{1}{2}", True),
        ("25", "025", True),
        ("2125", "2,125", True),
        ("(3,\\frac{\\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", True),
        ("Evelyn", r"\text{Evelyn}", True),
        ("90", r"90^\circ", True),
        ("5", "x=5", True),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
        ("100", r"100\text{ square units}", True),
        ("10000", "10{,}000", True),
        ("24", "25", False),
        (None, "25", False),
        ("", "25", False),
    ],
)
def test_math_is_correct(answer: str | None, gold: str, expected: bool) -> None:
    assert MATH.is_correct(answer, _problem(gold)) is expected


def test_math_is_correct_without_ground_truth_is_none() -> None:
    assert MATH.is_correct("5", _problem(None)) is None


# ---- TextGrader ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Tokyo", "Tokyo"),
        ("Tokyo, Japan", "Tokyo"),
        ("\n\n  Paris (France)\nQ: next", "Paris"),
        ('"Lima".', "Lima"),
        ("Port Louis", "Port Louis"),
        ("N'Djamena", "N'Djamena"),
        ("   \n  \n", None),
        ("", None),
        ("...", None),
    ],
)
def test_text_extract(text: str, expected: str | None) -> None:
    assert TEXT.extract(text) == expected


def test_text_key_folds_case_accents_and_spaces() -> None:
    assert TEXT.key("Brasília") == TEXT.key("Brasilia") == TEXT.key("  BRASILIA ") == "brasilia"
    assert TEXT.key("San  José") == "san jose"
    assert TEXT.key("   ") is None


def test_text_is_correct_against_answer_and_aliases() -> None:
    brazil = _problem("Brasília", ("Brasília", "Brasilia"))
    assert TEXT.is_correct("Brasilia", brazil) is True
    assert TEXT.is_correct("brasília", brazil) is True
    assert TEXT.is_correct("Rio de Janeiro", brazil) is False
    assert TEXT.is_correct(None, brazil) is False
    japan = _problem("Tokyo")
    assert TEXT.is_correct(TEXT.extract("Tokyo, Japan"), japan) is True
    assert TEXT.is_correct("tokyo", japan) is True
    assert TEXT.is_correct("Tokyo", _problem(None)) is None


# ---- grader_for ----------------------------------------------------------------------------


def test_grader_for_picks_by_aliases() -> None:
    assert isinstance(grader_for([_problem("Kabul", ("Kabul",))]), TextGrader)
    assert isinstance(grader_for([_problem("5")]), MathGrader)
    assert isinstance(grader_for([]), MathGrader)
    assert isinstance(MATH, Grader) and isinstance(TEXT, Grader)


# ---- real data -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["math500.jsonl", "aime24.jsonl"])
def test_every_dataset_answer_has_a_key(name: str) -> None:
    rows = _read_jsonl(name)
    assert rows
    for row in rows:
        assert MATH.key(str(row["answer"])) is not None, row["id"]


def test_grading_agrees_with_pool_labels() -> None:
    rows = _read_jsonl("pools/qwen25math_math_cot_100.jsonl")
    agree = total = 0
    for row in rows:
        problem = Problem(id=row["id"], problem=row["problem"], answer=row["answer"])
        for sample in row["samples"]:
            total += 1
            agree += MATH.is_correct(sample["pred"], problem) == sample["correct"]
    assert total == 800
    assert agree / total >= 0.98, f"{agree}/{total}"


def test_text_grading_agrees_with_capitals_pool() -> None:
    rows = _read_jsonl("pools/live_capitals_gemma3-270m.jsonl")
    agree = total = 0
    for row in rows:
        problem = Problem(
            id=row["id"],
            problem=row["problem"],
            answer=row["answer"],
            aliases=tuple(row["aliases"]),
        )
        for sample in row["samples"]:
            total += 1
            agree += TEXT.is_correct(TEXT.extract(sample["text"]), problem) == sample["correct"]
    assert agree / total >= 0.98, f"{agree}/{total}"


def test_a_wrong_integer_answer_is_graded_without_loading_sympy() -> None:
    # two different integers (AIME's answers) need no math_verify: it cost ~0.4 s to
    # load for the first wrong answer of a run; a child interpreter, to see it cold
    code = (
        "import sys\n"
        "from orchestrator.grading import MathGrader\n"
        "from orchestrator.types import Problem\n"
        "g = MathGrader()\n"
        "p = Problem(id='p', problem='q', answer='025')\n"
        "assert g.is_correct('24', p) is False and g.is_correct('-25', p) is False\n"
        "assert g.is_correct('25', p) is True\n"
        "assert 'sympy' not in sys.modules and 'math_verify' not in sys.modules\n"
        "assert g.is_correct('24.5', p) is False\n"  # not an integer: math_verify decides
        "assert 'math_verify' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr
