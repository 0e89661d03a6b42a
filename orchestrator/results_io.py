"""Results files that survive a crash, and resuming the run that wrote them.

A results file is JSON Lines, one finished problem a line, with an ``id``. It is written
so that a crash at any instant (``kill -9``, power loss aside) leaves a valid file:

* each line goes out with one ``os.write`` of the whole encoded line on an ``O_APPEND``
  descriptor (nothing is buffered in the process), so a killed run leaves whole lines;
* a torn last line (no newline, or not JSON: a crash in the middle of a write, a full
  disk) is detected when the file is resumed, dropped with a warning, and its problem is
  run again;
* a line in the *middle* that is not JSON is not a crash artefact: it is an error.

Beside ``OUT`` the run writes ``OUT.run.json``, its fingerprint: the model, the policy
spec, the SHA-256 of the problem file, and the settings that change what a result means
(endpoint, max tokens, temperature, budgets). ``--resume`` compares it with the new run's
and refuses, saying what differs, when they do not match; then it skips every id already
in the file, so no id is ever written twice, except the rows it is told to run again
(``redo``: ``solverify run`` reruns the problems that ended on an error), which are taken
out of the file first. Without ``--resume`` (or ``--overwrite``) an existing non-empty
``OUT`` is an error.

Nothing that would lose rows happens before there is a result to write: the truncation
of ``--overwrite``, the removal of the rows to run again and the fingerprint are applied
at the writer's first write (or :meth:`ResultsWriter.commit`), so a run that cannot reach
its endpoint leaves an existing file as it was (and creates none).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError, DataError

__all__ = [
    "ExistingResults",
    "ResultsWriter",
    "file_sha256",
    "open_results",
    "read_results",
    "sidecar_path",
]

SIDECAR_SUFFIX = ".run.json"
FORMAT = "solverify-results/1"


def sidecar_path(out: Path) -> Path:
    """Where the fingerprint of the run writing ``out`` lives: ``OUT.run.json``."""
    return out.with_name(out.name + SIDECAR_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ExistingResults:
    """What an existing results file holds: its rows (in file order) and their ids."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    lines: list[bytes] = field(default_factory=list, repr=False)  # each row as written
    #: ids of rows taken out to be run again (``open_results(redo=...)``)
    redo: list[str] = field(default_factory=list)
    good_bytes: int = 0  # length of the file up to its last whole line
    torn: bytes = b""  # a torn last line that was (or will be) dropped


def read_results(path: Path) -> ExistingResults:
    """Parse a results file. A torn last line is reported in ``torn`` (not dropped here);
    a bad line before the last, or an id twice, is a :class:`DataError`."""
    found = ExistingResults()
    if not path.exists():
        return found
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty for a file of whole lines
    offset = 0
    for i, raw in enumerate(lines):
        lineno = i + 1
        last_whole = i == len(lines) - 1 and not tail
        if not raw.strip():
            offset += len(raw) + 1
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "id" not in row:
            if last_whole:  # a whole-looking last line that is not a row: torn too
                found.torn = raw + b"\n"
                break
            raise DataError(f"{path}:{lineno}: not a results line (not a JSON object with an "
                            "'id'); this file was not written by an interrupted run alone: "
                            "fix it or pass --overwrite")
        pid = str(row["id"])
        if pid in found.ids:
            raise DataError(f"{path}:{lineno}: id {pid!r} appears twice; fix the file or "
                            "pass --overwrite")
        found.ids.add(pid)
        found.rows.append(row)
        found.lines.append(raw + b"\n")
        offset += len(raw) + 1
    found.good_bytes = offset
    if tail:
        found.torn = found.torn + tail if found.torn else tail
    return found


