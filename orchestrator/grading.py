"""Answer graders: extract an answer from a model output, key it for voting, grade it.

A :class:`Grader` does three things, each a pure function of its inputs:

* ``extract(text)`` finds the answer string inside a model output (``None`` when there is
  none);
* ``key(answer)`` maps an answer to a canonical string, so that equivalent answers share
  one vote (``None`` when the answer is empty or unusable);
* ``is_correct(answer, problem)`` grades against the problem's ground truth (``None``
  when the problem has none).

Two graders ship here: :class:`MathGrader` (LaTeX / numeric answers, via HF ``math_verify``
and sympy) and :class:`TextGrader` (short text answers such as city names).
:func:`grader_for` picks one for a problem set.

Keys are cached (``functools.lru_cache``) because a replay sweep asks for the same answer's
key many thousands of times. math_verify guards parsing with ``signal.alarm``, which works
only in the main thread: there we pass a timeout, elsewhere (worker threads) ``None``, which
math_verify reads as "no alarm" (it then logs a one-time warning).
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

from orchestrator.types import Problem

# sympy and math_verify (about a second of CPU to import) are imported where an answer first
# needs them, not here: a run whose answers are numbers, letters or words never loads them
# to key them, nor to grade integers (a wrong integer answer is told from its key).

__all__ = ["Grader", "MathGrader", "TextGrader", "grader_for", "math_key", "text_key"]

_CACHE_SIZE = 1 << 16
_PARSE_TIMEOUT_S = 5
"""Seconds allowed for one math_verify parse/compare, when a signal alarm can be used."""


@runtime_checkable
class Grader(Protocol):
    """Extracts, keys and grades answers for one kind of problem."""

    def extract(self, text: str) -> str | None:
        """The answer string inside ``text`` (a model output), or ``None``."""
        ...

    def key(self, answer: str) -> str | None:
        """The canonical key of ``answer``; ``None`` when the answer is empty/unusable."""
        ...

    def is_correct(self, answer: str | None, problem: Problem) -> bool | None:
        """Whether ``answer`` matches ``problem.answer``; ``None`` without ground truth."""
        ...


# --------------------------------------------------------------------------------------
# Math: extraction
# --------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_FINAL_ANSWER_RE = re.compile(r"final answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.\s+(?=[A-Z])")
_MC_ANSWER_RE = re.compile(
    r"(?i:answer)\s*(?:(?i:is)\s*)?:?\s*(?:\$?\\text(?:bf)?\{)?\s*\(?([A-J])\)?(?![A-Za-z])"
)
_MC_OPTIONS_RE = re.compile(r"\(A\).*\(B\)", re.DOTALL)


def _balanced_group(text: str, open_at: int) -> str | None:
    """The content of the ``{...}`` group whose ``{`` is at ``open_at`` (None if unclosed)."""
    depth = 0
    for i in range(open_at, len(text)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``.

    Braces are matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. A truncated
    last box (no closing brace) is skipped in favour of the one before it. The brace-less
    form ``\\boxed 5`` gives ``5``.
    """
    for match in reversed(list(_BOXED_RE.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            content = _balanced_group(text, end)
        else:
            bare = re.match(r"[^\s$\\{}]+", text[end:])
            content = bare.group(0) if bare else None
        if content is not None and content.strip():
            return content.strip()
    return None


def _clean_final_answer(raw: str) -> str:
    """Trim a "final answer is ..." tail: the first sentence, without ``$`` and final dots."""
    head = _SENTENCE_END_RE.split(raw, maxsplit=1)[0]
    head = head.strip().rstrip(".").strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if head.startswith(left) and head.endswith(right) and len(head) > len(left + right):
            head = head[len(left) : -len(right)]
    return head.strip().strip("$").strip().rstrip(".").strip()


def _final_answer(text: str) -> str | None:
    """The answer after the last "final answer is" / "final answer:", or None."""
    matches = list(_FINAL_ANSWER_RE.finditer(text))
    if not matches:
        return None
    answer = _clean_final_answer(text[matches[-1].end() :].split("\n", 1)[0])
    return answer or None


def _choice_letter(text: str) -> str | None:
    """The letter of the last "answer is (C)" / "Answer: C" in ``text``, or None."""
    letters = _MC_ANSWER_RE.findall(text)
    return letters[-1] if letters else None


# --------------------------------------------------------------------------------------
# Math: canonical keys
# --------------------------------------------------------------------------------------

_SPACING_RE = re.compile(r"(?<!\\)\\[!,;:> ]|\\q?quad(?![A-Za-z])")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])\.?|\\[bB]ig{1,2}[lr]?(?![A-Za-z])")
_DEGREES_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|°")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mbox)\s*\{([^{}]*)\}")
_WORDS_RE = re.compile(r"[A-Za-z]{2,}(?:[ '\-][A-Za-z]+)*")
_CHOICE_RE = re.compile(r"\(?([A-J])\)?")
_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
#: a key that is an exact integer (what :func:`_number_key` gives an integral literal)
_INTEGER_KEY_RE = re.compile(r"-?\d+")


