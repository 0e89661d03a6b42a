"""Building frozen slotted dataclasses without their ``__init__``, for hot loops.

A frozen dataclass's generated ``__init__`` sets each field through ``object.__setattr__``
(a global look-up, an attribute look-up and a call per field): building a 16-field
:class:`~orchestrator.snapshot.ProblemSnapshot` that way costs some 2.0 us.
:func:`builder` returns a function that takes every field positionally, in field order,
and sets the instance's slots: the same object ``cls(*fields)`` builds (every field set,
the same values; ``==`` and ``hash`` agree), in some 0.4 us. It builds an instance of a
plain twin class (the same slots, in the same order) with ordinary attribute stores, then
assigns it ``cls`` as its ``__class__``, which Python allows between classes of the same
layout; where it may not (a class with inherited slots), it sets the slots through their
member descriptors (some 1.3 us; timings on the 2-core dev box). Only for classes whose
``__init__`` does nothing else: no ``__post_init__``, every field an ``init`` field
(:func:`builder` refuses the others), so nothing a constructor checks is skipped; or,
asked for explicitly, one whose ``__post_init__`` only computes fields the caller then
passes."""

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
    args = ", ".join(names)
    twin = _twin(cls)
    if twin is not None:
        # plain attribute stores on the twin (the interpreter's fast slot store), then the
        # instance becomes a ``cls``: the same slots at the same offsets
        ns: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_twin": twin}
        body = "".join(f"    _o.{name} = {name}\n" for name in names)
        exec(f"def build({args}, *, _new=_new, _twin=_twin, _cls=_cls):\n"
             f"    _o = _new(_twin)\n{body}    _o.__class__ = _cls\n    return _o\n", ns)
    else:
        # the setters are keyword-only defaults: fast locals in the generated function
        setters = {f"_set_{name}": _slot(cls, name).__set__ for name in names}
        ns = {"_new": object.__new__, "_cls": cls, **setters}
        hidden = ", ".join(f"{k}={k}" for k in ("_new", "_cls", *setters))
        body = "".join(f"    _set_{name}(_o, {name})\n" for name in names)
        exec(f"def build({args}, *, {hidden}):\n    _o = _new(_cls)\n{body}    return _o\n", ns)
    build = ns["build"]
    build.__qualname__ = build.__name__ = f"build_{cls.__name__}"
    build.__doc__ = f"{cls.__name__}({args}), without its __init__"
    return build


def _slot(cls: type, name: str) -> Any:
    """The member descriptor of slot ``name``, from the class that declares it."""
    return next(k.__dict__[name] for k in cls.__mro__ if name in k.__dict__)


def _twin(cls: type) -> type | None:
    """A plain class with ``cls``'s slots (same names, same order, so the same layout)
    whose instances may become ``cls`` instances by ``__class__`` assignment, which Python
    allows only between classes of the same layout; None where ``cls`` is not a direct
    subclass of ``object`` or the assignment is refused."""
    if cls.__bases__ != (object,) or "__dict__" in cls.__slots__:
        return None
    twin = type(f"_{cls.__name__}Twin", (), {"__slots__": tuple(cls.__slots__)})
    try:
        object.__new__(twin).__class__ = cls
    except TypeError:
        return None
    return twin