class ResultsWriter:
    """Appends one JSON line per result, each with a single unbuffered write.

    ``prepare`` runs once, before the file is opened: at the first write or
    :meth:`commit` (:func:`open_results` defers its changes to the file to it)."""

    def __init__(self, path: Path, prepare: Callable[[], None] | None = None) -> None:
        self.path = path
        self._prepare = prepare
        self._fd: int | None = None
        self._closed = False
        self.written: set[str] = set()

    def commit(self) -> None:
        """Apply the deferred changes and open the file (once; the first write does it)."""
        if self._closed:
            raise ValueError(f"results file {self.path} is closed")
        if self._fd is None:
            if self._prepare is not None:
                prepare, self._prepare = self._prepare, None
                prepare()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row: Mapping[str, Any], *, redact=None) -> None:
        """Write ``row`` as one line; an id already written raises (never twice).
        ``redact(text)`` is applied to every string value but the id (not to the keys, the
        numbers or the JSON around them, so the line stays a row of this problem)."""
        self.commit()
        assert self._fd is not None
        pid = str(row["id"])
        if pid in self.written:
            raise RuntimeError(f"result for id {pid!r} written twice to {self.path}")
        if redact is not None:
            row = {k: v if k == "id" else _redacted(v, redact) for k, v in row.items()}
        text = json.dumps(row, ensure_ascii=False)
        data = (text + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            done = os.write(self._fd, view)
            view = view[done:]
        self.written.add(pid)

    def close(self) -> None:
        self._closed = True
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_sidecar(out: Path, fingerprint: Mapping[str, Any]) -> None:
    target = sidecar_path(out)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **fingerprint}, indent=2, sort_keys=True)
                   + "\n", encoding="utf-8")
    os.replace(tmp, target)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "format":
            continue
        if old.get(key) != new.get(key):
            out.append(f"{key} was {old.get(key)!r}, now {new.get(key)!r}")
    return out


def _rewrite(out: Path, lines: list[bytes]) -> None:
    """Replace ``out`` by ``lines`` at once (a crash leaves the old file or the new one)."""
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(b"".join(lines))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)


def open_results(out: Path, fingerprint: Mapping[str, Any], *, resume: bool,
                 overwrite: bool, warn=None,
                 redo: Callable[[dict[str, Any]], bool] | None = None,
                 ) -> tuple[ExistingResults, ResultsWriter]:
    """Check ``out`` against the flags, repair a torn last line when resuming, and return
    what is already done and a writer for the rest; the writer's first write truncates
    the file (``overwrite``), takes out the rows to run again and writes the fingerprint.

    ``fingerprint`` must be JSON-ready. ``warn(message)`` is told about a dropped line.
    ``redo(row)``, when resuming: whether an existing row is to be run again (it is then
    not in the returned ids and rows, and its line is taken out of the file).
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues "
                          f"{out}, --overwrite replaces it")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory: give the path of a results file "
                          f"(e.g. {out / 'results.jsonl'})")
    non_empty = out.exists() and out.stat().st_size > 0
    done = ExistingResults()
    if non_empty and not (resume or overwrite):
        raise ConfigError(f"--out {out} already holds results: pass --resume to continue "
                          "that run (problems already in it are skipped) or --overwrite "
                          "to replace it")
    if non_empty and resume:
        side = sidecar_path(out)
        try:
            old = json.loads(side.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"cannot resume {out}: {side.name} (the fingerprint every run "
                              "writes beside its results) is missing, so it is unknown "
                              "which model, policy and problems it holds; pass --overwrite "
                              "to start again") from None
        except ValueError as exc:
            raise DataError(f"cannot resume {out}: {side} is not JSON ({exc})") from None
        diffs = _differences(old, fingerprint) if isinstance(old, dict) else ["unreadable"]
        if diffs:
            raise ConfigError(f"cannot resume {out}: it was written by a different run ("
                              + "; ".join(diffs) + "); use another --out, or --overwrite")
        done = read_results(out)
        if done.torn:
            os.truncate(out, done.good_bytes)
            if warn is not None:
                warn(f"{out}: dropped a torn last line ({len(done.torn)} bytes, from a run "
                     "that stopped while writing it); that problem is run again")
        if redo is not None:
            keep = [i for i, row in enumerate(done.rows) if not redo(row)]
            if len(keep) < len(done.rows):
                kept_lines = [done.lines[i] for i in keep]
                done.redo = [str(r["id"]) for i, r in enumerate(done.rows) if i not in keep]
                done.rows = [done.rows[i] for i in keep]
                done.lines = kept_lines
                done.ids = {str(r["id"]) for r in done.rows}

    def prepare() -> None:
        # the folders too: a run that fails before its first result leaves none behind
        out.parent.mkdir(parents=True, exist_ok=True)
        if non_empty and overwrite:
            os.truncate(out, 0)
        elif done.redo:
            _rewrite(out, done.lines)
        _write_sidecar(out, fingerprint)

    return done, ResultsWriter(out, prepare)


def _redacted(value: Any, redact: Any) -> Any:
    """``value`` with ``redact`` applied to each string in it (dict keys kept)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: _redacted(v, redact) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v, redact) for v in value]
    return value