def _clean_latex(answer: str) -> str:
    """String-level clean-up that keeps the answer's meaning, before any parsing.

    Drops math delimiters (``$``, ``\\(``, ``\\[``), a trailing period, spacing commands
    (``\\!``, ``\\,``, ``\\;``, ``\\ ``, ``\\quad``), ``\\left``/``\\right``, degree marks,
    percent signs and ``\\$``; rewrites ``\\dfrac``/``\\tfrac`` as ``\\frac``; collapses
    whitespace. ``\\text{...}`` is kept (math_verify uses it to strip units).
    """
    s = answer.strip()
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s)
    s = _SPACING_RE.sub(" ", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = " ".join(s.split())
    return s.rstrip(".").strip()


def _unwrap_text(s: str) -> str:
    """``s`` with ``\\text{...}``-like wrappers replaced by their content."""
    previous = None
    while previous != s:
        previous, s = s, _TEXT_CMD_RE.sub(r"\1", s)
    return " ".join(s.split())


def _plain_key(cleaned: str) -> str | None:
    """The fallback key: the cleaned answer without text wrappers and without spaces."""
    key = _unwrap_text(cleaned).replace(" ", "").replace("{", "").replace("}", "")
    return key or None


def _number_key(s: str) -> str:
    """Exact key of a decimal literal: ``"025"`` → ``25``, ``"2,125"`` → ``2125``,
    ``"0.5"`` → ``1/2``, ``"27.0"`` → ``27`` (the same text sympy gives a Rational)."""
    return str(Fraction(s.replace(",", "")))


def _parse_timeout() -> int | None:
    """math_verify's signal-based timeout only works in the main thread; elsewhere
    (worker threads) it must be disabled by passing ``None``."""
    if threading.current_thread() is threading.main_thread():
        return _PARSE_TIMEOUT_S
    return None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_latex(latex: str) -> tuple[Any, ...]:
    """math_verify's parse of ``$latex$``: sympy objects first, then string fallbacks."""
    from math_verify import LatexExtractionConfig, parse

    return tuple(
        parse(
            f"${latex}$",
            extraction_config=[LatexExtractionConfig()],
            parsing_timeout=_parse_timeout(),  # type: ignore[arg-type]  # None = no alarm
        )
    )


def _rationalise(expr: Any) -> Any:
    """Replace every float in ``expr`` by the exact rational of its printed decimal."""
    import sympy

    floats = expr.atoms(sympy.Float) if hasattr(expr, "atoms") else set()
    if not floats:
        return expr
    return expr.xreplace({f: sympy.Rational(str(f)) for f in floats})


def _evaluate(expr: Any) -> Any:
    """Rebuild ``expr`` bottom-up with sympy's automatic evaluation switched on.

    math_verify returns some products unevaluated (``6-5i`` as ``-1*5*i + 6``); rebuilding
    gives the one canonical form (``6 - 5*i``) whichever way the answer was written.
    """
    import sympy

    if not isinstance(expr, sympy.Basic) or not expr.args:
        return expr
    return expr.func(*(_evaluate(arg) for arg in expr.args))


def _symbolic_key(cleaned: str) -> str | None:
    """The key of a LaTeX answer via math_verify → sympy, or None when it does not parse.

    Floats become exact rationals (``0.5`` → ``1/2``); an assignment to a lone variable
    with a constant right side keys as that constant (``x=5`` → ``5``); a one-column or
    one-row matrix keys as the tuple of its entries.
    """
    import sympy

    parsed = _parse_latex(cleaned)
    if not parsed or not isinstance(parsed[0], sympy.Basic | sympy.MatrixBase):
        return None
    expr = parsed[0]
    if (
        isinstance(expr, sympy.Eq)
        and isinstance(expr.lhs, sympy.Symbol)
        and not getattr(expr.rhs, "free_symbols", {expr.lhs})
    ):
        expr = expr.rhs
    if isinstance(expr, sympy.MatrixBase) and 1 in expr.shape:
        expr = sympy.Tuple(*expr)  # a vector: pmatrix and (a, b, c) are one vote
    expr = _rationalise(expr)
    try:
        evaluated = _evaluate(expr)
    except Exception:  # sympy raises many types on odd trees; keep the parsed form
        evaluated = expr
    if not isinstance(evaluated, sympy.logic.boolalg.BooleanAtom):  # "1=1" must not be True
        expr = evaluated
    return str(expr)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def math_key(answer: str) -> str | None:
    """Canonical voting key of a math answer (pure, deterministic, cached).

    Rules, in order (first that applies wins):

    1. clean the string (:func:`_clean_latex`); empty → ``None``;
    2. a lone capital letter, optionally in parentheses (``C``, ``(C)``,
       ``\\text{(C)}``) is a multiple-choice letter → ``"C"``;
    3. a decimal literal, optionally with thousands commas → its exact rational
       (``025``, ``25.0``, ``2,125``, ``0.5`` → ``25``, ``25``, ``2125``, ``1/2``);
    4. words (``\\text{Evelyn}``, ``Evelyn``, ``New York``) → casefolded words;
    5. anything else → math_verify parse → sympy, floats made rational, ``x=5`` → ``5``,
       vectors as tuples, printed with ``str`` (``\\frac12`` → ``1/2``,
       ``\\left(3,\\frac{\\pi}{2}\\right)`` → ``(3, pi/2)``);
    6. if that fails: the cleaned string without text wrappers, braces and spaces.
    """
    cleaned = _clean_latex(answer)
    if not cleaned:
        return None
    unwrapped = _unwrap_text(cleaned)
    if choice := _CHOICE_RE.fullmatch(unwrapped):
        return choice.group(1)
    compact = unwrapped.replace(" ", "").replace("{", "").replace("}", "")
    if _NUMBER_RE.fullmatch(compact):
        return _number_key(compact)
    if _WORDS_RE.fullmatch(unwrapped):
        return unwrapped.casefold()
    return _symbolic_key(cleaned) or _plain_key(cleaned)


def _as_latex_input(answer: str) -> str:
    """``answer`` ready for math_verify.parse: delimiters added unless already present."""
    if "$" in answer or "\\boxed" in answer or "\\(" in answer or "\\[" in answer:
        return answer
    return f"${answer}$"


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_for_verify(answer: str) -> tuple[Any, ...]:
    """math_verify's parse of a gold or predicted answer, for :func:`verify`."""
    from math_verify import parse

    return tuple(parse(_as_latex_input(answer), parsing_timeout=_parse_timeout()))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _math_verify(gold: str, pred: str) -> bool:
    """math_verify.verify(gold, pred) on parsed answers; False when either fails to parse."""
    from math_verify import verify

    gold_parsed = _parse_for_verify(gold)
    pred_parsed = _parse_for_verify(_clean_latex(pred))
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=_parse_timeout()))


