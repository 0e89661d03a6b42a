"""Keeping secrets out of everything solverify prints or writes.

Two kinds of secret can reach solverify: the ``user:password@`` part (userinfo) of a base
URL, and the API key, which the openai client sends as an ``Authorization`` header.
Neither may appear in a message, a log line, a trace or a results file.

* :func:`redact_url` drops the userinfo of one URL (``http://***@host/v1``).
* :func:`redact_text` scrubs free text: the userinfo of every URL in it, the value of any
  ``Authorization``/``api-key`` header or ``Bearer``/``Basic`` credential, and every value
  given to :func:`register_secret` (the CLI registers the API key and the URL's userinfo,
  so a secret quoted by some lower layer in its own words is caught too).

* :func:`redact_secrets` replaces only the registered (or given) values: for results
  lines, which hold model output, where the patterns of :func:`redact_text` would rewrite
  ordinary words ("the basic idea" is a ``Basic`` credential to them) and so change a
  recorded answer.

The backend formats its messages with the redacted URL; the CLI passes every error line
and log event through :func:`redact_text`, and every result line through
:func:`redact_secrets`, as a last line of defence.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable

__all__ = ["MASK", "redact_secrets", "redact_text", "redact_url", "register_secret",
           "secrets_of_url"]

MASK = "***"

_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s'\"]+)@")
_HEADER = re.compile(
    r"(?P<name>\b(?:proxy-)?authorization|\bapi[-_]key|\bx-api-key)(?P<sep>['\"]?\s*[:=]\s*['\"]?)"
    r"(?P<value>(?:(?:bearer|basic)\s+)?[^\s'\",}]+)",
    re.IGNORECASE,
)
_SCHEME_CREDENTIAL = re.compile(r"\b(?P<kind>bearer|basic)\s+(?P<value>[A-Za-z0-9._~+/=\-]{4,})",
                                re.IGNORECASE)

_registered: set[str] = set()
_PLACEHOLDERS = frozenset({"", "EMPTY", "empty", "none", "None", "unused", MASK})


def register_secret(value: str | None) -> None:
    """Scrub ``value`` from all text passed to :func:`redact_text` from now on.
    Placeholders such as ``EMPTY`` and values under 4 characters are ignored (they would
    mangle ordinary text)."""
    if value is None or value in _PLACEHOLDERS or len(value) < 4:
        return
    _registered.add(value)
    quoted = urllib.parse.quote(value, safe="")
    if quoted != value:
        _registered.add(quoted)


def secrets_of_url(url: str) -> list[str]:
    """The user name and password in ``url`` (decoded and as written), if any."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return []
    out = []
    netloc = parts.netloc
    if "@" in netloc:
        userinfo = netloc.rsplit("@", 1)[0]
        user, _, password = userinfo.partition(":")
        for value in (user, password, userinfo):
            if value:
                out.extend({value, urllib.parse.unquote(value)})
    return out


def redact_url(url: str) -> str:
    """``url`` without its userinfo: ``http://user:pw@host:8000/v1`` ->
    ``http://***@host:8000/v1``. Anything else is left as it is."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", url)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL userinfo, credential headers, and registered (or given) secret
    values replaced by ``***``."""
    if not text:
        return text
    out = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    out = _HEADER.sub(lambda m: f"{m.group('name')}{m.group('sep')}{MASK}", out)
    out = _SCHEME_CREDENTIAL.sub(lambda m: f"{m.group('kind')} {MASK}", out)
    return redact_secrets(out, secrets)


def redact_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with the registered (or given) secret values replaced by ``***``, and
    nothing else changed."""
    if not text:
        return text
    out = text
    values = set(_registered)
    values.update(s for s in secrets if s and s not in _PLACEHOLDERS and len(s) >= 4)
    for value in sorted(values, key=len, reverse=True):
        if value in out:
            out = out.replace(value, MASK)
    return out
