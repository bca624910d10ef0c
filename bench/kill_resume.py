"""Kill anywhere, resume, lose nothing: the real driver against a scripted LLM and stand-in
train.py/prepare.py, SIGKILLed in every phase of an experiment and restarted with the same tag each time.

    python bench/kill_resume.py [--experiments 200] [--kills 50] [--seed 0]

Each kill is aimed at the phase hit least so far (TARGETS, in turn): the wide phases (start-up,
the LLM call, training, scoring) at a random moment inside them, the narrow ones (applying,
committed, recorded, done = between experiments) by pausing the driver there (AR_TEST_PAUSE).
The phase a kill landed in is read from the dead driver's state file, so the counts are what
happened, not what was aimed at. After each restart has finished an experiment: a kill after the
commit must have been resumed (that same commit scored, not proposed afresh), and every invariant
of tests/driver_helpers.check_invariants holds (one row per experiment commit, statuses, HEAD =
last kept, train.py = HEAD, discarded commits under refs with diffs, the user's files untouched,
no temp files, one submission on disk), plus no process left behind.
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
                            start_agent, state, wait_for_phase)
from fake_llm import FakeLLM

# the driver's phases ("done" = between experiments); start-up = before it wrote this experiment's state
TARGETS = ("start-up", "llm", "applying", "committed", "training", "scoring", "recorded", "done")
PAUSED = {"applying", "committed", "recorded", "done"}  # too narrow to hit at random: the driver waits there
RESUMED = {"applying", "committed", "training", "scoring", "confirming"}  # the restart must run this experiment's commit


def slow_standins(repo: Path) -> None:
    """Give each phase some width, so that kills land inside them."""
    path = repo / "train.py"
    path.write_text(path.read_text().replace("SLEEP_S = 0.0", "SLEEP_S = 0.3"))
    g = git.Repo(repo)
    g.index.add(["train.py"])
    g.index.commit("stand-in train.py sleeps 0.3 s")


def kill_in(repo: Path, url: str, target: str, n: int, rng: random.Random, env: dict) -> tuple[str, dict]:
    """Start the driver, SIGKILL it inside `target` while it runs experiment n; returns the phase it
    died in and its state then."""
    pause = {"AR_TEST_PAUSE": f"{target}:60"} if target in PAUSED else {}
    proc = start_agent(repo, url, **env, **pause)
    try:
        if target == "start-up":
            time.sleep(rng.uniform(0.1, 1.0))  # the driver's own start-up takes about 1.5 s here
        else:
            wait_for_phase(repo, target, timeout=30, experiment=n)
            if target not in PAUSED:
                time.sleep(rng.uniform(0.0, 0.15))  # somewhere inside the phase: 0.3 s wide or more
    except TimeoutError:
        pass  # counted under the phase it was really in
    alive = proc.poll() is None
    kill_agent(proc)
    st = state(repo)
    if not alive:
        return "exited", st
    return (st.get("phase", "start-up") if st.get("experiment") == n else "start-up"), st


def resume_problem(phase: str, st: dict, n: int, restart_log: str, repo: Path) -> str | None:
    """A kill after the experiment's commit must be resumed, not replaced by a fresh proposal."""
    if phase not in RESUMED:
        return None
    if f"resuming experiment {n}" not in restart_log:
        return f"killed in {phase} of experiment {n}: the restart did not resume it"
    rows = ledger(repo)
    commits = rows[rows["experiment"] == n]["commit"].tolist()
    if st.get("commit") and commits[:1] != [st["commit"]]:
        return f"killed in {phase} of experiment {n} (commit {st['commit'][:8]}): its row names {commits[:1]}"
    return None


def run(experiments: int, kills: int, seed: int = 0, workdir: Path | None = None) -> dict:
    rng = random.Random(seed)
    repo = make_research_repo((workdir or Path(tempfile.mkdtemp())) / "research")
    slow_standins(repo)
    llm = FakeLLM(default_factor=lambda: rng.choice([0.97, 1.02, 1.05]), latency=0.3)
    phases, aimed, problems, orphans, resumed = Counter(), Counter(), [], 0, 0
    env = {"STANDIN_EVAL_SLEEP": "0.2"}
    try:
        run_agent(repo, llm.url, "--max-experiments", "0", **env)
        for _ in range(kills):
            target = min(TARGETS, key=lambda t: (phases[t], aimed[t]))  # the phase hit least so far
            aimed[target] += 1
            n = int(ledger(repo)["experiment"].max()) + 1
            phase, st = kill_in(repo, llm.url, target, n, rng, env)
            phases[phase] += 1
            if phase == "exited":
                problems.append(f"the driver exited on its own before the kill aimed at {target}")
            done = run_agent(repo, llm.url, "--max-experiments", "1", **env)
            if done.returncode:
                problems.append(f"restart after a kill in {phase} exited {done.returncode}: {done.stdout[-300:]}")
            problem = resume_problem(phase, st, n, done.stdout, repo)
            problems += [problem] if problem else []
            resumed += phase in RESUMED and not problem
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
    return {"experiments": len(rows) - 1, "kills": kills, "phases": dict(phases), "resumed": resumed,
            "problems": problems, "orphans": orphans, "statuses": rows["status"].value_counts().to_dict(),
            "llm_requests": len(llm.requests)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiments", type=int, default=200)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    result = run(args.experiments, args.kills, args.seed)
    print(header("Kill anywhere, resume, lose nothing"))
    print(f"{result['experiments']} experiments, {result['kills']} SIGKILLs of the driver spread over its phases, "
          f"{time.time() - start:.0f} s; phase at the kill (done = between experiments): {result['phases']}; "
          f"killed after the commit and resumed: {result['resumed']}; statuses: {result['statuses']}; "
          f"LLM requests: {result['llm_requests']}\n")
    print("| kills survived | rows lost | inconsistent states | orphan processes |\n| ---: | ---: | ---: | ---: |")
    print(f"| {result['kills']} | {sum('has 0 ledger rows' in p or 'gaps' in p for p in result['problems'])} | "
          f"{len(result['problems'])} | {result['orphans']} |")
    for problem in result["problems"][:20]:
        print("-", problem)


if __name__ == "__main__":
    main()
