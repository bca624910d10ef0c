"""Round 3 of the adversarial review (the ledger's parse cache, the baseline failure count, recorded_status,
MAX_STEPS, AR_TEST_PAUSE 'phase:/path'): the findings that needed a fix, each shown on the real driver."""
import json
from pathlib import Path

import git

import agent
from driver.record import append_row
from driver.session import open_session
from driver_helpers import TAG, check_invariants, ledger, processes_in, run_agent


def leave_in_flight(repo: Path, st: dict) -> dict:
    """What a --workers night killed with experiment st['experiment'] in flight leaves (Pool.commit_change and
    Pool.save): its commit on `parent` in runs/<tag>/<n>/tree, held by a ref, and inflight/<n>.json."""
    n, main = st["experiment"], git.Repo(repo)
    tree = repo / "runs" / TAG / str(n) / "tree"
    main.git.worktree("add", "--detach", str(tree), st["parent"])
    (tree / "train.py").write_text((tree / "train.py").read_text().replace("PPL = 20.0", f"PPL = {25.0 + n}"))
    wt = git.Repo(tree)
    wt.git.commit("-m", f"{st['description']}\n\nautoresearch experiment {n}", "--", "train.py")
    st = {**st, "commit": wt.head.commit.hexsha}
    main.git.update_ref(f"refs/autoresearch/{TAG}/inflight/{n}", st["commit"])
    (tree.parent / "diff.patch").write_text(main.git.diff(st["parent"], st["commit"]) + "\n")
    (repo / ".git" / "autoresearch" / TAG / "inflight").mkdir(exist_ok=True)
    (repo / ".git" / "autoresearch" / TAG / "inflight" / f"{n}.json").write_text(json.dumps(st))
    return st


def test_a_night_on_one_gpu_after_a_killed_workers_night_takes_no_number_that_night_left_in_flight(repo, llm):
    """A --workers night killed with experiment 2 training and experiment 1's rerun announced in its row (worker
    lost, killed before start_rerun) is restarted on one GPU. Its experiments must not take numbers 2 and 3: the
    next --workers start runs those under their numbers: two rows of one number, and its run replaces
    runs/<tag>/<n>/submission.pt, the kept one of the one-GPU experiment of that number (the report would score
    the discarded change as the best); the announced rerun would find a row of its number and never run."""
    assert run_agent(repo, llm.url, "--max-experiments", "0").returncode == 0  # the baseline: experiment 0
    head = git.Repo(repo).head.commit.hexsha
    lost = leave_in_flight(repo, {"experiment": 1, "kind": "proposal", "parent": head, "description": "change one",
                                  "seen": 0, "rerun_as": 3})
    session = open_session(agent.parse_args(["--repo", str(repo), "--tag", TAG]))
    append_row(session, {"experiment": 1, "branch": session.branch, "commit": lost["commit"], "parent": head,
                         "status": "crash", "reason": "worker gpu1 lost (ActorDiedError: ...); runs again as experiment 3",
                         "description": "change one"})
    leave_in_flight(repo, {"experiment": 2, "kind": "proposal", "parent": head, "description": "change two", "seen": 1})

    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert rows["experiment"].tolist() == [0, 1, 4], rows[["experiment", "status", "description"]]
    assert sorted(p.name for p in (repo / ".git" / "autoresearch" / TAG / "inflight").iterdir()) == ["1.json", "2.json"]
    best = repo / "runs" / TAG / "4" / "submission.pt"
    kept = best.read_bytes()

    # the --workers night again: the experiment in flight and the announced rerun run under their own numbers (worse
    # than the best: discarded), and the best's submission stays for the report
    done = run_agent(repo, llm.url, "--workers", "2", "--timeout", "60", "--max-experiments", "0", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert sorted(rows["experiment"]) == [0, 1, 2, 3, 4], rows[["experiment", "status", "description"]]
    assert rows.set_index("experiment").loc[[2, 3], "status"].tolist() == ["discard", "discard"]
    assert best.read_bytes() == kept
    assert check_invariants(repo) == []
    assert processes_in(repo) == []


def test_an_unreadable_inflight_file_does_not_stop_the_numbering(repo):
    """A half-written or hand-edited inflight/<n>.json is passed over (Pool.resume sets it aside), not a driver
    that dies at every start on a KeyError."""
    from driver.experiment import next_experiment
    session = open_session(agent.parse_args(["--repo", str(repo), "--tag", TAG]))
    folder = session.inflight_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "5.json").write_text("{}")
    (folder / "6.json").write_text("[6]")
    (folder / "7.json").write_text('{"experiment": 9}')
    assert next_experiment(session) == 10
