"""argparse value types shared by every ``solverify`` command (one place, one wording)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _number(convert: Callable[[str], float], text: str, ok: Callable[[float], bool],
            what: str) -> float:
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    return int(_number(int, text, lambda v: v >= 1, "a positive integer"))


def non_negative_int(text: str) -> int:
    return int(_number(int, text, lambda v: v >= 0, "an integer >= 0"))


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a positive number")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, "a number >= 0")


def float_list(text: str) -> tuple[float, ...]:
    """``0.5,0.9`` -> (0.5, 0.9), in the order given."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}"
                                         ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def int_list(text: str) -> tuple[int, ...]:
    """``8,2,4`` -> (2, 4, 8): positive integers, sorted, without repeats."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(sorted(set(values)))


def beta_params(text: str) -> tuple[float, float]:
    """``3,2`` -> (3.0, 2.0): the two positive parameters of a Beta distribution."""
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A,B (two positive numbers), got {text!r}"
                                         ) from None
    if not (a > 0 and b > 0):
        raise argparse.ArgumentTypeError(f"Beta parameters must be > 0, got {text!r}")
    return a, b
