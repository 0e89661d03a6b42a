"""What every ``solverify`` command shares (one place, one wording): argparse value types,
the argument groups (endpoint, timeouts, task, verifier, resume), and what they build (the
endpoint backend, the task, the API key).

It sits below both command lines (``orchestrator.cli`` and ``benchmarks.cli``), which import
it; it imports neither, so the two command lines do not import each other's modules.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from orchestrator.errors import ConfigError


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


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    return _number(float, text, lambda v: 0 < v <= 1, "a number in (0, 1]")


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


def check_output(flag: str, path: Path | None, *, folder: bool = False,
                 siblings: bool = False) -> None:
    """Refuse, before any work is done, an output path that cannot be written: a folder
    where a file is wanted (a file where a folder is, with ``folder``), a path below a
    file, a folder this user cannot write in. An existing file that can be written in
    place (``/dev/null`` too) needs no writable folder, unless ``siblings``: files are
    written beside it (``run``'s fingerprint and rewrites). Creates nothing (a run that
    fails later, e.g. on an unreachable endpoint, leaves no folders behind); None:
    nothing to check."""
    if path is None:
        return
    if folder:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{flag} {path} is a file: give a folder")
    elif path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder: give the path of a file in it")
    elif path.exists():
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{flag} {path}: the file is not writable")
        if not siblings:
            return  # written in place
    # the nearest ancestor that exists: where the missing folders would be made
    ancestor = path if folder and path.exists() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {ancestor}")


def check_base_url(url: str, what: str = "--base-url") -> str:
    """An http(s) URL with a host, else a ConfigError at once (not retries later)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{what} {url!r} is not an http:// or https:// URL with a host "
                          "(e.g. http://127.0.0.1:8000/v1)")
    return url



def _base_url_arg(text: str) -> str:
    try:
        return check_base_url(text, "base URL")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None



def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    env_url = os.environ.get("OPENAI_BASE_URL") or None
    # append with default None (a default list would be appended to); base_urls() fills in
    # $OPENAI_BASE_URL when no --base-url was given
    p.add_argument("--base-url", action="append", required=env_url is None, default=None,
                   type=_base_url_arg, metavar="URL",
                   help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                        "(default: $OPENAI_BASE_URL, as the openai client reads it); repeat "
                        "it for several replicas of one model: each problem's requests stay "
                        "on one replica, with failover (README: Scaling out)")
    p.add_argument("--model", required=True, help="model name as the server knows it")
    p.add_argument("--max-streams", type=positive_int, default=None, metavar="N",
                   help="most HTTP streams open at once per endpoint, each stream of an "
                        "emulated n (a server without n) counted (default: --concurrency); "
                        "a server seen cutting a running stream when another arrives is "
                        "served one stream at a time")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the API key (default: "
                        "$OPENAI_API_KEY if set, as the openai client reads it, else "
                        "none: sends 'EMPTY')")
    add_timeout_args(p)



def base_urls(args) -> list[str]:
    """The --base-url values (in order, repeats refused), else $OPENAI_BASE_URL."""
    urls = list(args.base_url or [])
    if not urls:
        env_url = os.environ.get("OPENAI_BASE_URL")
        if not env_url:
            raise ConfigError("no endpoint: pass --base-url URL (or set OPENAI_BASE_URL)")
        urls = [check_base_url(env_url, "OPENAI_BASE_URL")]
    if len(set(urls)) != len(urls):
        raise ConfigError("the same --base-url was given twice")
    return urls



def endpoint_backend(args, api_key: str, rate_limit=None):
    """One OpenAIBackend for one --base-url; a MultiBackend over one per URL for several.
    ``rate_limit``: a throttler from :func:`orchestrator.retry.make_throttler` that every
    replica shares (``--rate``: HTTP requests per second across them all), or None."""
    from orchestrator.backends.openai_compat import OpenAIBackend

    urls = base_urls(args)
    max_streams = getattr(args, "max_streams", None) or getattr(args, "concurrency", None)
    backends = [OpenAIBackend(base_url=u, model=args.model, api_key=api_key,
                              timeout=args.timeout, idle_timeout=args.idle_timeout,
                              max_streams=max_streams, rate_limit=rate_limit)
                for u in urls]
    if len(backends) == 1:
        return backends[0]
    from orchestrator.backends.multi import MultiBackend

    return MultiBackend(backends)



def add_timeout_args(p: argparse.ArgumentParser) -> None:
    """The request deadline and the idle-stream timeout (orchestrator.backends.openai_compat)."""
    from orchestrator.backends.openai_compat import DEFAULT_IDLE_TIMEOUT, DEFAULT_TIMEOUT

    p.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="S",
                   help="request deadline: seconds to a stream's first token, retries "
                        f"included (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--idle-timeout", type=positive_float, default=DEFAULT_IDLE_TIMEOUT,
                   metavar="S", help="a stream that sends no token for S seconds after its "
                                     "first (silent, or only keep-alive comments or empty "
                                     f"chunks) is broken (default {DEFAULT_IDLE_TIMEOUT:g})")



