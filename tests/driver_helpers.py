"""Helpers for driving the real agent.py against a scratch research repo with stand-in files."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import git
import pandas as pd
import psutil

from conftest import patch_constants

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "standin"
AGENT = ROOT / "agent.py"
TAG = "t"
# the stand-in's barrier: a change that sets it makes the run wait for a file the test writes at the right event
GO_LINE = next(line for line in (STANDIN / "train.py").read_text().splitlines() if line.startswith("GO_FILE = "))
STATUSES = {"baseline", "keep", "discard", "crash", "timeout", "invalid"}


def held(go: Path) -> str:
    """A SEARCH/REPLACE block that holds the run until `go` exists (add it to a reply)."""
    return f'<<<<<<< SEARCH\n{GO_LINE}\n=======\nGO_FILE = "{go}"\n>>>>>>> REPLACE\n'


def inflight(repo: Path) -> dict[int, dict]:
    """The state file of each experiment in flight (--workers), by number."""
    folder = repo / ".git" / "autoresearch" / TAG / "inflight"
    states = {}
    for path in folder.glob("*.json") if folder.exists() else []:
        try:
            states[int(path.stem)] = json.loads(path.read_text())
        except (OSError, ValueError):  # gone, or being written
            pass
    return states


def release_each(repo: Path, go: str, when) -> threading.Event:
    """Writes the go file of each experiment in flight (`go` with {n}: a barrier per experiment, see GO_FILE) once
    `when(state, states in flight, ledger or None)` holds for it (a thread, until the returned event is set): a run
    ends after the event it waits for, however loaded the machine, and across driver restarts."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):
            flights, rows = inflight(repo), None
            with contextlib.suppress(OSError, ValueError, KeyError):  # no ledger yet, or one being written
                rows = ledger(repo)
            for n, st in flights.items():
                path = Path(go.replace("{n}", str(n)))
                if not path.exists() and when(st, flights, rows):
                    path.write_text("")
    threading.Thread(target=watch, daemon=True).start()
    return stop


def edit(search: str, replace: str, description: str = "a change") -> str:
    """A SEARCH/REPLACE reply, as the LLM writes it."""
    return f"DESCRIPTION: {description}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


def make_research_repo(path: Path, real: bool = False, **constants) -> Path:
    """A git repo shaped like a user's clone: harness files committed (train.py with `constants` set), a user's
    uncommitted edit to README.md and an untracked notes file that the driver must never touch."""
    path.mkdir(parents=True, exist_ok=True)
    source = ROOT if real else STANDIN
    for name in ("prepare.py", "train.py"):
        shutil.copy(source / name, path / name)
    patch_constants(path / "train.py", **constants)
    shutil.copy(ROOT / "program.md", path / "program.md")
    (path / ".gitignore").write_text("results.tsv\nruns/\n__pycache__/\n*.pid\nenv.dump\n")
    (path / "README.md").write_text("committed readme\n")
    repo = git.Repo.init(path, initial_branch="main")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "tester").set_value("user", "email", "t@example.com")
    repo.index.add(["prepare.py", "train.py", "program.md", ".gitignore", "README.md"])
    repo.index.commit("research repo")
    (path / "README.md").write_text("committed readme\nthe user's uncommitted line\n")
    (path / "notes.txt").write_text("the user's untracked notes\n")
    return path


def agent_cmd(repo: Path, url: str, *args: str) -> list[str]:
    return [sys.executable, str(AGENT), "--repo", str(repo), "--tag", TAG, "--base-url", url, "--model", "fake",
            "--timeout", "10", "--llm-timeout", "5", "--baseline-runs", "1", *args]


def agent_env(**extra: str) -> dict:
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-secret-key", "HF_TOKEN": "hf_test_token",
           "SSH_AUTH_SOCK": "/tmp/ssh-test/agent.1", **extra}
    env.pop("OPENAI_BASE_URL", None)
    return env