@dataclass(frozen=True, slots=True)
class MathGrader:
    """Grader for math answers (LaTeX, numbers, tuples, sets, multiple-choice letters).

    ``multiple_choice=True`` makes :meth:`extract` fall back to an "answer is (C)" letter
    in every output; with ``False`` it does so only for outputs that list options
    ``(A)`` and ``(B)``.
    """

    multiple_choice: bool = False

    def extract(self, text: str) -> str | None:
        """The last ``\\boxed{}``/``\\fbox{}``, else the last "final answer is X", else
        (multiple choice only) the last "answer is (C)" letter; ``None`` when none."""
        if (boxed := last_boxed(text)) is not None:
            return boxed
        if (final := _final_answer(text)) is not None:
            return final
        if self.multiple_choice or _MC_OPTIONS_RE.search(text):
            return _choice_letter(text)
        return None

    def key(self, answer: str) -> str | None:
        """See :func:`math_key`."""
        return math_key(answer)

    def is_correct(self, answer: str | None, problem: Problem) -> bool | None:
        """Equal keys, else ``math_verify.verify(gold, answer)``."""
        if problem.answer is None:
            return None
        if answer is None:
            return False
        key = math_key(answer)
        if key is None:
            return False
        gold = math_key(problem.answer)
        if key == gold:
            return True
        if gold is not None and _INTEGER_KEY_RE.fullmatch(key) and _INTEGER_KEY_RE.fullmatch(gold):
            return False  # two different integers (AIME's answers): no need to load sympy
        return _math_verify(problem.answer, answer)


