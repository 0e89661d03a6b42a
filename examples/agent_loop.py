"""An agent that calls ``await solve(...)`` inside its own loop.

The agent plans a trip through a few countries. For each stop it needs a fact (the capital
city) it cannot look up, so it asks the model through solverify with a small token budget
and an adaptive policy; it reads the answer, the reason the policy stopped and the cost,
and escalates once — a bigger budget, a stricter policy — when the first answer was not
settled. At the end it reports what the facts cost it.

Runs against the bundled CPU vLLM (started and stopped here; provisioned on first use) or
any OpenAI-compatible endpoint:

    python examples/agent_loop.py                         # bundled Gemma-3-270M on CPU
    python examples/agent_loop.py --base-url http://127.0.0.1:8000/v1 --model NAME
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from dataclasses import dataclass

from orchestrator import Budget, Problem, SolverifyError, solve
from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.tasks import Task
from policies import parse_policy

TRIP = ("Portugal", "Hungary", "Chile", "Vietnam", "Norway", "Egypt")


@dataclass
class Ledger:
    """What the agent spent on facts."""

    tokens: int = 0
    requests: int = 0
    escalations: int = 0


async def capital_of(country: str, backend: OpenAIBackend, task: Task, ledger: Ledger
                     ) -> tuple[str | None, str]:
    """One tool call of the agent: ask, and escalate once if the answer is not settled."""
    problem = Problem(id=f"capital-{country.lower()}", problem=f"What is the capital of {country}?")
    attempts = (
        ("adaptive:width=4,confidence=0.85,max=16", Budget(tokens=96)),
        ("adaptive:width=8,confidence=0.95,max=32", Budget(tokens=384)),
    )
    answer, why = None, "not asked"
    for i, (spec, budget) in enumerate(attempts):
        result = await solve(problem, parse_policy(spec), budget, backend, task=task)
        ledger.tokens += result.usage.completion_tokens
        ledger.requests += result.requests
        answer, why = result.answer, result.reason
        settled = result.answer is not None and "budget exhausted" not in result.reason
        if settled:
            break
        if i == 0:
            ledger.escalations += 1
    return answer, why


async def plan_trip(backend: OpenAIBackend) -> int:
    task = Task.short_answer()  # few-shot completions prompt: the bundled model is a base model
    ledger = Ledger()
    itinerary = []
    for country in TRIP:  # the agent's own loop: each step uses the previous step's result
        capital, why = await capital_of(country, backend, task, ledger)
        stop = capital or f"somewhere in {country}"
        itinerary.append(stop)
        print(f"{country:10s} -> {stop:20s} ({why})")
    print("\nroute: " + " -> ".join(itinerary))
    print(f"facts cost {ledger.tokens} completion tokens in {ledger.requests} requests "
          f"({ledger.escalations} escalation(s))")
    return 0


async def main(argv: list[str] | None = None) -> int:
    import logging

    import structlog  # an application may configure logging; the library never does

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint (default: start the "
                                           "bundled CPU vLLM)")
    parser.add_argument("--model", help="model name at --base-url")
    args = parser.parse_args(argv)
    if bool(args.base_url) != bool(args.model):
        parser.error("--base-url and --model go together")
    async with contextlib.AsyncExitStack() as stack:
        if args.base_url:
            base_url, model = args.base_url, args.model
        else:
            from orchestrator.serve import VLLMServer, provision

            provision(progress=lambda line: print(line, file=sys.stderr))
            server = await stack.enter_async_context(VLLMServer())
            base_url, model = server.base_url, server.model_name
        backend = await stack.enter_async_context(OpenAIBackend(base_url=base_url, model=model))
        return await plan_trip(backend)
    return 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except SolverifyError as exc:
        print(f"agent_loop: error: {exc}", file=sys.stderr)
        sys.exit(2)