def add_resume_args(p: argparse.ArgumentParser) -> None:
    """--resume / --overwrite for commands that write a results file (results_io)."""
    p.add_argument("--resume", action="store_true",
                   help="continue the run that wrote --out: skip problems already in it "
                        "(run: except those that ended on an error, which run again; "
                        "refused when model, policy or problem file differ)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out instead of refusing (at the first "
                        "result: a run that cannot start leaves it as it was)")



def add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", choices=("chat", "completions"), default=None,
                   help="API used for math problems (default chat; text-answer problem files "
                        "with 'aliases' always use few-shot completions)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="max completion tokens per solution (task default otherwise)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature for solutions (task default otherwise)")
    p.add_argument("--verify-max-tokens", type=positive_int, default=None,
                   help="max completion tokens per verification, what each one reserves of "
                        "a token budget (task default otherwise)")
    p.add_argument("--verify-temperature", type=non_negative_float, default=None,
                   help="sampling temperature for verifications (default: --temperature's)")
    p.add_argument("--verify-prompt", type=Path, default=None, metavar="FILE",
                   help="verification prompt template: a text file with {problem} and "
                        "{solution}, ending with the Yes/No question")



def add_verifier_args(p: argparse.ArgumentParser) -> None:
    """The verifier as another model and/or endpoint (default: the solver's)."""
    p.add_argument("--verifier-base-url", default=None,
                   help="endpoint serving verifications (default: --base-url)")
    p.add_argument("--verifier-model", default=None,
                   help="model judging solutions (default: --model)")
    p.add_argument("--verifier-api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the verifier's API key "
                        "(default: --api-key-env's)")



def make_task(problems, args):
    """The task for these problems, with the --endpoint/--max-tokens/--temperature overrides."""
    from orchestrator.grading import MathGrader
    from orchestrator.tasks import Task, task_for

    task = task_for(problems)
    overrides = {}
    if args.max_tokens is not None:
        overrides["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        overrides["temperature"] = args.temperature
    overrides.update(verify_overrides(args))
    if args.endpoint is not None and task.endpoint != args.endpoint:
        if not isinstance(task.grader, MathGrader):
            raise ConfigError("text-answer problems (with 'aliases') use the completions "
                              "endpoint; --endpoint chat is not available for them")
        task = Task.math(endpoint=args.endpoint)
    if overrides:
        import dataclasses

        task = dataclasses.replace(task, **overrides)
    return task



def verify_overrides(args) -> dict:
    """Task fields set by --verify-max-tokens, --verify-temperature, --verify-prompt."""
    out: dict = {}
    if getattr(args, "verify_max_tokens", None) is not None:
        out["verify_max_tokens"] = args.verify_max_tokens
    if getattr(args, "verify_temperature", None) is not None:
        out["verify_temperature"] = args.verify_temperature
    path = getattr(args, "verify_prompt", None)
    if path is not None:
        try:
            out["verify_template"] = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--verify-prompt {path}: {exc.strerror or exc}") from None
    return out



def verifier_backend(args, api_key: str, rate_limit=None):
    """An OpenAIBackend for --verifier-base-url/--verifier-model, or None when neither is
    given (verifications then go to the solver's endpoint)."""
    if args.verifier_base_url is None and args.verifier_model is None:
        return None
    from orchestrator.backends.openai_compat import OpenAIBackend

    if args.verifier_api_key_env is not None:
        key = os.environ.get(args.verifier_api_key_env)
        if not key:
            raise ConfigError(f"--verifier-api-key-env {args.verifier_api_key_env}: that "
                              "environment variable is not set or empty")
        api_key = key
    return OpenAIBackend(base_url=args.verifier_base_url or base_urls(args)[0],
                         model=args.verifier_model or args.model, api_key=api_key,
                         timeout=args.timeout, idle_timeout=args.idle_timeout,
                         rate_limit=rate_limit)



def api_key_from(args) -> str:
    """The key named by --api-key-env (a clear error when unset), else $OPENAI_API_KEY,
    else 'EMPTY'."""
    if args.api_key_env is None:
        return os.environ.get("OPENAI_API_KEY") or "EMPTY"
    key = os.environ.get(args.api_key_env)
    if not key:
        raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is "
                          "not set or empty")
    return key



def warn(message: str) -> None:
    """One ``solverify: warning:`` line on stderr, secrets redacted."""
    from orchestrator.redact import redact_text

    print(f"solverify: warning: {redact_text(message)}", file=sys.stderr)
