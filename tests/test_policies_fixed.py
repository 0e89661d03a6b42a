"""Fixed baselines on hand-built snapshots."""

import dataclasses

import pytest

from orchestrator.decisions import Sample, Stop, Verify
from orchestrator.errors import ConfigError
from orchestrator.snapshot import BudgetLeft
from orchestrator.testing import make_snapshot
from policies import GenRM, SelfConsistency, parse_policy


class TestSelfConsistency:
    def test_asks_for_all_samples_at_once(self):
        assert SelfConsistency(8).decide(make_snapshot()) == [Sample(8)]

    def test_waits_while_samples_are_in_flight(self):
        assert SelfConsistency(4).decide(make_snapshot(["1", "2"], in_flight=2)) == []

    def test_majority_wins_when_all_are_back(self):
        (stop,) = SelfConsistency(5).decide(make_snapshot(["3", "7", "7", None, "7"]))
        assert isinstance(stop, Stop)
        assert stop.answer == "7" and stop.key == "7"
        assert "3/4" in stop.reason

    def test_votes_grouped_by_canonical_key_not_text(self):
        snap = make_snapshot(["\\frac{1}{2}", "0.5", "2"], keys=["1/2", "1/2", "2"])
        (stop,) = SelfConsistency(3).decide(snap)
        assert stop.key == "1/2" and stop.answer == "\\frac{1}{2}"

    def test_tie_goes_to_the_answer_whose_first_vote_came_first(self):
        (stop,) = SelfConsistency(4).decide(make_snapshot(["9", "4", "4", "9"]))
        assert stop.answer == "9"
        (stop,) = SelfConsistency(4).decide(make_snapshot(["4", "9", "9", "4"]))
        assert stop.answer == "4"

    def test_solutions_without_answer_never_win(self):
        (stop,) = SelfConsistency(3).decide(make_snapshot([None, None, "5"]))
        assert stop.answer == "5"
        (stop,) = SelfConsistency(2).decide(make_snapshot([None, None]))
        assert stop.answer is None and "no solution had an answer" in stop.reason

    def test_replaces_broken_samples_up_to_max_failures(self):
        assert SelfConsistency(4).decide(make_snapshot(["1", "1"], failed=2)) == [Sample(2)]
        policy = SelfConsistency(4, max_failures=1)
        (stop,) = policy.decide(make_snapshot(["1", "1"], failed=2))
        assert isinstance(stop, Stop) and "too many failed" in stop.reason

    def test_stops_on_exhausted_budget_with_what_it_has(self):
        snap = make_snapshot(["2", "2", "3"], budget_left=BudgetLeft(0, None, None))
        (stop,) = SelfConsistency(8).decide(snap)
        assert stop.answer == "2" and "budget exhausted" in stop.reason

    def test_exhausted_budget_waits_for_in_flight(self):
        snap = make_snapshot(["2"], in_flight=3, budget_left=BudgetLeft(0, None, None))
        assert SelfConsistency(8).decide(snap) == []

    @pytest.mark.parametrize("n", [0, -1, 1.5, True])
    def test_rejects_bad_n(self, n):
        with pytest.raises(ConfigError, match="sc: n must be an integer"):
            SelfConsistency(n)


class TestGenRM:
    def test_samples_first(self):
        assert GenRM(4, 2).decide(make_snapshot()) == [Sample(4)]

    def test_verifies_each_answered_solution_as_it_arrives(self):
        snap = make_snapshot(["1", None], in_flight=2)
        decisions = GenRM(4, 3).decide(snap)
        assert decisions == [Verify(snap.solutions[0], 3)]

    def test_does_not_reverify_what_is_in_flight_or_done(self):
        snap = make_snapshot(["1", "2"], scores={0: [0.9]}, verifying={0: 1, 1: 2})
        assert GenRM(2, 2).decide(snap) == []

    def test_broken_verifications_are_not_replaced(self):
        snap = make_snapshot(["1"], scores={0: [0.2]}, failed_verifications={0: 1})
        (stop,) = GenRM(1, 2).decide(snap)
        assert stop.answer == "1" and "0.200" in stop.reason

    def test_best_of_n_by_mean_p_yes(self):
        snap = make_snapshot(["5", "5", "8"],
                             scores={0: [0.2, 0.4], 1: [0.3, 0.3], 2: [0.9, 0.5]})
        (stop,) = GenRM(3, 2).decide(snap)
        assert stop.answer == "8" and stop.key == "8"
        assert "0.700" in stop.reason

    def test_score_tie_goes_to_more_votes_then_earliest(self):
        snap = make_snapshot(["8", "5", "5"], scores={0: [1.0], 1: [1.0], 2: [0.0]})
        (stop,) = GenRM(3, 1).decide(snap)
        assert stop.answer == "5"

    def test_unparsable_verdicts_fall_back_to_vote_visibly(self):
        snap = make_snapshot(["5", "5", "8"], scores={0: [None], 1: [None], 2: [None]})
        (stop,) = GenRM(3, 1).decide(snap)
        assert stop.answer == "5" and "fell back to vote" in stop.reason

    def test_never_verifies_solutions_without_answer(self):
        snap = make_snapshot([None, None])
        (stop,) = GenRM(2, 4).decide(snap)
        assert stop.answer is None


