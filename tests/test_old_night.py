"""An old night resumes under today's driver: the fixture in tests/data/old_night/ (made by make.py there, with the
driver of the commit its manifest names) is a research repository as a night left it: stopped cleanly, SIGKILLed with
an experiment training, or a `--workers 2` night SIGKILLed with two in flight. Restored into a tmp dir, `python
agent.py` with the same tag and arguments must go on with it: the in-flight experiments run again and recorded, the
old rows untouched byte for byte, the new ones in the same columns, the branch and refs consistent; `status` and
`report` print it as they did. Drives the CLI only, so a reorganised driver meets the same test and the same fixture."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import git
import pytest

from driver_helpers import AGENT, TAG, agent_env, check_invariants, edit, ledger, run_agent

FIXTURE = Path(__file__).resolve().parent / "data" / "old_night"
MANIFEST = json.loads((FIXTURE / "manifest.json").read_text())


def restore(case: str, repo: Path) -> dict:
    """The case's repository at `repo`: every ref from the bundle, its branch checked out, the files git does not
    hold (results.tsv, runs/, the user's uncommitted and untracked files, .git/autoresearch/) back in place. Returns
    the case's manifest entry: its refs, HEAD, and the arguments it ran with (its protocol): the ones it resumes with."""
    saved = MANIFEST["cases"][case]
    repo.mkdir(parents=True)
    g = git.Repo.init(repo)
    g.git.fetch("--quiet", "--update-head-ok", str(FIXTURE / case / "repo.bundle"), "refs/*:refs/*")
    g.git.symbolic_ref("HEAD", saved["branch"])
    g.git.reset("--hard", "--quiet")
    with g.config_writer() as cfg:
        cfg.set_value("user", "name", "tester").set_value("user", "email", "t@example.com")
    with tarfile.open(FIXTURE / case / "files.tar.gz") as tar:
        tar.extractall(repo, filter="tar")
    refs = dict(line.split() for line in g.git.for_each_ref("--format=%(refname) %(objectname)").split("\n"))
    assert refs == saved["refs"] and g.head.commit.hexsha == saved["head"], "the fixture did not restore as saved"
    return saved


def private(repo: Path, name: str) -> Path:
    return repo / ".git" / "autoresearch" / TAG / name


def header(data: bytes) -> list[str]:
    return data.split(b"\n", 1)[0].decode().split("\t")


def check_the_old_night_went_on(repo: Path, old: bytes, done: subprocess.CompletedProcess) -> None:
    """What either case must show after the restart: no error, the old rows as they were, one header, the ledger's
    copy in .git/ in step, every promise of check_invariants."""
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert f"resuming branch autoresearch/{TAG}" in done.stdout, done.stdout
    now = (repo / "results.tsv").read_bytes()
    assert now.startswith(old) and len(now) > len(old), "the old rows changed, or none was added"
    assert all(header(line) != header(old) for line in now[len(old):].splitlines()), "a second header"
    assert all(len(line.split(b"\t")) == len(header(old)) for line in now.splitlines()), "rows in other columns"
    assert list(ledger(repo).columns) == header(old)
    assert (repo / ".git" / "autoresearch" / "results.tsv").read_bytes() == now, "the driver's copy is behind"
    assert check_invariants(repo) == []
    assert json.loads(private(repo, "state.json").read_text())["phase"] == "done"


def test_a_night_killed_while_an_experiment_trained_runs_it_again_and_goes_on(tmp_path, llm):
    repo = tmp_path / "research"
    saved = restore("killed", repo)
    old = (repo / "results.tsv").read_bytes()
    killed = json.loads(private(repo, "state.json").read_text())
    assert killed["phase"] == "training" and killed["commit"] == saved["head"]  # what the fixture is about
    assert private(repo, "child.pid").exists() and private(repo, "tree-before-run.json").exists()
    n = killed["experiment"]
    llm.push(edit("PPL = 17.0", "PPL = 16.0", "lower still"))

    done = run_agent(repo, llm.url, "--max-experiments", "2", *saved["args"])

    check_the_old_night_went_on(repo, old, done)
    assert f"resuming experiment {n}: committed but never scored, running it again" in done.stdout, done.stdout
    assert len(llm.requests) == 1, "the experiment in flight was asked for again instead of run again"
    rows = ledger(repo)
    new = rows.iloc[len(rows) - 2:]
    assert new["experiment"].tolist() == [n, n + 1] and new["status"].tolist() == ["keep", "keep"], new
    assert new["val_ppl"].tolist() == [17.0, 16.0]
    assert new["commit"].iloc[0] == killed["commit"] and new["parent"].iloc[0] == killed["parent"]
    assert new["description"].tolist() == [killed["description"], "lower still"]
    g = git.Repo(repo)
    assert g.head.commit.hexsha == new["commit"].iloc[1] and g.head.commit.parents[0].hexsha == killed["commit"]
    assert g.active_branch.name == f"autoresearch/{TAG}"
    for ref in ("refs/heads/main", f"refs/autoresearch/{TAG}/discarded/2"):
        assert g.git.rev_parse(ref) == saved["refs"][ref], f"{ref} moved"
    # what the killed run left is gone: its work folder, its pid file and the snapshot of the tree before it
    assert not (repo / "runs" / TAG / str(n) / "work").exists()
    assert not private(repo, "child.pid").exists() and not private(repo, "tree-before-run.json").exists()


def test_a_night_stopped_between_experiments_goes_on_without_a_new_baseline(tmp_path, llm):
    repo = tmp_path / "research"
    saved = restore("stopped", repo)
    old = (repo / "results.tsv").read_bytes()
    before = ledger(repo)
    llm.push(edit("PPL = 18.0", "PPL = 17.0", "lower again"))

    done = run_agent(repo, llm.url, "--max-experiments", "1", *saved["args"])

    check_the_old_night_went_on(repo, old, done)
    assert "resuming experiment" not in done.stdout, done.stdout
    rows = ledger(repo)
    assert len(rows) == len(before) + 1, rows  # no second baseline: the same protocol's was run
    last = rows.iloc[-1]
    assert (last["experiment"], last["status"], last["val_ppl"]) == (before["experiment"].max() + 1, "keep", 17.0)
    assert last["parent"] == saved["head"] and git.Repo(repo).head.commit.hexsha == last["commit"]
    assert git.Repo(repo).git.rev_parse(f"refs/autoresearch/{TAG}/discarded/2") == \
        saved["refs"][f"refs/autoresearch/{TAG}/discarded/2"]


def asked(repo: Path, experiments) -> dict[str, bytes]:
    """The LLM conversations of these experiments, as their run folders keep them."""
    return {str(p.relative_to(repo)): p.read_bytes() for n in experiments
            for p in (repo / "runs" / TAG / str(n)).glob("*") if p.name.startswith(("prompt", "response"))}


def test_a_pool_night_killed_with_two_in_flight_runs_both_again_and_goes_on(tmp_path, llm):
    """`--workers 2`: each experiment in flight has its state file (inflight/<n>.json) and its ref; the restart runs
    both again from them, without asking the LLM again (their worktrees are not in the fixture: checked out anew)."""
    repo = tmp_path / "research"
    saved = restore("pool_killed", repo)
    old = (repo / "results.tsv").read_bytes()
    folder = private(repo, "inflight")
    flying = {int(p.stem): json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert len(flying) == 2 and all(f"refs/autoresearch/{TAG}/inflight/{n}" in saved["refs"] for n in flying)
    conversations = asked(repo, flying)

    done = run_agent(repo, llm.url, "--max-experiments", "1", *saved["args"], timeout=300)

    out = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in out, out[-3000:]
    for n in flying:
        assert f"resuming experiment {n}: in flight when the driver stopped, running it again" in out, out
    now = (repo / "results.tsv").read_bytes()
    assert now.startswith(old) and all(len(line.split(b"\t")) == len(header(old)) for line in now.splitlines())
    assert (repo / ".git" / "autoresearch" / "results.tsv").read_bytes() == now
    rows = ledger(repo)
    assert list(rows.columns) == header(old)
    for n, st in flying.items():  # each run again as itself: its commit, its description, scored
        mine = rows[(rows["experiment"] == n) & (rows["commit"] == st["commit"])]
        assert len(mine) == 1 and mine.iloc[0]["status"] in ("keep", "discard"), rows
        assert mine.iloc[0]["description"] == st["description"] and mine.iloc[0]["val_ppl"] > 0
    assert asked(repo, flying) == conversations, "an experiment in flight was asked for again instead of run again"
    numbers = sorted(set(rows["experiment"].astype(int)))  # in the order they finished; a confirmation repeats one
    assert numbers == list(range(len(numbers))), f"experiment numbers with gaps: {numbers}"
    g = git.Repo(repo)
    kept = rows[rows["status"].isin(["baseline", "keep"])]
    assert g.head.commit.hexsha == kept.iloc[-1]["commit"] and g.active_branch.name == f"autoresearch/{TAG}"
    assert (repo / "train.py").read_text() == g.head.commit.tree["train.py"].data_stream.read().decode()
    assert not list(folder.glob("*.json")), "state files left in flight"
    assert not g.git.for_each_ref(f"refs/autoresearch/{TAG}/inflight/"), "in-flight refs left"
    assert len([line for line in g.git.worktree("list", "--porcelain").splitlines() if line.startswith("worktree ")]) == 1
    for n in flying:
        if rows[rows["experiment"] == n].iloc[0]["status"] == "discard":
            assert g.git.rev_parse(f"refs/autoresearch/{TAG}/discarded/{n}") == flying[n]["commit"]
    assert (repo / "README.md").read_text() == "committed readme\nthe user's uncommitted line\n"
    assert (repo / "notes.txt").read_text() == "the user's untracked notes\n"


@pytest.mark.parametrize("case", sorted(c for c in MANIFEST["cases"] if (FIXTURE / c / "status.txt").exists()))
@pytest.mark.parametrize("command", ["status", "report"])
def test_status_and_report_print_an_old_night_as_they_did(tmp_path, case, command):
    repo = tmp_path / "research"
    restore(case, repo)
    done = subprocess.run([sys.executable, str(AGENT), command, "--repo", str(repo), "--tag", TAG], env=agent_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == (FIXTURE / case / f"{command}.txt").read_text()
