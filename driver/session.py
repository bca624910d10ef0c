"""The night's state: the repository, the branch and its paths, one driver per repository, how train.py
is sandboxed on this host, and when the night must stop (budgets, STOP file, Ctrl-C)."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Unpack

import git
import pandas as pd

from driver.common import GIT_SAFE_CONFIG, FatalError, atomic_write, log, one_line
from driver.records import ExperimentState
from driver.ledger import branch_ledger
from driver.scoring import sandbox_info, sandbox_plan

if TYPE_CHECKING:
    import openai

# Prompt tokens are estimated from characters: SmolLM2's tokenizer gives 3.2 chars/token on train.py
# and 3.4 on program.md (llama.cpp /tokenize), GPT-4o's more; 3.0 errs on the safe side
CHARS_PER_TOKEN = 3.0


@dataclass
class Session:
    args: argparse.Namespace
    repo: git.Repo
    root: Path
    branch: str
    runs: Path
    state_path: Path
    ledger_backup: Path
    client: openai.OpenAI | None = None
    prepare_hash: str = ""
    interrupts: int = 0
    context: int | None = None     # the LLM's context window in tokens (None: unknown, no budget)
    chars_per_token: float = CHARS_PER_TOKEN  # lowered when the server says a prompt was longer than estimated
    child: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)
    sandbox_abi: int = 0             # the Landlock ABI train.py runs under; 0: unsandboxed
    train_read: list = field(default_factory=list)  # what the sandboxed train.py may read besides the repo
    git_config: bytes = b""          # .git/config as the night found it: restored if a run changed it
    model_expected: str = "{}"       # the model's file digests when the night started (JSON), for the evaluator
    tokens_expected: str = ""        # the validation tokens' digest when the night started
    known_children: set = field(default_factory=set)  # the driver's own children when a run started
    child_exited: float = 0.0        # when the last run's main process ended
    child_killed_for: str = ""       # why the watchdog stopped the last run ('' if it did not)
    stray_files: set = field(default_factory=set)  # (device, inode) its leftovers held at its clean exit
    train_py_digests: dict = field(default_factory=dict)  # commit → program_digest of its train.py, read once a night

    @property
    def ledger(self) -> Path:
        return self.root / "results.tsv"

    def stop_requested(self) -> bool:
        return self.interrupts > 0 or (self.runs / "STOP").exists()

    def rows(self) -> pd.DataFrame:
        return branch_ledger(self.ledger, self.branch)

    def state(self) -> ExperimentState:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def save_state(self, **state: Unpack[ExperimentState]) -> None:
        atomic_write(self.state_path, json.dumps(state, allow_nan=False))  # only finite numbers from a run reach it
        # fault-injection tests: "phase:seconds", or "phase:/path" held until the test writes the path ({n}: the
        # experiment's number), which no loaded machine can race
        phase, _, hold = os.environ.get("AR_TEST_PAUSE", "").partition(":")
        if phase and phase == state.get("phase"):
            if hold.startswith("/"):
                go = Path(hold.replace("{n}", str(state.get("experiment"))))
                while not go.exists():
                    time.sleep(0.02)
            else:
                time.sleep(float(hold))

    @property
    def pid_file(self) -> Path:
        return self.state_path.with_name("child.pid")

    @property
    def inflight_dir(self) -> Path:  # --workers: inflight/<n>.json, each experiment in flight
        return self.state_path.with_name("inflight")

    @property
    def tree_snapshot(self) -> Path:
        return self.state_path.with_name("tree-before-run.json")

    @property
    def shm_snapshot(self) -> Path:
        return self.state_path.with_name("shm-before-run.json")

    @property
    def model_digests(self) -> Path:
        return self.state_path.with_name("model.sha256.json")

    @property
    def sandbox_note(self) -> str:
        return "" if self.sandbox_abi else "unsandboxed; "


def open_session(args) -> Session:
    root = Path(args.repo).resolve()
    try:
        repo = git.Repo(root)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise FatalError(f"{root} is not a git repository: run `git init && git add -A && git commit -m init` "
                         "there first") from None
    repo.git.set_persistent_git_options(c=GIT_SAFE_CONFIG)
    private = Path(repo.git_dir) / "autoresearch" / args.tag  # out of train.py's working tree
    private.mkdir(parents=True, exist_ok=True)
    return Session(args=args, repo=repo, root=root, branch=f"autoresearch/{args.tag}", runs=root / "runs" / args.tag,
                   state_path=private / "state.json", ledger_backup=private.parent / "results.tsv")


def take_lock(session: Session) -> None:
    """One driver per repository: a second one would kill the first one's run and race it on the ledger."""
    path = session.state_path.parent.parent / "driver.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise FatalError(f"another agent.py (pid {other}) is already running on {session.root}: stop it first "
                         "(Ctrl-C, or touch runs/<its tag>/STOP), then start this one") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)


def harness_info(session: Session) -> dict:
    """Ask the research repo's own prepare.py which files train.py needs to read (building the training
    token cache it cannot write), which must stay private to the evaluator, and the model's digests."""
    info, last = sandbox_info(session.root)
    if info is None:
        raise FatalError(f"`python prepare.py sandbox-info` failed: {one_line(last, 300)}. Run `python prepare.py` "
                         "once to set up the model and data, then start again")
    return info


def setup_sandbox(session: Session) -> None:
    """Decide how train.py runs: under Landlock (--sandbox auto|require) or unsandboxed, said once."""
    info = harness_info(session)
    session.model_expected = json.dumps(info.get("model", {}), indent=1)
    session.tokens_expected = info.get("tokens", {}).get("validation", "")
    session.train_read = [Path(p) for p in info.get("train_read", [])]
    session.sandbox_abi, warnings = sandbox_plan(session.args.sandbox, info, session.root)
    for warning in warnings:
        log(f"warning: {warning}")
    if session.sandbox_abi:
        log(f"train.py runs in a Landlock sandbox (ABI {session.sandbox_abi}): it writes only "
            f"runs/{session.args.tag}/<n>/work/")


def stop_reason(session: Session) -> str:
    """Why the night must stop now (checked between any two runs, baselines too), without consuming it."""
    if session.args.max_hours is not None and time.time() - session.started > session.args.max_hours * 3600:
        return f"--max-hours {session.args.max_hours} reached"
    if (session.runs / "STOP").exists():
        return "STOP file found"
    if session.interrupts:
        return "interrupted (Ctrl-C)"
    return ""


def budget_left(session: Session, done: int) -> str:
    args, rows = session.args, session.rows()
    if args.max_experiments is not None and done >= args.max_experiments:
        return f"--max-experiments {args.max_experiments} reached"
    if args.max_cost is not None and rows["cost_usd"].fillna(0).sum() >= args.max_cost:
        return f"--max-cost {args.max_cost} reached"
    started = datetime.fromtimestamp(int(session.started), timezone.utc)  # failures before this start are old news
    since = rows[pd.to_datetime(rows["timestamp"], utc=True, errors="coerce") >= started]
    recent = since["status"].tail(args.max_failures).tolist()
    if len(recent) == args.max_failures and all(s in ("crash", "timeout", "invalid") for s in recent):
        return (f"{args.max_failures} failed experiments in a row ({', '.join(recent)}): look at runs/{args.tag}/ "
                "and the reasons in results.tsv")
    reason = stop_reason(session)
    if reason == "STOP file found":
        (session.runs / "STOP").unlink(missing_ok=True)
    return reason