class TestSpecs:
    def test_parse(self):
        assert parse_policy("sc:n=16") == SelfConsistency(16)
        assert parse_policy(" genrm:s=8,v=4 ") == GenRM(8, 4)
        assert parse_policy("sc:n=16").spec == "sc:n=16"

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("", "empty policy spec"),
            ("best:n=3", "unknown policy 'best'.*known policies: ac,.* esc, genrm,.* sc"),
            ("sc", "needs n="),
            ("sc:n=x", "n='x' is not a valid int"),
            ("sc:k=3", "has no parameter 'k'; valid: n, max_failures"),
            ("sc:n=3,n=4", "given twice"),
            ("sc:n", "expected key=value"),
            ("genrm:s=0,v=1", "genrm: s must be an integer >= 1"),
        ],
    )
    def test_bad_specs_say_what_is_valid(self, spec, message):
        with pytest.raises(ConfigError, match=message):
            parse_policy(spec)


class TestRegistry:
    def test_register_before_the_first_parse_keeps_the_builtins(self, monkeypatch):
        import policies.spec as spec

        # a fresh registry, as in a new process where the user registers first
        monkeypatch.setattr(spec, "_REGISTRY", {})
        monkeypatch.setattr(spec, "_BUILTINS_LOADED", False)

        @dataclasses.dataclass(frozen=True)
        class FirstOnly:
            k: int = 2

            def decide(self, s):  # pragma: no cover - never run here
                return []

        spec.register_dataclass("first-only", FirstOnly, "stops at once",
                                helps={"k": "unused"})
        assert parse_policy("first-only:k=5") == FirstOnly(5)
        assert parse_policy("sc:n=3") == SelfConsistency(3)
        names = {e.name for e in spec.registered()}
        assert {"first-only", "sc", "genrm", "ac", "esc", "boinf", "adaptive", "optimal",
                "verify-contested", "solverify"} <= names

    def test_a_user_policy_under_a_builtin_name_wins(self, monkeypatch):
        import policies.spec as spec

        monkeypatch.setattr(spec, "_REGISTRY", {})
        monkeypatch.setattr(spec, "_BUILTINS_LOADED", False)
        spec.register("sc", GenRM, (spec.Param("s", "solutions", int, required=True),
                                    spec.Param("v", "verifications", int, required=True)),
                      "mine")
        assert parse_policy("sc:s=2,v=1") == GenRM(2, 1)

    def test_defaults_and_types_come_from_the_dataclasses(self):
        from policies.spec import registered

        for entry in registered():
            cls = entry.factory if dataclasses.is_dataclass(entry.factory) else None
            if cls is None:  # optimal: a factory in front of the Optimal dataclass
                from policies.optimal import Optimal

                cls = Optimal
            fields = {f.name: f for f in dataclasses.fields(cls)}
            for p in entry.params:
                f = fields[p.arg]
                if f.default is dataclasses.MISSING:
                    assert p.default is None, (entry.name, p.key)
                else:
                    assert p.default == f.default, (entry.name, p.key)
                assert p.help, (entry.name, p.key)
            # every spec-settable field is a parameter
            assert {p.arg for p in entry.params} == {
                f.name for f in fields.values() if f.init and not f.name.startswith("_")}
        # the spec with no parameters is the dataclass with its defaults
        from policies.adaptive import Adaptive
        from policies.literature import AdaptiveConsistency, BestOfInfinity, EarlyStoppingSC

        for name, cls in (("ac", AdaptiveConsistency), ("esc", EarlyStoppingSC),
                          ("boinf", BestOfInfinity), ("adaptive", Adaptive)):
            assert parse_policy(name) == cls()

    def test_all_is_the_size_when_one_is_given(self):
        from policies.literature import AdaptiveConsistency

        assert parse_policy("sc:n=all", size=80) == SelfConsistency(80)
        assert parse_policy("ac:max=all", size=80) == AdaptiveConsistency(max=80)
        assert parse_policy("ac:max=all") == AdaptiveConsistency(max=None)  # no cap
        with pytest.raises(ConfigError, match="pool size"):
            parse_policy("sc:n=all")


class TestSharedPieces:
    def test_failures_allowed_takes_the_first_given_value(self):
        from policies.base import failures_allowed

        assert failures_allowed(2, 16) == 2
        assert failures_allowed(None, 16) == 16
        assert failures_allowed(None, None, 8) == 8  # no cap: the fixed fallback
        assert failures_allowed(0, 16) == 0
        with pytest.raises(ValueError):
            failures_allowed(None, None)

    def test_top_up_counts_in_flight_and_stops_replacing_after_max_failures(self):
        from policies.base import top_up

        assert top_up(make_snapshot(["1"], in_flight=2), 5, 3) == [Sample(2)]
        assert top_up(make_snapshot(["1"], in_flight=4), 5, 3) == []
        assert top_up(make_snapshot(["1"], failed=3), 5, 3) == [Sample(4)]
        assert top_up(make_snapshot(["1"], failed=4), 5, 3) == []

    def test_wait_or_stop_waits_for_samples_and_verifications(self):
        from policies.base import wait_or_stop

        def stop():
            return Stop("1", "done")

        assert wait_or_stop(make_snapshot(["1"], in_flight=1), stop) == []
        assert wait_or_stop(make_snapshot(["1"], verifying={0: 1}), stop) == []
        assert wait_or_stop(make_snapshot(["1"]), stop) == [Stop("1", "done")]


def test_parsing_a_spec_imports_only_that_policys_module():
    """The registry loads a built-in on first use: `solverify run --policy sc:n=8` does not
    import the other policies (nor numpy/scipy through them); listing them loads all."""
    import subprocess
    import sys

    code = ("import sys; import policies.spec as s; s.parse_policy('sc:n=2'); "
            "print(sorted(m for m in ('policies.adaptive', 'policies.literature', "
            "'policies.verifying', 'scipy') if m in sys.modules)); "
            "s.registered(); print('policies.verifying' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"
