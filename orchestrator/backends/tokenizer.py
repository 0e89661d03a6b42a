"""Counting tokens with the server's own tokenizer endpoint, for servers that send no usage
in streams (llama-cpp-python's server; vLLM and llama.cpp's own server send usage, but
all three can tokenize).

The shapes, as checked against the real servers (DEVELOPERS.md, "llama.cpp provisioning"):

* vLLM: ``POST /tokenize`` (at the server root, not under ``/v1``) with ``{"model",
  "prompt"}`` or ``{"model", "messages", "add_generation_prompt"}`` (the chat template
  applied: an exact chat prompt count) -> ``{"count", "max_model_len", "tokens"}``;
  ``add_special_tokens`` chooses whether ``<bos>`` is counted.
* llama.cpp's server: ``POST /tokenize`` with ``{"content", "add_special"}`` ->
  ``{"tokens"}``.
* llama-cpp-python's server: ``POST /extras/tokenize`` with ``{"input"}`` -> ``{"tokens"}``,
  ``<bos>`` always first (its count of ``""`` is subtracted from completion texts). On its
  default settings that call waits for the model lock and *interrupts a running stream*
  like any other request, so the backend makes it inside the stream's own slot.

A chat prompt counted from its message text (no endpoint that applies the chat template)
is an estimate, flagged ``tokenize-text`` (see :data:`orchestrator.ledger.ESTIMATE_SOURCES`).

The probe's answer is kept only when the server gave one: a path it does not have (an HTTP
4xx, a reply of another shape) means that shape is absent, but a call that could not be
made or that the server could not answer then (no connection, a timeout, 408, 429, a 5xx
other than 501) decides nothing (a server certificate that failed verification does: no
tokenizer), and a later count probes again, up to
:data:`PROBE_ATTEMPTS` times, after which the server is taken to have no tokenizer. The
attempts are spaced (:data:`PROBE_SPACING_S` after the first, twice that after the
second): counts asked for before then are estimates without a probe. Unspaced, the
streams that ended together in one outage used up every attempt in it (found by review).
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from orchestrator import logs
from orchestrator.retry import certificate_refused

__all__ = ["PROBE_ATTEMPTS", "PROBE_SPACING_S", "ServerTokenizer", "root_url"]

_log = logs.get_logger(__name__)

Shape = Literal["vllm", "llamacpp", "llamacpp-python"]

_PROMPT_CACHE = 512  # distinct prompts whose counts are kept (one problem's samples share one)

#: probes that could not be answered (see the module's docstring) before giving up
PROBE_ATTEMPTS = 3
#: seconds after an unanswered probe before the next may be made (doubled after each)
PROBE_SPACING_S = 15.0


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a failed call (openai's ``status_code``, aiohttp's ``status``)."""
    for name in ("status_code", "status"):
        value = getattr(exc, name, None)
        if isinstance(value, int):
            return value
    return None


def _unanswered(exc: BaseException) -> bool:
    """True when ``exc`` says nothing about whether the path exists: the call did not reach
    the server (no status) or the server could not answer it then. Not a server
    certificate that failed verification: the same call fails the same way
    (:func:`~orchestrator.retry.certificate_refused`, as for generation requests)."""
    status = _status(exc)
    if status is None:
        return not certificate_refused(exc)
    return status in (408, 429) or (status >= 500 and status != 501)


