"""Several replicas behind one backend: affinity hashing, health, failover, exact ledger."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from orchestrator.backends.base import Capabilities, GenerationRequest
from orchestrator.backends.fake import FakeBackend, FakeReply, scripted
from orchestrator.backends.multi import MultiBackend, rendezvous_order, routing_key
from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.errors import ConfigError, EndpointUnreachable, RequestRejected
from orchestrator.runtime import run_batch
from orchestrator.types import Problem
from policies import GenRM, SelfConsistency
from tests.helpers import ScriptedRequests, WordTask
from tests.openai_server import OpenAIServer
from tests.routerkit import replicas_by_affinity

TASK = WordTask()
NAMES = ["a", "b", "c"]


def test_rendezvous_is_stable_spreads_keys_and_moves_only_the_lost_replicas_keys():
    keys = [f"problem-{i}" for i in range(600)]
    homes = {k: NAMES[rendezvous_order(k, NAMES)[0]] for k in keys}
    assert homes == {k: NAMES[rendezvous_order(k, NAMES)[0]] for k in keys}  # stable
    counts = Counter(homes.values())
    assert set(counts) == set(NAMES) and min(counts.values()) > 150  # roughly even
    two = ["a", "c"]  # "b" is lost
    for k in keys:
        new_home = two[rendezvous_order(k, two)[0]]
        if homes[k] != "b":
            assert new_home == homes[k]  # keys of the surviving replicas stay put


def test_routing_key_prefers_affinity_and_falls_back_to_the_prompt():
    a = GenerationRequest(kind="solve", max_tokens=4, prompt="q")
    assert routing_key(a) == routing_key(GenerationRequest(kind="solve", max_tokens=8, prompt="q"))
    assert routing_key(a) != routing_key(GenerationRequest(kind="solve", max_tokens=4, prompt="r"))
    keyed = GenerationRequest(kind="solve", max_tokens=4, prompt="q", affinity="p7")
    assert routing_key(keyed) == "p7"


def test_bad_configuration_is_a_config_error():
    with pytest.raises(ConfigError):
        MultiBackend([])
    fake = FakeBackend(scripted([FakeReply.text("a x")]))
    with pytest.raises(ConfigError):
        MultiBackend([fake, fake], names=["same", "same"])
    with pytest.raises(ConfigError):
        MultiBackend([fake], names=["a", "b"])


def _replicas(k: int, reply=lambda req, i: FakeReply.text(*["so x"] * req.n)):
    return [FakeBackend(scripted(reply)) for _ in range(k)]


async def test_every_request_of_a_problem_lands_on_one_replica():
    fakes = _replicas(3)
    multi = MultiBackend(fakes, names=NAMES)
    problems = [Problem(id=f"p{i}", problem=f"question {i}") for i in range(30)]
    results = await run_batch(problems, GenRM(4, 2), backend=multi, task=TASK, max_n=1)
    assert all(r.ok and r.answer == "x" for r in results)
    where: dict[str, set[int]] = {}
    for i, fake in enumerate(fakes):
        for req in fake.requests:
            where.setdefault(req.affinity, set()).add(i)
    assert set(where) == {p.id for p in problems}
    assert all(len(replicas) == 1 for replicas in where.values())
    assert len({min(r) for r in where.values()}) == 3  # all replicas got work
    # verifications carry the solution they verify
    verifies = [r for f in fakes for r in f.requests if r.kind == "verify"]
    assert verifies and all(r.verifies is not None for r in verifies)
    # the ledger is the sum of what each replica generated
    assert sum(r.usage.completion_tokens for r in results) == sum(
        f.generated_tokens for f in fakes)


async def test_a_replica_that_cannot_be_reached_is_failed_over_and_skipped_until_cooldown():
    now = [0.0]
    down = FakeBackend(scripted(lambda req, i: FakeReply.text(
        "so x", fail_after=0, error=EndpointUnreachable("connection refused"))))
    up = FakeBackend(scripted(lambda req, i: FakeReply.text(*["so x"] * req.n)))
    multi = MultiBackend([down, up], names=["down", "up"], cooldown=10, clock=lambda: now[0])
    # a key whose home is the unreachable replica
    key = next(f"p{i}" for i in range(100) if rendezvous_order(f"p{i}", ["down", "up"])[0] == 0)
    problems = [Problem(id=key, problem="q")]
    (r,) = await run_batch(problems, SelfConsistency(2), backend=multi, task=TASK, max_n=1)
    assert r.ok and r.answer == "x" and len(r.solutions) == 2 and not r.failed
    assert len(down.requests) == 1  # tried once, then marked down: the second went to "up"
    assert len(up.requests) == 2
    stats = {s["replica"]: s for s in multi.stats()}
    assert stats["down"]["failovers"] == 1 and not stats["down"]["up"]
    now[0] = 11.0  # cooldown over: the home replica is tried first again
    assert multi.order(GenerationRequest(kind="solve", max_tokens=4, prompt="q",
                                         affinity=key))[0] == 0


async def test_a_replica_that_emulates_n_is_failed_over_too():
    """With n emulated by one stream per choice, a replica that cannot be reached failed
    once its stream was being read, after the failover point: the request failed and the
    replica stayed up (found by review). Now the failure comes on opening."""
    from orchestrator.backends.streams import EmulatedN

    down = FakeBackend(scripted(lambda req, i: FakeReply.text(
        "so x", fail_after=0, error=EndpointUnreachable("connection refused"))))
    up = FakeBackend(scripted(lambda req, i: FakeReply.text("so x")))
    multi = MultiBackend([EmulatedN(down, native_n=False), EmulatedN(up, native_n=False)],
                         names=["down", "up"], cooldown=10, clock=lambda: 0.0)
    key = next(f"p{i}" for i in range(100) if rendezvous_order(f"p{i}", ["down", "up"])[0] == 0)
    (r,) = await run_batch([Problem(id=key, problem="q")], SelfConsistency(2), backend=multi,
                           task=TASK)
    assert r.ok and r.answer == "x" and len(r.solutions) == 2 and not r.failed
    assert [x.n for x in up.requests] == [1, 1]
    stats = {s["replica"]: s for s in multi.stats()}
    assert stats["down"]["failovers"] == 1 and not stats["down"]["up"]
    assert stats["up"]["requests"] == 1


async def test_when_every_replica_is_down_the_error_says_so():
    def refuse(req, i):
        return FakeReply.text("x", fail_after=0, error=EndpointUnreachable("refused"))

    multi = MultiBackend(_replicas(2, refuse), names=["a", "b"])
    (r,) = await run_batch([Problem(id="p", problem="q")], SelfConsistency(1), backend=multi,
                           task=TASK)
    assert not r.ok and "every replica failed (2)" in r.error_text and r.stop_code == "error"


async def test_errors_another_replica_cannot_fix_are_not_failed_over():
    bad = _replicas(2, lambda req, i: FakeReply.text(
        "x", fail_after=0, error=RequestRejected("bad request", 400)))
    multi = MultiBackend(bad, names=["a", "b"])
    (r,) = await run_batch([Problem(id="p", problem="q")], SelfConsistency(1), backend=multi,
                           task=TASK)
    assert not r.ok and isinstance(r.error, RequestRejected)
    assert len(bad[0].requests) + len(bad[1].requests) == 1


async def test_a_stream_broken_after_its_first_token_is_a_replaceable_sample_not_a_failover():
    calls = []

    def reply(req, i):
        calls.append(i)
        return FakeReply.text("so x y z", fail_after=2) if i == 0 else FakeReply.text("so x")

    home, other = FakeBackend(scripted(reply)), FakeBackend(scripted(reply))
    multi = MultiBackend([home, other], names=["a", "b"])
    key = next(f"p{i}" for i in range(100) if rendezvous_order(f"p{i}", ["a", "b"])[0] == 0)
    (r,) = await run_batch([Problem(id=key, problem="q")], SelfConsistency(1), backend=multi,
                           task=TASK)
    assert r.ok and r.answer == "x"
    assert len(r.failed) == 1 and r.failed[0].reason == "failed"  # replaced by a new sample
    assert len(home.requests) == 2 and not other.requests  # not moved: the fake break is no
    assert all(s["up"] for s in multi.stats())  # connection loss, so the replica stays up


async def test_probe_and_models_merge_what_every_replica_supports():
    from orchestrator.backends.base import Backend

    class Probed(Backend):
        def __init__(self, caps, models):
            self.caps, self.models = caps, models

        async def probe(self, endpoint="chat"):
            return self.caps

        async def list_models(self):
            return self.models

        async def aclose(self):
            pass

        def stream(self, request):  # pragma: no cover - not used here
            raise NotImplementedError

    class Unreachable(Probed):
        async def probe(self, endpoint="chat"):
            raise EndpointUnreachable("refused")

        async def list_models(self):
            raise EndpointUnreachable("refused")

    multi = MultiBackend([
        Probed(Capabilities(max_top_logprobs=20), ["m", "x"]),
        Probed(Capabilities(n=False, max_top_logprobs=5), ["m"]),
        Unreachable(Capabilities(), []),
    ], names=["a", "b", "c"])
    caps = await multi.probe("completions")
    assert caps.n is False and caps.max_top_logprobs == 5 and caps.logprobs
    assert await multi.list_models() == ["m"]
    assert [s["up"] for s in multi.stats()] == [True, True, False]
    with pytest.raises(EndpointUnreachable, match="no replica"):
        await MultiBackend([Unreachable(None, [])], names=["z"]).list_models()

    class Refusing(Probed):  # a replica with another key: 401
        async def probe(self, endpoint="chat"):
            raise RequestRejected("answered 401: bad key", status_code=401)

    # not a replica that is down but one configured otherwise: raised, named, its status
    # code kept, nothing marked down (the code was lost and both were marked down; review)
    refusing = MultiBackend([Probed(Capabilities(), ["m"]), Refusing(None, ["m"])],
                            names=["a", "b"])
    with pytest.raises(RequestRejected, match="replica b: answered 401") as caught:
        await refusing.probe()
    assert caught.value.status_code == 401
    assert [s["up"] for s in refusing.stats()] == [True, True]


def _counting_responder(body):
    return [[" so", " x"]] * int(body.get("n", 1))


async def test_two_real_servers_affinity_header_exact_ledger_and_a_replica_lost_mid_run():
    async with OpenAIServer(_counting_responder, token_delay=0.0) as s1, \
            OpenAIServer(_counting_responder, token_delay=0.0) as s2:
        backends = [OpenAIBackend(s.url, "test-model", max_attempts=1, cut_grace=0.0,
                                  capabilities=Capabilities())  # no probe tokens
                    for s in (s1, s2)]
        multi = MultiBackend(backends, cooldown=3600)
        problems = [Problem(id=f"p{i}", problem=f"question {i}") for i in range(24)]
        try:
            first = await run_batch(problems[:12], SelfConsistency(3), backend=multi,
                                    task=TASK, max_n=1)
            sent = replicas_by_affinity((s1, s2))
            assert {p.id for p in problems[:12]} <= set(sent)
            assert all(len(v) == 1 for v in sent.values())  # one replica per problem
            assert sum(r.usage.completion_tokens for r in first) == (
                s1.generation_tokens_total + s2.generation_tokens_total)
            # lose replica 1: the rest of the run goes to replica 2, nothing is lost
            before2 = s2.generation_tokens_total
            await s1.stop()
            second = await run_batch(problems[12:], SelfConsistency(3), backend=multi,
                                     task=TASK, max_n=1)
            assert [r.problem.id for r in second] == [p.id for p in problems[12:]]
            assert all(r.ok and r.answer == "x" and len(r.solutions) == 3 for r in second)
            assert sum(r.usage.completion_tokens for r in second) == (
                s2.generation_tokens_total - before2)
            stats = multi.stats()
            assert stats[0]["up"] is False and stats[0]["failovers"] >= 1
        finally:
            await multi.aclose()
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()
                    and not t.done() and "problem" in t.get_name()]


async def test_a_replica_whose_connection_drops_mid_stream_gets_no_new_work():
    async with OpenAIServer(_counting_responder) as s1, OpenAIServer(_counting_responder) as s2:
        backends = [OpenAIBackend(s.url, "test-model", max_attempts=1, cut_grace=0.0,
                                  capabilities=Capabilities()) for s in (s1, s2)]
        multi = MultiBackend(backends, names=["one", "two"], cooldown=3600)
        key = next(f"p{i}" for i in range(100)
                   if rendezvous_order(f"p{i}", ["one", "two"])[0] == 0)
        s1.drop_after(1)  # its first stream is cut after one token
        try:
            # one sample at a time: its stream is cut on "one", the replacement sample
            # must go to "two" (a second stream opened on "one" would, rightly, show it up)
            (r,) = await run_batch([Problem(id=key, problem="q")], SelfConsistency(1),
                                   backend=multi, task=TASK, max_n=1)
        finally:
            await multi.aclose()
        assert r.ok and r.answer == "x" and len(r.solutions) == 1
        assert len(s1.generation_requests()) == 1 and len(s2.generation_requests()) == 1
        assert [f.reason for f in r.failed] == ["failed"]  # the cut stream, replaced
        stats = {s["replica"]: s for s in multi.stats()}
        assert stats["one"]["broken"] == 1 and not stats["one"]["up"]
        # the replacement went to the other replica; the ledger is both servers' sum
        assert r.usage.completion_tokens == s1.generation_tokens_total + s2.generation_tokens_total


async def test_the_cli_spreads_a_run_over_repeated_base_urls(tmp_path):
    import json
    import os
    import sys

    from tests.conftest import REPO
    from tests.openai_server import MathResponder

    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} + 1?",
                                            "answer": str(i + 1)}) + "\n" for i in range(12)))
    out = tmp_path / "out.jsonl"
    async with OpenAIServer(MathResponder()) as s1, OpenAIServer(MathResponder()) as s2:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orchestrator.cli", "run", "--base-url", s1.url,
            "--base-url", s2.url, "--model", "test-model", "--problems", str(problems),
            "--policy", "sc:n=2", "--out", str(out), "--no-progress", cwd=REPO,
            env={**os.environ, "SOLVERIFY_LOG": "warning"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(12))
        where = replicas_by_affinity((s1, s2))
        assert {min(v) for v in where.values()} == {0, 1}  # both replicas got problems
        assert all(len(v) == 1 for v in where.values())  # each problem on one
        assert f"{s1.url}, {s2.url}" in stderr.decode()  # the endpoint line names both



# ---- a failed-over emulated n: what the given-up attempt streamed is charged ------------
class _Replica(ScriptedRequests):
    """A replica serving emulated-n streams of 10 one-token deltas. ``fail_first``: its
    first stream waits until the second is open, then fails on opening (retries spent),
    while the second hands over its first delta in that loop turn."""

    def __init__(self, fail_first: bool) -> None:
        super().__init__()
        self.fail_first = fail_first
        self.both_open = asyncio.Event()

    async def opening(self, index: int) -> None:
        from orchestrator.errors import RetriesExhausted

        if self.fail_first:
            if index == 1:
                self.both_open.set()
            await self.both_open.wait()
            if index == 0:
                raise RetriesExhausted("503 x4")
            for _ in range(3):
                await asyncio.sleep(0)

    async def events(self, index: int):
        from orchestrator.backends.base import TextDelta, UsageReport

        for i in range(10):
            await asyncio.sleep(0)
            self.generated += 1
            yield TextDelta(0, f" w{i}", 1, finish_reason="stop" if i == 9 else None)
            yield UsageReport(5, i + 1, final=False)
        yield UsageReport(5, 10, final=True)


async def test_a_failed_over_emulated_n_charges_what_the_given_up_attempt_streamed():
    """Choice 0 of an emulated n fails on opening on the home replica while choice 1 has
    streamed a token; the request is failed over and served whole by the other replica.
    The token choice 1 had streamed was handed to the reader unread and applied after the
    served stream, when choice 1 was finished: dropped, and its count overwrote the
    prompt (found by review). It is charged on top now, flagged."""
    from orchestrator.backends.streams import EmulatedN
    from orchestrator.decisions import Sample, Stop
    from orchestrator.runtime import solve

    class Two:
        spec = "two"

        def decide(self, s):
            if len(s.solutions) >= 2 or s.failed:
                return [Stop(s.solutions[0].answer if s.solutions else None, "done")]
            return [] if s.samples_launched else [Sample(2)]

    failing, healthy = _Replica(True), _Replica(False)
    names = ["A", "B"] if rendezvous_order("p", ["A", "B"])[0] == 0 else ["B", "A"]
    multi = MultiBackend([EmulatedN(failing, native_n=False),
                          EmulatedN(healthy, native_n=False)], names=names)
    result = await solve(Problem(id="p", problem="q"), Two(), backend=multi, task=WordTask())
    assert failing.generated >= 1 and healthy.generated == 20
    usage = result.usage
    assert usage.completion_tokens == failing.generated + healthy.generated
    assert usage.prompt_tokens == 10  # the served stream's two choices, 5 each
    assert "abandoned" in usage.estimated_from
