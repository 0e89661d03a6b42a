"""Start-up CPU: ``solverify run`` on one problem against ``python -c "import openai"``.

    python -m benchmarks.startup [--rounds 7] [--policy sc:n=1] [--json OUT] [--imports]
                                 [--python PY]

Each round runs, one after the other, ``python -c "import openai"`` and a whole
``solverify run`` of one maths problem (answer ``42``) against the local test server
(``tests/openai_server.py`` in its own process, started once; run from a checkout), and
measures each child's CPU time (user + system, from ``resource.getrusage`` of the
children). The ratio printed is the median over rounds of run / import. ``--imports``
also prints the ten slowest imports of ``solverify run``'s process (``-X importtime``).
``--python PY`` runs both children with another interpreter, e.g. that of a venv with
only ``pip install solverify`` (what a user has: no aiohttp, no dev tools), while the test
server stays in this one (it needs aiohttp); the children then run outside the checkout,
so they import the solverify installed there.
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
                        help="also list the slowest top-level imports of the run")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter of the measured children (default: this one)")
    args = parser.parse_args(argv)

    # an absolute path: the children may run elsewhere (below); a bare name is looked up
    python = os.path.abspath(shutil.which(args.python) or args.python)
    solverify = str(Path(python).with_name("solverify"))
    if not Path(solverify).exists():  # checked before the server is started
        raise SystemExit(f"no solverify command beside {python}")
    server = ServerProcess(tokens=None)
    with tempfile.TemporaryDirectory() as tmp:
        problems = Path(tmp) / "one.jsonl"
        problems.write_text(json.dumps(PROBLEM) + "\n")
        out = Path(tmp) / "out.jsonl"
        env = dict(os.environ)
        run = [python, solverify, "run", "--base-url", server.url, "--model",
               "test-model", "--problems", str(problems), "--policy", args.policy,
               "--out", str(out), "--overwrite", "--no-progress"]
        importing = [python, "-c", "import openai"]
        try:
            server.wait_ready()
            other = os.path.realpath(python) != os.path.realpath(sys.executable)
            cwd = tmp if other else None  # another interpreter: outside the checkout
            _child_cpu(importing, env, cwd)  # warm the file cache for both
            _child_cpu(run, env, cwd)
            times: dict[str, list[float]] = {"import openai": [], "solverify run": []}
            for _ in range(args.rounds):
                times["import openai"].append(_child_cpu(importing, env, cwd))
                times["solverify run"].append(_child_cpu(run, env, cwd))
            answered = json.loads(out.read_text().splitlines()[-1])
            imports = _slowest_imports(run, env, 10) if args.imports else []
        finally:
            server.stop()
    ratios = [r / i for r, i in zip(times["solverify run"], times["import openai"],
                                    strict=True)]
    load = os.getloadavg()
    for name, values in times.items():
        print(f"{name:>14}: median {statistics.median(values):.3f} s CPU "
              f"(rounds: {', '.join(f'{v:.3f}' for v in values)})")
    print(f"         ratio: median {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"the run answered {answered.get('answer')!r} (correct: {answered.get('correct')})")
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} CPUs")
    if imports:
        print("slowest top-level imports of the run:\n" + "\n".join(imports))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "rounds": args.rounds, "policy": args.policy, "cpu_s": times,
            "ratios": ratios, "median_ratio": statistics.median(ratios),
            "loadavg_after": load, "cpus": os.cpu_count()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
