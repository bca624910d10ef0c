"""--workers N and --ray: one driver, N experiments at once as Ray tasks, through the real agent.py, a real
local Ray instance (or a real `ray start` cluster), the real sandbox and the stand-in train.py."""
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import git
import pytest

from driver_helpers import TAG, check_invariants, edit, held, ledger, release_each, run_agent
from fake_llm import FakeLLM
from test_pool_kill import trainers, two_held

if os.environ.get("AR_REQUIRE_ASSETS") != "1":
    pytest.importorskip("ray", reason="Ray is not installed: pip install -r requirements-cluster.txt")


SCALE_LINE = "PPL_SCALE = 1.0  # a second knob: proposals that touch different lines can be applied on top of each other"


def sleepy(repo: Path, seconds: float) -> None:
    """Each stand-in run lasts `seconds`, so that runs overlap."""
    path = repo / "train.py"
    path.write_text(path.read_text().replace("SLEEP_S = 0.0", f"SLEEP_S = {seconds}"))
    g = git.Repo(repo)
    g.index.add(["train.py"])
    g.index.commit("runs that last")


def release_when_both_train(repo: Path, go: Path) -> dict:
    """Writes `go` once two experiments' train.py run at once (a thread): runs held by it (two_held) each wait until
    the other has started. Returns {experiment: pid} as seen then."""
    seen = {}

    def watch() -> None:
        end = time.time() + 300
        while time.time() < end:
            running = trainers(repo)
            if len(running) >= 2:
                seen.update({n: p.pid for n, p in running.items()})
                go.write_text("")
                return
            time.sleep(0.1)
    threading.Thread(target=watch, daemon=True).start()
    return seen


def chain_is_kept(repo: Path) -> None:
    """Every keep is on the branch, each kept commit's parent the previous kept one."""
    g, rows = git.Repo(repo), ledger(repo)
    kept = rows[rows["status"].isin(["baseline", "keep"])].drop_duplicates("commit")
    for (_, before), (_, after) in zip(kept.iloc[:-1].iterrows(), kept.iloc[1:].iterrows()):
        assert g.commit(after["commit"]).parents[0].hexsha == before["commit"]
        assert after["parent"] == before["commit"]
    assert g.head.commit.hexsha == kept.iloc[-1]["commit"]


def test_two_workers_run_at_once_with_one_ledger(repo, llm, ray_cluster, tmp_path):
    go = tmp_path / "go"
    llm.push(*two_held(go))  # the first two proposals overlap by construction, however loaded the machine
    llm.alternate = True
    together = release_when_both_train(repo, go)
    # a cluster the user works with is named in the environment: --workers still starts an instance of its own
    done = run_agent(repo, llm.url, "--workers", "2", "--max-experiments", "4", "--timeout", "120", timeout=300,
                     RAY_ADDRESS=ray_cluster[0])
    assert done.returncode == 0, done.stdout[-3000:]
    rows = ledger(repo)
    assert check_invariants(repo) == []
    assert len(together) == 2, f"no two experiments' train.py were seen running at once: {together}"
    ran = rows[rows["experiment"].isin(list(together))]
    assert ran["status"].isin(["keep", "discard"]).all(), ran
    assert {reason.split("worker ")[1].split(";")[0] for reason in ran["reason"]} == {"gpu0", "gpu1"}, ran["reason"]
    assert sorted(rows["experiment"]) == list(range(len(rows)))
    assert (rows["status"] != "crash").all(), rows["reason"].tolist()
    chain_is_kept(repo)
    # the prompt of a proposal asked while another trained lists it, with its parent
    listed = [m["content"] for r in llm.requests for m in r["messages"] if "These experiments are training now" in m["content"]]
    assert listed and "on commit" in listed[0]
    assert git.Repo(repo).git.worktree("list").count("\n") == 0, "a worktree was left behind"
    assert not list((repo / ".git" / "autoresearch" / TAG / "inflight").glob("*.json"))
    status = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "agent.py"), "--repo", str(repo),
                             "status", "--tag", TAG], capture_output=True, text=True)
    assert "gpu0" in status.stdout and "gpu1" in status.stdout, status.stdout


def stale_night(repo: Path, address: str, second: str, *more: str) -> tuple[FakeLLM, object]:
    """Two proposals on the baseline: a small gain that ends first (kept), and `second`, a larger gain held (see
    held()) until that keep, on a parent that is then no longer the best; `more`: the replies after them. On the
    session's cluster (its 2 GPUs: 2 workers), as the decisions do not depend on where the runs happen."""
    sleepy(repo, 1)
    released = release_each(repo, str(repo.parent / "go"), lambda st, flights, rows: rows is not None
                            and (rows["status"] == "keep").any())  # once the quick one is kept, however late
    llm = FakeLLM([edit(SCALE_LINE, SCALE_LINE.replace("1.0", "0.95"), "small gain, quick"), second, *more])
    llm.default_factor = 0.9
    done = run_agent(repo, llm.url, "--ray", address, "--max-experiments", "2", "--no-pipeline", "--timeout", "120",
                     timeout=400)
    released.set()
    return llm, done