def run_agent(repo: Path, url: str, *args: str, timeout: float = 180, **env) -> subprocess.CompletedProcess:
    return subprocess.run(agent_cmd(repo, url, *args), env=agent_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def start_agent(repo: Path, url: str, *args: str, **env) -> subprocess.Popen:
    return subprocess.Popen(agent_cmd(repo, url, *args), env=agent_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def state(repo: Path) -> dict:
    path = repo / ".git" / "autoresearch" / TAG / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def held_in(phase: str, folder: Path, *passing: int) -> str:
    """AR_TEST_PAUSE that holds the driver in `phase` until the test calls release(folder, n) for that experiment
    (those in `passing` go through at once): an event, not a pause a loaded machine can outlast."""
    for n in passing:
        release(folder, n)
    return f"{phase}:{folder}/go-{{n}}"


def release(folder: Path, n: int) -> None:
    (folder / f"go-{n}").write_text("")


def wait_for_phase(repo: Path, phase: str, timeout: float = 60, experiment: int | None = None) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        st = state(repo)
        if st.get("phase") == phase and (experiment is None or st.get("experiment") == experiment):
            return st
        time.sleep(0.02)
    raise TimeoutError(f"phase {phase} not reached; state {state(repo)}")


def kill_agent(proc: subprocess.Popen) -> None:
    """SIGKILL the driver alone (its train.py child keeps running, as after a real crash)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def ledger(repo: Path) -> pd.DataFrame:
    return pd.read_csv(repo / "results.tsv", sep="\t", dtype={"commit": str, "parent": str}, keep_default_na=False,
                       na_values=[""])


def processes_in(repo: Path) -> list:
    found = []
    for p in psutil.process_iter(["cwd"]):
        try:
            mine = p.pid == os.getpid() or p.ppid() == os.getpid()  # this test's own gitpython helpers
            if p.info["cwd"] and Path(p.info["cwd"]).resolve().is_relative_to(repo.resolve()) and not mine:
                found.append(p)
        except psutil.Error:
            pass
    return found


def wait_for_train_py(repo: Path, timeout: float = 60) -> list:
    """train.py running in the repository (its phase file is written before it starts: a fixed sleep after the
    phase raced a loaded machine), past sandbox.py's exec: the wrapper before it still writes its policy line to
    the driver's pipe, and dies of it when the driver has been killed meanwhile."""
    end = time.time() + timeout
    while time.time() < end:
        found = []
        for p in processes_in(repo):
            with contextlib.suppress(psutil.Error):
                args = p.cmdline()
                if any(arg.endswith("train.py") for arg in args) and not any(arg.endswith("sandbox.py") for arg in args):
                    found.append(p)
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError(f"no train.py running in {repo} after {timeout} s")


def check_invariants(repo: Path) -> list[str]:
    """Every promise of the ledger and the branch; returns what is broken (empty = all good)."""
    problems = []
    rows = ledger(repo)
    g = git.Repo(repo)
    if list(rows.columns)[:6] != ["experiment", "timestamp", "branch", "commit", "parent", "status"]:
        problems.append(f"bad header {list(rows.columns)}")
    bad = rows[~rows["status"].isin(STATUSES)]
    if len(bad):
        problems.append(f"unknown statuses {bad['status'].tolist()}")
    confirmations = rows["description"].fillna("").str.startswith("confirmation run: ")
    rows = rows[~confirmations]  # a confirmation run repeats its experiment's number and commit
    baselines = rows["description"].fillna("").str.startswith("baseline")  # repeated (and retried) runs of HEAD
    baseline_commits = set(rows[baselines]["commit"].dropna())
    numbered = rows.dropna(subset=["experiment"])
    if numbered["experiment"].duplicated().any():
        problems.append(f"experiments with 2 rows: {numbered[numbered['experiment'].duplicated()]['experiment'].tolist()}")
    scored = rows.dropna(subset=["commit"])
    if scored[~baselines.reindex(scored.index)]["commit"].duplicated().any():
        problems.append("a commit scored twice")
    if (rows["val_ppl"].dropna() <= 0).any():
        problems.append("non-positive val_ppl")
    if rows["status"].isin(["keep", "discard", "baseline"]).sum() != rows["val_ppl"].notna().sum():
        problems.append("val_ppl present exactly for scored rows: violated")
    kept = rows[rows["status"].isin(["baseline", "keep"])]
    head = g.head.commit.hexsha
    st = state(repo)
    if len(kept) and head != kept.iloc[-1]["commit"]:
        if not (st.get("phase") in ("committed", "training", "scoring", "confirming") and st.get("commit") == head):
            problems.append(f"HEAD {head[:8]} is not the last kept commit {kept.iloc[-1]['commit'][:8]}")
    if g.is_dirty(path="train.py") or g.is_dirty(path="prepare.py"):
        problems.append("train.py/prepare.py differ from HEAD")
    for _, row in rows[rows["status"].isin(["discard", "crash", "timeout"]) & rows["commit"].notna() & ~baselines].iterrows():
        ref = f"refs/autoresearch/{TAG}/discarded/{int(row['experiment'])}"
        try:
            if g.git.rev_parse(ref) != row["commit"]:
                problems.append(f"{ref} does not point at the discarded commit")
        except git.GitCommandError:
            problems.append(f"discarded experiment {int(row['experiment'])} has no ref")
        if not (repo / "runs" / TAG / str(int(row["experiment"])) / "diff.patch").exists():
            problems.append(f"discarded experiment {int(row['experiment'])} has no diff in runs/")
    chain = [c.hexsha for c in g.iter_commits(f"autoresearch/{TAG}") if c.message.strip() != "research repo"]
    discarded = [line.split()[0] for line in g.git.for_each_ref("--format=%(objectname)",
                                                               f"refs/autoresearch/{TAG}/discarded/").split("\n") if line]
    in_flight = st.get("commit") if st.get("phase") in ("applying", "committed", "training", "scoring", "confirming") \
        else None
    for commit in set(chain + discarded) - {in_flight} - baseline_commits:
        if (rows["commit"] == commit).sum() != 1:
            problems.append(f"experiment commit {commit[:8]} has {(rows['commit'] == commit).sum()} ledger rows")
    if len(numbered) and sorted(numbered["experiment"].astype(int)) != list(range(int(numbered["experiment"].max()) + 1)):
        problems.append("experiment numbers have gaps")
    if (repo / "README.md").read_text() != "committed readme\nthe user's uncommitted line\n":
        problems.append("the user's uncommitted README.md change was lost")
    if (repo / "notes.txt").read_text() != "the user's untracked notes\n":
        problems.append("the user's untracked notes.txt changed")
    leftovers = [str(p) for p in repo.rglob("*.tmp*")]
    if leftovers:
        problems.append(f"leftover temp files {leftovers[:3]}")
    submissions = list((repo / "runs" / TAG).glob("*/submission.pt"))
    if len(submissions) > 1:
        problems.append(f"{len(submissions)} submissions kept on disk (only the best should stay)")
    return problems
