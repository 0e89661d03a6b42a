"""Problem files: JSON Lines with ``id``, ``problem``, optional ``answer`` and ``aliases``.

Any other fields are kept in ``Problem.meta``. Numeric answers (``27.0``) are kept as
their JSON text so nothing is silently rounded. Every defect is a ``DataError`` that names
the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.errors import DataError
from orchestrator.types import Problem


def _answer_text(value: object, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise DataError(f"{where}: 'answer' must be a string or number, got a boolean")
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return value
    raise DataError(f"{where}: 'answer' must be a string or number, got {type(value).__name__}")


def problem_from_dict(obj: object, where: str) -> Problem:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("id", "problem") if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    pid, text = obj["id"], obj["problem"]
    if not isinstance(pid, str | int) or isinstance(pid, bool) or str(pid) == "":
        raise DataError(f"{where}: 'id' must be a non-empty string or integer")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: 'problem' must be a non-empty string")
    aliases = obj.get("aliases") or ()
    if not isinstance(aliases, list | tuple) or not all(isinstance(a, str) for a in aliases):
        raise DataError(f"{where}: 'aliases' must be a list of strings")
    meta = {k: v for k, v in obj.items() if k not in ("id", "problem", "answer", "aliases")}
    return Problem(id=str(pid), problem=text, answer=_answer_text(obj.get("answer"), where),
                   aliases=tuple(aliases), meta=meta)


def load_problems(path: str | Path, *, limit: int | None = None) -> list[Problem]:
    """Read a problem file; ``limit`` keeps the first N problems."""
    p = Path(path)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    try:
        fh = p.open(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"problem file not found: {p}") from None
    except OSError as exc:
        raise DataError(f"cannot read problem file {p}: {exc.strerror}") from exc
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{p}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})"
                                    ) from None
                prob = problem_from_dict(obj, where)
                if prob.id in seen:
                    raise DataError(f"{where}: duplicate id {prob.id!r} (first on line "
                                    f"{seen[prob.id]})")
                seen[prob.id] = lineno
                problems.append(prob)
                if limit is not None and len(problems) >= limit:
                    break
        except UnicodeDecodeError as exc:
            raise DataError(f"{p}: not UTF-8 text ({exc.reason})") from None
    if not problems:
        raise DataError(f"{p}: no problems in file")
    return problems