def test_a_stale_win_is_merged_onto_the_best_and_kept_only_after_its_own_run(repo, ray_cluster):
    slow_gain = ("DESCRIPTION: large gain, slow\n<<<<<<< SEARCH\nPPL = 20.0\n=======\nPPL = 16.0\n>>>>>>> REPLACE\n"
                 + held(repo.parent / "go"))
    llm, done = stale_night(repo, ray_cluster[0], slow_gain)
    llm.close()
    assert done.returncode == 0, done.stdout[-3000:]
    rows = ledger(repo).set_index("experiment")
    assert check_invariants(repo) == []
    quick = rows[rows["description"] == "small gain, quick"].iloc[0]
    slow = rows[rows["description"] == "large gain, slow"].iloc[0]
    assert quick["status"] == "keep" and quick["val_ppl"] == pytest.approx(19.0)
    # the slow one beat the best, but on the baseline: recorded as measured there, not kept
    assert slow["status"] == "discard" and slow["val_ppl"] == pytest.approx(16.0)
    assert slow["parent"] == quick["parent"] != quick["commit"]
    assert "stale parent" in slow["reason"] and "re-applied on it as experiment" in slow["reason"]
    again = int(slow["reason"].split("as experiment ")[1].split()[0])
    redo = rows.loc[again]
    assert redo["description"].startswith(f"re-applied on {quick['commit'][:8]}: large gain, slow")
    assert redo["parent"] == quick["commit"] and redo["status"] == "keep"
    assert redo["val_ppl"] == pytest.approx(16.0 * 0.95)  # both changes, measured together
    chain_is_kept(repo)
    g = git.Repo(repo)
    assert g.head.commit.hexsha == redo["commit"] and "PPL = 16.0" in (repo / "train.py").read_text()
    assert len(llm.requests) == 2, "a clean merge asks the LLM nothing"


def test_a_stale_win_that_conflicts_is_proposed_again_by_the_llm(repo, ray_cluster):
    conflicting = (f"DESCRIPTION: larger gain on the same line, slow\n<<<<<<< SEARCH\n{SCALE_LINE}\n=======\n"
                   "PPL_SCALE = 0.8\n>>>>>>> REPLACE\n" + held(repo.parent / "go"))
    llm, done = stale_night(repo, ray_cluster[0], conflicting, edit(SCALE_LINE.replace("1.0", "0.95"), "PPL_SCALE = 0.8",
                                                    "the same change, made again"))
    llm.close()
    assert done.returncode == 0, done.stdout[-3000:]
    rows = ledger(repo).set_index("experiment")
    assert check_invariants(repo) == []
    slow = rows[rows["description"] == "larger gain on the same line, slow"].iloc[0]
    assert slow["status"] == "discard" and "stale parent" in slow["reason"]
    again = int(slow["reason"].split("as experiment ")[1].split()[0])
    asked = [m["content"] for m in llm.requests[-1]["messages"]]
    assert any("# re-apply" in c and "larger gain on the same line, slow" in c for c in asked)
    assert rows.loc[again]["description"].startswith("re-applied on ")
    assert rows.loc[again]["status"] in ("keep", "discard")


