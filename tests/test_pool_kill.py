"""Issue 13: `--workers 2` on a real local Ray instance, killed mid-run (the driver, or one Ray worker), and
the kill-and-resume invariants of the one-GPU night still hold.

1. The driver's process group is SIGKILLed while two experiments train: the Ray instance it started goes
   with it (nothing of its session is left), the restarted driver runs both again from their state files
   without asking the LLM again, and the ledger and branch are as if nothing happened.
2. One Ray worker (the ray::run_experiment process whose train.py is running) is SIGKILLed: a crash row says
   the worker was lost and names the rerun, the rerun scores the same commit, the lost run's train.py does
   not outlive its worker, the night finishes.
"""
import os
import re
import signal
import time
from pathlib import Path

import git
import psutil
import pytest

from driver import pool
from conftest import REQUIRE_ASSETS
from driver_helpers import GO_LINE, TAG, check_invariants, edit, inflight, ledger, processes_in, run_agent, start_agent

try:
    import ray  # noqa: F401
    RAY_MISSING = ""
except ImportError as exc:
    RAY_MISSING = f"Ray is not installed ({exc}): pip install -r requirements-cluster.txt"

if RAY_MISSING and REQUIRE_ASSETS:
    pytest.fail(RAY_MISSING + " (AR_REQUIRE_ASSETS=1)", pytrace=False)
pytestmark = pytest.mark.skipif(bool(RAY_MISSING), reason=RAY_MISSING)

ARGS = ("--workers", "2", "--timeout", "120")  # the limit of a held run covers its neighbour's start-up


def slow(repo: Path, seconds: float) -> None:
    path = repo / "train.py"
    path.write_text(path.read_text().replace("SLEEP_S = 0.0", f"SLEEP_S = {seconds}"))
    g = git.Repo(repo)
    g.index.add(["train.py"])
    g.index.commit(f"stand-in train.py sleeps {seconds} s")


def two_held(go: Path) -> list[str]:
    """Two proposals that wait for `go` (two different commits): both train.py run at once however late the second
    one starts on a loaded machine, until the test writes it."""
    return [edit(GO_LINE, f'GO_FILE = "{go}"  # proposal {k}', f"proposal {k}, held") for k in (1, 2)]


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def trainers(repo: Path) -> dict[int, psutil.Process]:
    """The running train.py of each experiment of this repo (by its worktree's path)."""
    found = {}
    runs = repo.resolve() / "runs" / TAG
    for p in psutil.process_iter(["cmdline"]):
        for arg in p.info["cmdline"] or []:
            if arg.endswith("/tree/train.py") and Path(arg).parent.parent.parent == runs and alive(p):
                found[int(Path(arg).parent.parent.name)] = p
    return found


