"""The runtime's public face: :func:`solve` runs one problem under a policy,
:func:`run_batch` many.

It is built from small parts, each testable on its own:

* :mod:`orchestrator.loop` — the decision loop of one problem (snapshots, decisions,
  solutions and verifications, what did not finish);
* :mod:`orchestrator.reader` — one request's stream read into the ledger, and the
  *settled cut* that makes a stopped stream's charge equal the server's count
  ("Cutting a stream exactly" there);
* :mod:`orchestrator.ledger` — accounting and admission: every budget question (room
  left, how many samples fit, which cap refused) is answered there, the run's shared
  :class:`~orchestrator.ledger.RunBudget` included;
* :mod:`orchestrator.limiter` — the run-wide request limits (:class:`Limiter`);
* :mod:`orchestrator.result` — :class:`SolveResult`.

When ``solve`` returns, no task it started is still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from orchestrator.backends.base import Backend
from orchestrator.defaults import MAX_N
from orchestrator.errors import ConfigError, SolverifyError
from orchestrator.events import Sink
from orchestrator.history import RunHistory
from orchestrator.ledger import RunBudget
from orchestrator.limiter import DEFAULT_CONCURRENCY, Limiter
from orchestrator.loop import FATAL_ERRORS, ProblemRun, first_exception, verify_reservation
from orchestrator.protocols import Policy, Task, policy_verifies
from orchestrator.result import SolveResult, policy_name
from orchestrator.types import UNLIMITED, Budget, Problem

#: largest ``n`` put in one request; bigger ``Sample(k)`` are split
DEFAULT_MAX_N = MAX_N


def check_budget_fits(policy: Policy, budget: Budget, task: Task, problem: Problem,
                      run_tokens: int | None = None) -> None:
    """A ``ConfigError`` when a token cap cannot hold even one request of a kind the
    policy needs: one solution sample (every policy), one verification (a policy that
    declares ``verifies``). Checked before any request is sent."""
    sample = task.solve_request(problem, 1).max_tokens
    verify = verify_reservation(task) if policy_verifies(policy) else None
    for what, cap, flag in (("token budget", budget.tokens, "--budget-tokens"),
                            ("run token budget", run_tokens, "--run-budget-tokens")):
        if cap is None:
            continue
        if cap < sample:
            raise ConfigError(
                f"a {what} of {cap} completion tokens cannot hold one solution request "
                f"(it reserves max_tokens={sample}); raise {flag} or lower --max-tokens")
        if verify is not None and cap < verify:
            raise ConfigError(
                f"policy {policy_name(policy)} verifies, and a {what} of {cap} completion "
                f"tokens cannot hold one verification request (it reserves "
                f"verify_max_tokens={verify}); raise {flag} or lower --verify-max-tokens")


def check_backend(backend: object, what: str = "backend") -> None:
    """A ``ConfigError`` unless ``backend`` has every member of the Backend protocol."""
    if not isinstance(backend, Backend):
        raise ConfigError(
            f"{what} {backend!r} is not a Backend: it needs stream(request), aclose() and "
            "cut_grace; subclass orchestrator.backends.base.Backend to inherit the default "
            "cut_grace = 0")


def as_problem(problem: Problem | str) -> Problem:
    if isinstance(problem, Problem):
        return problem
    if isinstance(problem, str):
        if not problem.strip():
            raise ConfigError("problem text is empty")
        return Problem(id="problem", problem=problem)
    raise ConfigError(f"problem must be a Problem or a str, got {type(problem).__name__}")


async def solve(
    problem: Problem | str,
    policy: Policy,
    budget: Budget | None = None,
    backend: Backend | None = None,
    *,
    task: Task | None = None,
    limiter: Limiter | None = None,
    sinks: Sequence[Sink] = (),
    max_n: int = DEFAULT_MAX_N,
    run_budget: RunBudget | None = None,
    history: RunHistory | None = None,
    verifier: Backend | None = None,
) -> SolveResult:
    """Answer one problem under ``policy`` within ``budget`` using ``backend``.

    ``task`` (prompts, grader, verifier) defaults to :func:`orchestrator.tasks.task_for`
    on this problem. A fatal backend error (unreachable endpoint, unknown model, rejected
    request) ends the problem with ``result.error`` set rather than raising, so batch runs
    keep every result; a policy bug raises :class:`PolicyError`. ``history`` (a
    :class:`~orchestrator.history.RunHistory`) is what earlier problems of the same run
    looked like: the snapshot shows it to the policy, and this problem is added to it
    when it finishes. ``verifier`` serves the verification requests (another model or
    endpoint; default: ``backend``); the measured λ (``result.lam``) is then the
    verifier's tokens per verification over the solver's per solution.

    A token cap that cannot hold one solution request (or one verification, for a
    policy that ``verifies``) is a ``ConfigError`` before any request is sent.
    """
    if backend is None:
        raise ConfigError("solve() needs a backend (e.g. OpenAIBackend(base_url=..., model=...))")
    check_backend(backend)
    if verifier is not None:
        check_backend(verifier, "verifier")
    if not callable(getattr(policy, "decide", None)):
        raise ConfigError(f"policy {policy!r} has no decide(snapshot) method")
    if max_n < 1:
        raise ConfigError(f"max_n must be >= 1, got {max_n}")
    prob = as_problem(problem)
    if task is None:
        from orchestrator.tasks import task_for

        task = task_for([prob])
    budget = budget or UNLIMITED
    check_budget_fits(policy, budget, task, prob,
                      run_budget.tokens if run_budget is not None else None)
    run = ProblemRun(prob, policy, budget, backend, task,
                     limiter or Limiter(), sinks, max_n, run_budget, history, verifier)
    return await run.run()


async def run_batch(
    problems: Sequence[Problem],
    policy: Policy,
    budget: Budget | None = None,
    backend: Backend | None = None,
    *,
    task: Task | None = None,
    concurrency: int | None = DEFAULT_CONCURRENCY,
    rate: float | None = None,
    problems_in_flight: int | None = None,
    sinks: Sequence[Sink] = (),
    on_result: Callable[[SolveResult], None] | None = None,
    max_n: int = DEFAULT_MAX_N,
    run_tokens: int | None = None,
    verifier: Backend | None = None,
    keep_results: bool = True,
) -> list[SolveResult]:
    """Run many problems concurrently; results come back in input order.

    ``concurrency`` caps requests in flight across the whole batch, ``rate`` caps the
    requests it launches per second (a request for n samples counts once; to cap HTTP
    requests, retries included, give the backends one shared ``rate_limit`` throttler
    instead, as the CLI's ``--rate`` does), ``problems_in_flight`` caps problems started
    at once (default: as many as ``concurrency``). ``on_result`` is called as each
    problem finishes (write results as they come, so none are lost if the run is
    interrupted). A problem that ends on a
    fatal backend error is returned with ``error`` set; it does not stop the others.
    The problems share one :class:`~orchestrator.history.RunHistory` (``snapshot.history``).
    ``verifier``: as in :func:`solve`. Budgets too small for one request: a
    ``ConfigError`` before any problem starts. A problem's task is made only when it may
    start; with ``keep_results=False`` results go to ``on_result`` alone (a run that writes
    them as they come need not hold them all) and the returned list is empty. A bug in
    user code raises as itself, as in :func:`solve`.
    """
    if not problems:
        raise ConfigError("run_batch() got no problems")
    if task is None:
        from orchestrator.tasks import task_for

        task = task_for(problems)
    check_budget_fits(policy, budget or UNLIMITED, task, problems[0], run_tokens)
    limiter = Limiter(concurrency, rate)
    shared = RunBudget(run_tokens) if run_tokens is not None else None
    history = RunHistory()
    results: list[SolveResult | None] | None = [None] * len(problems) if keep_results else None
    queue = iter(enumerate(problems))

    def start_next(tg: asyncio.TaskGroup) -> None:
        """Start the next problem (a task is made only when a problem may start)."""
        item = next(queue, None)
        if item is not None:
            i, prob = item
            tg.create_task(one(tg, i, prob), name=f"problem:{prob.id}")

    async def one(tg: asyncio.TaskGroup, i: int, prob: Problem) -> None:
        result = await solve(prob, policy, budget, backend, task=task, limiter=limiter,
                             sinks=sinks, max_n=max_n, run_budget=shared,
                             history=history, verifier=verifier)
        start_next(tg)
        if results is not None:
            results[i] = result
        if on_result is not None:
            on_result(result)

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(problems_in_flight or concurrency or len(problems),
                               len(problems))):
                start_next(tg)
    except BaseExceptionGroup as group:  # a problem raised (user code): as itself
        first = first_exception(group)
        raise first from first.__cause__
    return [r for r in results if r is not None] if results is not None else []


__all__ = ["DEFAULT_CONCURRENCY", "DEFAULT_MAX_N", "FATAL_ERRORS", "Limiter", "SolveResult",
           "SolverifyError", "as_problem", "check_budget_fits", "policy_name", "run_batch",
           "solve"]
