"""Building frozen slotted dataclasses without their ``__init__``, for hot loops.

A frozen dataclass's generated ``__init__`` sets each field through
``object.__setattr__`` (a global look-up, an attribute look-up and a call per field),
which makes building a 16-field :class:`~orchestrator.snapshot.ProblemSnapshot` cost
about twice what setting its slots directly does. :func:`builder` returns a function that
takes every field positionally, in field order, and sets the instance's slots through
their member descriptors: the same object ``cls(*fields)`` builds (every field set, the
same values; ``==`` and ``hash`` agree), at half the cost. Only for classes whose
``__init__`` does nothing else: no ``__post_init__``, every field an ``init`` field
(:func:`builder` refuses the others), so nothing a constructor checks is skipped; or,
asked for explicitly, one whose ``__post_init__`` only computes fields the caller
then passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["builder"]

T = TypeVar("T")


def builder(cls: type[T], *, computed: bool = False) -> Callable[..., T]:
    """``build(*fields) -> cls`` that equals ``cls(*fields)``; every field positional, in
    the order of :func:`dataclasses.fields` (no defaults: pass them all).

    ``computed``: for a class whose ``__post_init__`` only computes its ``init=False``
    fields: ``build`` then takes those too, in field order, and the caller passes what
    ``__post_init__`` would have set (tests/test_fastinit.py checks each such use)."""
    if not (dataclasses.is_dataclass(cls) and "__slots__" in cls.__dict__):
        raise TypeError(f"{cls.__name__}: not a slotted dataclass")
    fields = dataclasses.fields(cls)
    if not computed:
        if hasattr(cls, "__post_init__"):
            raise TypeError(f"{cls.__name__} has a __post_init__: build it with its __init__")
        if any(not f.init for f in fields):
            raise TypeError(f"{cls.__name__} has fields its __init__ does not take")
    names = [f.name for f in fields]
    if any(name.startswith("_") for name in names):
        raise TypeError(f"{cls.__name__} has a field whose name starts with '_'")
    # the setters are keyword-only defaults: fast locals in the generated function
    setters = {f"_set_{name}": cls.__dict__[name].__set__ for name in names}  # the slots'
    ns: dict[str, Any] = {"_new": object.__new__, "_cls": cls, **setters}  # descriptors
    args = ", ".join(names)
    hidden = ", ".join(f"{k}={k}" for k in ("_new", "_cls", *setters))
    body = "".join(f"    _set_{name}(_o, {name})\n" for name in names)
    exec(f"def build({args}, *, {hidden}):\n    _o = _new(_cls)\n{body}    return _o\n", ns)
    build = ns["build"]
    build.__qualname__ = build.__name__ = f"build_{cls.__name__}"
    build.__doc__ = f"{cls.__name__}({args}), without its __init__"
    return build
