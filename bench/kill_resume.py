"""Kill anywhere, resume, lose nothing: the real driver against a scripted LLM and stand-in
train.py/prepare.py, SIGKILLed at random moments and restarted with the same tag each time.

    python bench/kill_resume.py [--experiments 200] [--kills 50] [--seed 0]

After every restart has finished an experiment, and at the end, every invariant of
tests/driver_helpers.check_invariants is checked (one row per experiment commit, statuses, HEAD =
last kept, train.py = HEAD, discarded commits under refs with diffs, the user's files untouched, no
temp files, one submission on disk), plus no process left behind.
"""
import argparse
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import git

from common import header
from driver_helpers import (check_invariants, kill_agent, ledger, make_research_repo, processes_in, run_agent,
                            start_agent, state)
from fake_llm import FakeLLM


def slow_standins(repo: Path) -> None:
    """Give each phase some width, so that random kills land in all of them."""
    path = repo / "train.py"
    path.write_text(path.read_text().replace("SLEEP_S = 0.0", "SLEEP_S = 0.3"))
    g = git.Repo(repo)
    g.index.add(["train.py"])
    g.index.commit("stand-in train.py sleeps 0.3 s")


def run(experiments: int, kills: int, seed: int = 0, workdir: Path | None = None) -> dict:
    rng = random.Random(seed)
    repo = make_research_repo((workdir or Path(tempfile.mkdtemp())) / "research")
    slow_standins(repo)
    llm = FakeLLM(default_factor=lambda: rng.choice([0.97, 1.02, 1.05]), latency=0.3)
    phases, problems, orphans = Counter(), [], 0
    env = {"STANDIN_EVAL_SLEEP": "0.2"}
    try:
        run_agent(repo, llm.url, "--max-experiments", "0", **env)
        for _ in range(kills):
            proc = start_agent(repo, llm.url, **env)
            time.sleep(rng.uniform(1.5, 5.0))  # the driver's own start-up takes about 1.5 s here
            phases[state(repo).get("phase", "start-up") if proc.poll() is None else "exited"] += 1
            kill_agent(proc)
            done = run_agent(repo, llm.url, "--max-experiments", "1", **env)
            if done.returncode:
                problems.append(f"restart exited {done.returncode}: {done.stdout[-300:]}")
            orphans += len(processes_in(repo))
            problems += check_invariants(repo)
        remaining = experiments - (len(ledger(repo)) - 1)
        if remaining > 0:
            run_agent(repo, llm.url, "--max-experiments", str(remaining), timeout=3600, **env)
        problems += check_invariants(repo)
        orphans += len(processes_in(repo))
    finally:
        llm.close()
    rows = ledger(repo)
    return {"experiments": len(rows) - 1, "kills": kills, "phases": dict(phases), "problems": problems,
            "orphans": orphans, "statuses": rows["status"].value_counts().to_dict(), "llm_requests": len(llm.requests)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiments", type=int, default=200)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    result = run(args.experiments, args.kills, args.seed)
    print(header("Kill anywhere, resume, lose nothing"))
    print(f"{result['experiments']} experiments, {result['kills']} SIGKILLs of the driver at random moments, "
          f"{time.time() - start:.0f} s; phase at the kill: {result['phases']}; statuses: {result['statuses']}; "
          f"LLM requests: {result['llm_requests']}\n")
    print("| kills survived | rows lost | inconsistent states | orphan processes |\n| ---: | ---: | ---: | ---: |")
    print(f"| {result['kills']} | {sum('has 0 ledger rows' in p or 'gaps' in p for p in result['problems'])} | "
          f"{len(result['problems'])} | {result['orphans']} |")
    for problem in result["problems"][:20]:
        print("-", problem)


if __name__ == "__main__":
    main()