def test_ray_cluster_without_shared_disk(repo, llm, ray_cluster):
    address, host_dir = ray_cluster
    sleepy(repo, 1)
    llm.alternate = True
    done = run_agent(repo, llm.url, "--ray", address, "--max-experiments", "2", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert check_invariants(repo) == []
    rows = ledger(repo)
    assert rows["status"].isin(["baseline", "keep", "discard"]).all(), rows["reason"].tolist()
    # the two proposals ran and were scored, not only the baseline; each better than the last, one at least is kept
    assert (rows["status"] != "baseline").sum() >= 2 and (rows["status"] == "keep").any(), rows
    # each run happened in the host's own folder, from the files sent with its task ...
    key = f"{hashlib.sha256(str(repo.resolve()).encode()).hexdigest()[:12]}-{TAG}"
    for n in rows["experiment"]:
        assert (host_dir / key / str(n) / "tree" / "train.py").exists(), n
        # ... and its log came back
        assert (repo / "runs" / TAG / str(n) / "train.log").read_text().strip(), n
    # ... and the best submission was fetched from the host
    best = rows[rows["status"] == "keep"].iloc[-1]
    assert (repo / "runs" / TAG / str(best["experiment"]) / "submission.pt").exists()
    shutil.rmtree(host_dir / key, ignore_errors=True)


# ---------------------------------------------------------------- the user's path: README's `--workers 2`, real harness
def test_two_workers_score_the_real_train_py(tmp_path, tiny_env, llm):
    """`python agent.py --workers 2` as README gives it: a local Ray instance of its own, the real prepare.py and
    train.py on the tiny model. Every row is a real score, and both workers scored."""
    from driver_helpers import make_research_repo
    repo = make_research_repo(tmp_path / "real", real=True, MAX_STEPS=2)  # 2 steps, however loaded the machine
    llm.push(edit("LR = 3e-4", "LR = 1e-3", "raise the learning rate"),
             edit("WEIGHT_DECAY = 0.0              # decay pulls weights into the deadzone",
                  "WEIGHT_DECAY = 0.01             # decay pulls weights into the deadzone", "a little weight decay"))
    done = run_agent(repo, llm.url, "--workers", "2", "--max-experiments", "2", "--timeout", "120", "--eval-windows",
                     "1", timeout=600, **{k: v for k, v in tiny_env.items() if k != "AR_SUBMISSION"})
    assert done.returncode == 0, done.stdout[-3000:]
    rows = ledger(repo)
    # the baseline, both proposals (and a re-apply when the one that ended last was a stale win)
    assert rows["status"].iloc[0] == "baseline" and len(rows) >= 3, rows
    assert {"raise the learning rate", "a little weight decay"} <= set(rows["description"]), rows["description"]
    assert rows["status"].isin(["baseline", "keep", "discard"]).all(), rows["reason"].tolist()
    # scored by the real evaluator, after the 2 steps train.py was given
    assert (rows["steps"] == 2).all() and (rows["val_ppl"] > 1).all() and (rows["eval_windows"] == 1).all() and (rows["protocol"] == "v1-smoke1w").all()
    assert {reason.split("worker ")[1].split(";")[0] for reason in rows["reason"]} == {"gpu0", "gpu1"}, rows["reason"]
    assert check_invariants(repo) == []


@pytest.mark.parametrize("argv, says", [
    (["--gpus", ""], "give GPU indices separated by commas"),
    (["--gpus", "a,b"], "give GPU indices separated by commas"),
    (["--gpus", "0,"], "give GPU indices separated by commas"),
    (["--gpus", "0,0"], "a GPU is listed twice"),
    (["--workers", "3", "--gpus", "0,1"], "give one of them"),
    (["--workers", "0"], "--workers must be positive"),
    (["--ray", "auto", "--gpus", "0,1"], "--ray uses every GPU of the cluster"),
    (["--ray", "auto", "--workers", "2"], "--ray uses every GPU of the cluster"),
])
def test_bad_gpus_and_workers_are_refused_by_the_parser(argv, says, capsys):
    import agent
    with pytest.raises(SystemExit) as stop:
        agent.parse_args(argv)
    assert stop.value.code == 2 and says in capsys.readouterr().err


def test_gpus_sets_the_number_of_workers():
    import agent
    from driver import cluster
    args = agent.parse_args(["--workers", "2", "--gpus", "3,5"])
    assert cluster.gpu_count(args) == 2 and args.gpus == "3,5"
    assert cluster.gpu_count(agent.parse_args(["--gpus", "0,2,5"])) == 3


@pytest.mark.parametrize("repeated", ["scored", "training"])
def test_a_proposal_that_repeats_another_experiments_program_is_asked_again(repo, ray_cluster, repeated):
    """Pipelined, the third proposal is asked for while the first two (X, Y) train, and repeats X (a weak model's
    habit). When a worker is free for it, X has either scored (its score is known) or is still training (its score
    soon will be): either way the repeat is not run, and the LLM is asked again."""
    go = str(repo.parent / "go-{n}")
    worse = edit("PPL = 20.0", "PPL = 21.0", "proposal X, worse") + held(go)
    other = edit(SCALE_LINE, SCALE_LINE.replace("1.0", "1.5"), "proposal Y, worse") + held(go)
    asked_third = repo / "runs" / TAG / "3" / "response0.md"

    def when(st, flights, rows) -> bool:
        third_dispatched = any(n >= 3 for n in flights) or (rows is not None and (rows["experiment"] >= 3).any())
        first, then = ("proposal X", "proposal Y") if repeated == "scored" else ("proposal Y", "proposal X")
        if first in st["description"]:  # frees its worker once the repeat is in the driver's hands
            return asked_third.exists()
        if then in st["description"]:  # only after the third experiment is dispatched
            return third_dispatched
        return True
    released = release_each(repo, go, when)
    llm = FakeLLM([worse, other, worse, edit("PPL = 20.0", "PPL = 19.0", "proposal Z, better")])
    try:
        done = run_agent(repo, llm.url, "--ray", ray_cluster[0], "--max-experiments", "3", "--timeout", "120",
                         timeout=400)
    finally:
        released.set()
        llm.close()
    assert done.returncode == 0, done.stdout[-3000:]
    rows = ledger(repo).set_index("experiment")
    first = rows[rows["description"] == "proposal X, worse"]
    assert len(first) == 1 and first.iloc[0]["status"] == "discard", rows
    said = (f"the same program as the file experiment {first.index[0]} (discard" if repeated == "scored"
            else f"the same program as experiment {first.index[0]}, training now")
    assert said in done.stdout, done.stdout[-3000:]
    assert rows.loc[3, "description"] == "proposal Z, better" and rows.loc[3, "status"] == "keep", rows
    assert len(llm.requests) == 4
    assert check_invariants(repo) == []