# --------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------

_EDGE_PUNCTUATION = " \t\"'`“”‘’«».,;:!?*_()[]{}"


def _strip_accents(s: str) -> str:
    """``s`` without combining marks (``Brasília`` → ``Brasilia``)."""
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


@functools.lru_cache(maxsize=_CACHE_SIZE)
def text_key(answer: str) -> str | None:
    """Casefolded, accent-stripped, whitespace-collapsed ``answer`` with typographic
    apostrophes made plain and edge punctuation removed (``Sana’a`` → ``sana'a``,
    ``Washington D.C.`` → ``washington d.c``); None when nothing is left."""
    folded = _strip_accents(answer).translate(_APOSTROPHES).casefold()
    key = " ".join(folded.split()).strip(_EDGE_PUNCTUATION)
    return key or None


@dataclass(frozen=True, slots=True)
class TextGrader:
    """Grader for short text answers (e.g. capital cities) with accepted aliases."""

    def extract(self, text: str) -> str | None:
        """The first non-empty line, cut at the first ``" ("`` or ``","`` and stripped of
        surrounding punctuation and quotes (``"Tokyo, Japan"`` → ``Tokyo``)."""
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            for cut in (" (", ","):
                line = line.split(cut, 1)[0]
            answer = line.strip(_EDGE_PUNCTUATION)
            return answer or None
        return None

    def key(self, answer: str) -> str | None:
        """See :func:`text_key`."""
        return text_key(answer)

    def is_correct(self, answer: str | None, problem: Problem) -> bool | None:
        """The answer's key equals the key of ``problem.answer`` or of any alias."""
        if problem.answer is None and not problem.aliases:
            return None
        if answer is None:
            return False
        key = text_key(answer)
        if key is None:
            return False
        accepted = (problem.answer, *problem.aliases) if problem.answer else problem.aliases
        return any(key == text_key(gold) for gold in accepted)


def grader_for(problems: Sequence[Problem]) -> Grader:
    """The grader for a problem set: :class:`TextGrader` when any problem carries
    ``aliases`` (text answers come with accepted spellings), else :class:`MathGrader`."""
    if any(problem.aliases for problem in problems):
        return TextGrader()
    return MathGrader()