def session_of(pid: int) -> list[psutil.Process]:
    """What is left of the session the driver led (start_agent starts it as a session leader): Ray's
    gcs_server, raylet, agents and workers all inherit it, even those in process groups of their own."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == pid and alive(p):
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


def describe(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return out


def wait_until(what: str, check, timeout: float, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pool_problems(repo: Path) -> list[str]:
    """The promises of a --workers night: one row per (experiment, commit, description), no gaps in the
    numbers, every keep on the branch, the branch a chain of kept commits, nothing left in flight."""
    problems = []
    rows = ledger(repo)
    g = git.Repo(repo)
    branch = f"autoresearch/{TAG}"
    if rows.duplicated(subset=["experiment", "commit", "description"]).any():
        problems.append(f"duplicate rows: {rows[rows.duplicated(subset=['experiment', 'commit', 'description'])]}")
    numbers = sorted(set(rows["experiment"].dropna().astype(int)))
    if numbers != list(range(len(numbers))):
        problems.append(f"experiment numbers with gaps: {numbers}")
    kept = rows[rows["status"].isin(["baseline", "keep"])]
    for commit in kept["commit"]:
        try:
            g.git.merge_base("--is-ancestor", commit, branch)
        except git.GitCommandError:
            problems.append(f"kept commit {commit[:8]} is not on {branch}")
    keeps = list(dict.fromkeys(rows[rows["status"] == "keep"]["commit"]))  # a confirmation repeats its commit
    previous = kept.iloc[0]["commit"] if len(kept) else None
    for commit in keeps:
        parents = [p.hexsha for p in g.commit(commit).parents]
        if parents != [previous]:
            problems.append(f"kept commit {commit[:8]} has parents {[p[:8] for p in parents]}, not the previous kept "
                            f"commit {str(previous)[:8]}")
        previous = commit
    if previous and g.commit(branch).hexsha != previous:
        problems.append(f"{branch} is at {g.commit(branch).hexsha[:8]}, not at the last kept commit {previous[:8]}")
    worktrees = [line for line in g.git.worktree("list", "--porcelain").splitlines() if line.startswith("worktree ")]
    if len(worktrees) != 1:
        problems.append(f"leftover worktrees: {worktrees[1:]}")
    if inflight(repo):
        problems.append(f"state files left in flight: {sorted(inflight(repo))}")
    refs = g.git.for_each_ref("--format=%(refname)", f"refs/autoresearch/{TAG}/inflight/")
    if refs:
        problems.append(f"in-flight refs left: {refs.split()}")
    if (repo / "train.py").read_text() != g.commit(branch).tree["train.py"].data_stream.read().decode():
        problems.append("the checkout's train.py differs from the branch head's")
    if (repo / "README.md").read_text() != "committed readme\nthe user's uncommitted line\n":
        problems.append("the user's uncommitted README.md change was lost")
    if (repo / "notes.txt").read_text() != "the user's untracked notes\n":
        problems.append("the user's untracked notes.txt changed")
    return problems


def test_driver_killed_with_two_in_flight_resumes_both_without_the_llm(repo, llm, tmp_path):
    go = tmp_path / "go"  # written after the kill: what ends both runs is the kill, not their own end
    llm.push(*two_held(go))
    proc = start_agent(repo, llm.url, *ARGS, "--max-experiments", "2")
    try:
        states = wait_until("two experiments in flight", lambda: len(seen := inflight(repo)) >= 2 and seen, 60, proc)
        running = wait_until("both train.py running", lambda: len(seen := trainers(repo)) >= 2 and seen, 30, proc)
        states = inflight(repo)
        asked = len(llm.requests)
        os.killpg(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first_log = proc.stdout.read()
    assert "2 in flight" in first_log, first_log
    assert sorted(states) == sorted(running), (states, running)
    assert all(st["kind"] == "proposal" for st in states.values()), states

    # what the killed driver started goes with it: Ray's processes (same session), the runs' train.py
    def leftovers():
        return session_of(proc.pid) + [p for p in running.values() if alive(p)]
    end = time.time() + 4
    while leftovers() and time.time() < end:
        time.sleep(0.1)
    left = describe(leftovers())
    assert not left, f"{time.time() - killed_at:.1f} s after the driver's SIGKILL, still running: {left}"

    go.write_text("")  # the resumed runs of the same commits end
    done = run_agent(repo, llm.url, *ARGS, "--max-experiments", "1", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout + done.stderr
    for n in states:
        assert f"resuming experiment {n}" in out, out
    # the resumed ones asked nothing (their prompts are as the killed driver left them); the one new experiment
    # asked at least once (again when a keep overtook its proposal: pool.MAX_ASKS in all)
    for n in states:
        assert all(p.stat().st_mtime < killed_at for p in (repo / "runs" / TAG / str(n)).glob("prompt*.json"))
    assert asked + 1 <= len(llm.requests) <= asked + pool.MAX_ASKS, (asked, len(llm.requests), out)
    assert out.count("asking again") == len(llm.requests) - asked - 1, out
    rows = ledger(repo)
    for n, st in states.items():
        mine = rows[rows["experiment"] == n]
        assert len(mine) and set(mine["commit"]) == {st["commit"]}, (n, st, mine)
        assert set(mine["status"]) <= {"keep", "discard"}, mine
    assert rows["experiment"].max() == max(states) + 1, rows
    assert pool_problems(repo) == []
    assert check_invariants(repo) == []
    assert processes_in(repo) == []
    assert not session_of(proc.pid)


def test_a_lost_worker_is_recorded_and_its_commit_runs_again(repo, llm, tmp_path):
    go = tmp_path / "go"
    llm.push(*two_held(go))
    proc = start_agent(repo, llm.url, "--workers", "2", "--timeout", "120", "--max-experiments", "2")
    try:
        running = wait_until("both train.py running", lambda: len(seen := trainers(repo)) >= 2 and seen, 120, proc)
        n = min(running)
        victim = running[n]
        worker = victim.parent()
        assert "ray::run_experiment" in " ".join(worker.cmdline()), describe([worker])
        commit = inflight(repo)[n]["commit"]
        worker.send_signal(signal.SIGKILL)

        def crash_row():
            if not (repo / "results.tsv").exists():
                return None
            rows = ledger(repo)
            mine = rows[(rows["experiment"] == n) & (rows["status"] == "crash")]
            return mine.iloc[0].to_dict() if len(mine) else None
        row = wait_until(f"experiment {n}'s crash row", crash_row, 60, proc)
        wait_until(f"the lost worker's train.py ({victim.pid}) ended", lambda: not alive(victim), 5)
        go.write_text("")
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert row["commit"] == commit and re.match(r"worker gpu[01] lost \(", row["reason"]), row  # names it
    again = row["reason"].rsplit("runs again as experiment ", 1)
    assert len(again) == 2 and again[1].isdigit(), row
    m = int(again[1])
    rows = ledger(repo)
    rerun = rows[rows["experiment"] == m]
    assert len(rerun) >= 1 and commit not in set(rerun["commit"]), rerun  # a commit of its own ...
    g = git.Repo(repo)
    redo = g.commit(rerun.iloc[0]["commit"])
    assert redo.parents[0] == g.commit(commit).parents[0]  # ... of the same change on the same parent
    assert redo.tree["train.py"].binsha == g.commit(commit).tree["train.py"].binsha
    assert set(rerun["status"]) <= {"keep", "discard"} and rerun["val_ppl"].notna().all(), rerun
    assert pool_problems(repo) == []
    assert check_invariants(repo) == []
    assert processes_in(repo) == []
    assert not session_of(proc.pid)