def root_url(base_url: str) -> str:
    """The server root of an OpenAI base URL (``http://h:p/v1`` -> ``http://h:p``)."""
    parts = urllib.parse.urlsplit(base_url)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class ServerTokenizer:
    """One endpoint's tokenizer, found by :meth:`probe` (None when the server has none).

    ``post(path, body) -> JSON`` is the caller's HTTP call at the server root (the OpenAI
    backend passes its own client, so auth and timeouts are the same as for generation).
    ``clock`` (seconds, monotonic) spaces the probes that got no answer.
    """

    def __init__(self, post: Any, model: str, *, clock: Any = time.monotonic) -> None:
        self._post = post
        self._model = model
        self._clock = clock
        self._next_probe_at: float | None = None  # after an unanswered probe
        self.shape: Shape | None = None
        self._probed = False
        self._unanswered = 0  # probes that got no answer (see the module's docstring)
        self._lock = asyncio.Lock()
        self._bos = 0  # tokens the endpoint adds to any text (llama-cpp-python: <bos>)
        self._prompts: OrderedDict[str, tuple[int, bool]] = OrderedDict()
        #: tokenizer calls made (HTTP requests beside the generation ones)
        self.calls = 0

    async def _call(self, path: str, body: Mapping[str, Any]) -> Any:
        self.calls += 1
        return await self._post(path, dict(body))

    async def probe(self) -> Shape | None:
        """Which tokenizer the server has (asked once the server has answered; later calls
        return that answer). None for a server without one, and for now when the server
        could not be asked (it is asked again later, see the module's docstring)."""
        async with self._lock:
            if self._probed:
                return self.shape
            if self._next_probe_at is not None and self._clock() < self._next_probe_at:
                return None  # too soon after an unanswered probe: no call
            return await self._ask()

    def deadline_passed(self) -> None:
        """The caller's deadline cut a count off: while the probe has no answer, the next
        one waits as after an unanswered probe (no attempt is counted). Unspaced, every
        stream ending while the endpoint hung probed again and waited out the deadline.
        (A plain cancellation, the caller stopping, spaces nothing.)"""
        if not self._probed:
            self._space_next()

    def _space_next(self) -> float:
        """Hold the next probe off: :data:`PROBE_SPACING_S` after the first unanswered
        one, doubled after each more; the wait."""
        wait = PROBE_SPACING_S * 2 ** max(self._unanswered - 1, 0)
        self._next_probe_at = self._clock() + wait
        return wait

    async def _ask(self) -> Shape | None:
        """One probe of both paths (under the lock); its answer, kept when it is one."""
        shape: Shape | None = None
        unanswered = False
        try:
            reply = await self._call("/tokenize", {
                "model": self._model, "prompt": "Hi", "add_special_tokens": False,
                "content": "Hi", "add_special": False})
            if isinstance(reply, Mapping) and isinstance(reply.get("count"), int):
                shape = "vllm"
            elif isinstance(reply, Mapping) and reply.get("tokens"):
                shape = "llamacpp"
        except Exception as exc:  # no such endpoint (or no answer): try the next shape
            unanswered = unanswered or _unanswered(exc)
            _log.debug("tokenizer.probe", path="/tokenize", error=repr(exc))
        if shape is None:
            try:
                empty = await self._call("/extras/tokenize", {"model": self._model,
                                                               "input": ""})
                if isinstance(empty, Mapping) and isinstance(empty.get("tokens"), list):
                    shape, self._bos = "llamacpp-python", len(empty["tokens"])
            except Exception as exc:
                unanswered = unanswered or _unanswered(exc)
                _log.debug("tokenizer.probe", path="/extras/tokenize", error=repr(exc))
        if shape is None and unanswered:
            self._unanswered += 1
            if self._unanswered < PROBE_ATTEMPTS:
                wait = self._space_next()
                _log.warning("tokenizer.probe_unanswered", attempt=self._unanswered,
                             of=PROBE_ATTEMPTS, next_in_s=wait)
                return None
        self.shape, self._probed = shape, True
        _log.info("tokenizer.found", shape=shape)
        return shape

    async def count_text(self, text: str) -> int:
        """Tokens of ``text`` alone (no ``<bos>``); raises when the server has no tokenizer."""
        if not text:
            return 0
        if self.shape == "vllm":
            reply = await self._call("/tokenize", {"model": self._model, "prompt": text,
                                                   "add_special_tokens": False})
            return int(reply["count"])
        if self.shape == "llamacpp":
            reply = await self._call("/tokenize", {"content": text, "add_special": False})
            return len(reply["tokens"])
        if self.shape == "llamacpp-python":
            reply = await self._call("/extras/tokenize", {"model": self._model, "input": text})
            return max(0, len(reply["tokens"]) - self._bos)
        raise RuntimeError("the server has no tokenizer endpoint")

    async def count_prompt(self, prompt: str | None,
                           messages: Sequence[Mapping[str, str]] | None) -> tuple[int, bool]:
        """Prompt tokens as the server counts them; True when that is an estimate (a chat
        prompt counted from its message text, without the chat template's tokens)."""
        key = prompt if prompt is not None else repr([sorted(m.items()) for m in messages or ()])
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        if prompt is not None:
            # a completion prompt: the server adds <bos> (vLLM, llama.cpp) like this count
            count, estimated = await self._count_with_bos(prompt), False
        elif self.shape == "vllm":
            reply = await self._call("/tokenize", {"model": self._model,
                                                   "messages": [dict(m) for m in messages or ()],
                                                   "add_generation_prompt": True})
            count, estimated = int(reply["count"]), False
        else:
            text = "\n".join(m.get("content", "") for m in messages or ())
            count, estimated = await self._count_with_bos(text), True
        self._prompts[key] = (count, estimated)
        if len(self._prompts) > _PROMPT_CACHE:
            self._prompts.popitem(last=False)
        return count, estimated

    async def _count_with_bos(self, text: str) -> int:
        if self.shape == "vllm":
            reply = await self._call("/tokenize", {"model": self._model, "prompt": text})
            return int(reply["count"])
        if self.shape == "llamacpp":
            reply = await self._call("/tokenize", {"content": text, "add_special": True})
            return len(reply["tokens"])
        reply = await self._call("/extras/tokenize", {"model": self._model, "input": text})
        return len(reply["tokens"])
