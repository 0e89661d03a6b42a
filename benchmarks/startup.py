"""Start-up CPU: ``solverify run`` on one problem against ``python -c "import openai"``.

    python -m benchmarks.startup [--rounds 7] [--policy sc:n=1] [--json OUT] [--imports]
                                 [--python PY [--python PY2 ...]]

Each round runs, one after the other, ``python -c "import openai"`` and a whole
``solverify run`` of one maths problem (answer ``42``) against the local test server
(``tests/openai_server.py`` in its own process, started once; run from a checkout), and
measures each child's CPU time (user + system, from ``resource.getrusage`` of the
children). The ratio printed is the median over rounds of run / import. ``--imports``
also prints the ten slowest imports of ``solverify run``'s process (``-X importtime``).
``--python PY`` runs both children with another interpreter, e.g. that of a venv with
only ``pip install solverify`` (what a user has: no aiohttp, no dev tools), while the test
server stays in this one (it needs aiohttp); the children then run outside the checkout,
so they import the solverify installed there. Given more than once (e.g. venvs of two
commits), each round runs ``import openai`` in each interpreter, then each one's run, in
an order that alternates between rounds, and each run's ratio is to its own
interpreter's import. A run that does not answer correctly makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.client_cpu import ServerProcess

PROBLEM = {"id": "p1", "problem": "What is 6 * 7?", "answer": "42"}


def _child_cpu(argv: Sequence[str], env: dict[str, str] | None = None,
               cwd: str | None = None) -> float:
    """CPU seconds (user + system) of one child process run to its end; it must exit 0."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                          cwd=cwd,
                          check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n"
                         f"{done.stderr.decode(errors='replace')[-2000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _slowest_imports(argv: Sequence[str], env: dict[str, str], count: int) -> list[str]:
    done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=True)
    rows = []
    for line in done.stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            if cumulative.strip().isdigit():
                rows.append((int(cumulative), name.rstrip()))
    top = [(us, name) for us, name in rows if not name.startswith("  " * 2)]
    top.sort(reverse=True)
    return [f"{us / 1e3:8.1f} ms  {name.strip()}" for us, name in top[:count]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--policy", default="sc:n=1")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--imports", action="store_true",
                        help="also list the slowest top-level imports of the (first) run")
    parser.add_argument("--python", action="append", default=None,
                        help="the interpreter of the measured children (default: this one); "
                             "give it more than once to compare installs side by side")
    args = parser.parse_args(argv)

    # absolute paths: the children may run elsewhere (below); a bare name is looked up
    pythons = [os.path.abspath(shutil.which(p) or p) for p in args.python or [sys.executable]]
    if len(set(pythons)) != len(pythons):
        raise SystemExit("--python: each interpreter once")
    for python in pythons:  # checked before the server is started
        if not Path(python).with_name("solverify").exists():
            raise SystemExit(f"no solverify command beside {python}")
    server = ServerProcess(tokens=None)
    with tempfile.TemporaryDirectory() as tmp:
        problems = Path(tmp) / "one.jsonl"
        problems.write_text(json.dumps(PROBLEM) + "\n")
        out = Path(tmp) / "out.jsonl"
        env = dict(os.environ)

        def run(python: str) -> list[str]:
            return [python, str(Path(python).with_name("solverify")), "run", "--base-url",
                    server.url, "--model", "test-model", "--problems", str(problems),
                    "--policy", args.policy, "--out", str(out), "--overwrite",
                    "--no-progress"]

        def importing(python: str) -> list[str]:
            return [python, "-c", "import openai"]

        def cwd(python: str) -> str | None:  # another interpreter: outside the checkout
            return tmp if os.path.realpath(python) != os.path.realpath(sys.executable) else None

        times: dict[str, dict[str, list[float]]] = {
            p: {"import openai": [], "solverify run": []} for p in pythons}
        answers = []
        try:
            server.wait_ready()
            for python in pythons:  # warm the file cache (and bytecode) for each
                _child_cpu(importing(python), env, cwd(python))
                _child_cpu(run(python), env, cwd(python))
            for i in range(args.rounds):
                # each interpreter's import, then the runs, in an order that alternates
                for python in pythons:
                    times[python]["import openai"].append(
                        _child_cpu(importing(python), env, cwd(python)))
                for python in (pythons if i % 2 == 0 else pythons[::-1]):
                    times[python]["solverify run"].append(
                        _child_cpu(run(python), env, cwd(python)))
                    answers.append(json.loads(out.read_text().splitlines()[-1]))
            imports = _slowest_imports(run(pythons[0]), env, 10) if args.imports else []
        finally:
            server.stop()
    load = os.getloadavg()
    figures = {}
    for python in pythons:
        t = times[python]
        ratios = [r / i for r, i in zip(t["solverify run"], t["import openai"], strict=True)]
        figures[python] = {"cpu_s": t, "ratios": ratios,
                           "median_ratio": statistics.median(ratios)}
        if len(pythons) > 1:
            print(f"{python}:")
        for name, values in t.items():
            print(f"{name:>14}: median {statistics.median(values):.3f} s CPU "
                  f"(rounds: {', '.join(f'{v:.3f}' for v in values)})")
        print(f"         ratio: median {statistics.median(ratios):.2f} "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    wrong = [a for a in answers if not a.get("correct")]
    print(f"the runs answered {sorted({str(a.get('answer')) for a in answers})} "
          f"({len(answers) - len(wrong)} of {len(answers)} correct)")
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} CPUs")
    if imports:
        print("slowest top-level imports of the run:\n" + "\n".join(imports))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "rounds": args.rounds, "policy": args.policy, "pythons": figures,
            "loadavg_after": load, "cpus": os.cpu_count()}, indent=2) + "\n")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
